"""Tests of whole-image conversion (converter/image)."""
