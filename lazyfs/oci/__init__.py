"""OCI images: references resolved to manifests, configs and layers, remembered for
offline starts."""
