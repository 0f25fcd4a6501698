"""Verified chunk bytes, keyed by content and capped in bytes, with single flight per key.

This layer knows the format's keys only: nothing of FUSE, HTTP or how bytes are fetched.
`memory.ChunkCache` is the memory cache; its module docstring is the claim/complete/fail
protocol every loader follows.
"""
