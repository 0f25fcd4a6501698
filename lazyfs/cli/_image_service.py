"""`lazyfs snapshotter`'s options for Kubernetes nodes: --image-service-address SOCKET and
--containerd-address SOCKET serve CRI's image service beside the snapshots API
(`lazyfs.cri.image_service`), for kubelet's `--image-service-endpoint`. They override the
keys of the configuration file's [image_service] (`snapshotter_config.py`), which checks
them with the others."""

from __future__ import annotations

import argparse
from dataclasses import replace

from lazyfs.cri.credentials import PullSecrets
from lazyfs.cri.image_service import CRI_NAMESPACE, ImageService, ImageServiceConfig
from lazyfs.snapshotter.daemon import SideService, SnapshotterConfig


def add_image_service_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Kubernetes nodes (CRI)")
    group.add_argument(
        "--image-service-address", metavar="SOCKET",
        help="also serve CRI's image service on this unix socket, for kubelet's "
        "--image-service-endpoint: seekable EROFS images are pulled lazily (into containerd's "
        f"namespace {CRI_NAMESPACE}), every other image and call goes to containerd's CRI "
        "plugin; needs --containerd-address",
    )
    group.add_argument(
        "--containerd-address", metavar="SOCKET",
        help="containerd's socket, whose CRI plugin the image service works with",
    )
    group.add_argument(
        "--image-service-namespace", metavar="NS",
        help="the containerd namespace the CRI plugin keeps its images in (default "
        f"{CRI_NAMESPACE})",
    )


def with_image_service(config: SnapshotterConfig, service: ImageServiceConfig | None
                       ) -> tuple[SnapshotterConfig, tuple[SideService, ...]]:
    """The snapshotter's configuration and the services beside it: with `service`, the image
    service, and the snapshotter's registry clients asking the pull secrets it keeps first."""
    if service is None:
        return config, ()
    secrets = PullSecrets()
    registry = replace(config.registry, keychain=secrets)
    return replace(config, registry=registry), (ImageService(service, config.registry, secrets),)
