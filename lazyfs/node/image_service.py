"""CRI's image service beside the snapshots API (`lazyfs.cri.image_service`), for kubelet's
`--image-service-endpoint`, when the configuration gives it an address: the two share what
kubelet's pull secrets teach."""

from __future__ import annotations

from dataclasses import replace

from lazyfs.cri.credentials import PullSecrets
from lazyfs.cri.image_service import ImageService, ImageServiceConfig
from lazyfs.snapshotter.daemon import SideService, SnapshotterConfig


def with_image_service(config: SnapshotterConfig, service: ImageServiceConfig | None
                       ) -> tuple[SnapshotterConfig, tuple[SideService, ...]]:
    """The snapshotter's configuration and the services beside it: with `service`, the image
    service, and the snapshotter's registry clients asking the pull secrets it keeps first."""
    if service is None:
        return config, ()
    secrets = PullSecrets()
    registry = replace(config.registry, keychain=secrets)
    return replace(config, registry=registry), (ImageService(service, config.registry, secrets),)
