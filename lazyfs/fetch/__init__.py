"""Getting bytes of a blob: HTTP range requests, local files, OCI registries."""
