"""`lazyfs snapshotter`'s options for Kubernetes nodes: --image-service-address SOCKET and
--containerd-address SOCKET serve CRI's image service beside the snapshots API
(`lazyfs.cri.image_service`), for kubelet's `--image-service-endpoint`."""

from __future__ import annotations

import argparse
import os

from lazyfs.cli import UserError
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


def image_service_of(args: argparse.Namespace, config: SnapshotterConfig
                     ) -> tuple[SnapshotterConfig, tuple[SideService, ...]]:
    """The snapshotter's configuration and the services beside it the options ask for.
    Raises UserError for one of the two options without the other."""
    if args.image_service_address is None:
        if args.containerd_address is not None:
            raise UserError("--containerd-address: only used with --image-service-address")
        return config, ()
    if args.containerd_address is None:
        raise UserError("--image-service-address needs --containerd-address SOCKET "
                        "(containerd's, whose CRI plugin runs the pods)")
    service_config = ImageServiceConfig(os.path.abspath(args.image_service_address),
                                        os.path.abspath(args.containerd_address))
    return config, (ImageService(service_config, config.registry),)
