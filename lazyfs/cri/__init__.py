"""Kubernetes nodes: the CRI image service kubelet pulls through (`image_service`), which
pulls seekable EROFS images lazily into containerd and passes everything else to
containerd's own CRI plugin, and its generated messages (`api/`)."""
