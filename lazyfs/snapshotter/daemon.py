"""The `lazyfs snapshotter` process: recovery, the FUSE loop and layer mounts on the trio
thread, the gRPC server on a thread pool, and an orderly teardown on SIGTERM/SIGINT.

Start-up: open the database and the disk cache (one that cannot be used stops nothing: the
snapshotter goes on without it), take down what a previous run left mounted under ROOT (it
died with its FUSE loop) but for the layer mounts of committed snapshots, which running
containers may be reading (`adopt.py`), mount the FUSE file system of its layer host (the
host a mount and `run` use too: `lazyfs.mount.host`), re-attach every committed remote
snapshot's layer, taking over its left mount (one that fails is retried in the background,
and by the calls that need it: `remount.py`), remove orphan directories, and only then
listen on the socket.
Teardown: stop taking calls, stop the retries, unmount every layer no container uses, stop
FUSE (its connection aborted first if its loop has stopped, so that nothing waits for it). A
layer a running container uses stays mounted, and so does the (then dead) FUSE mount, as after
SIGKILL: the next start takes it over, and the container reads again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import trio
from prometheus_client import CollectorRegistry

from lazyfs.cache.disk import DiskCacheOptions
from lazyfs.cache.memory import DEFAULT_CACHE_BYTES
from lazyfs.fetch.base import SpeedLimit
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.layer.tuning import ImageTuning, PrefetchOptions
from lazyfs.mount.host import LayerHost, LayerLimits, MountOptions
from lazyfs.snapshotter.adopt import recover_mounts
from lazyfs.snapshotter.content_check import ContentChecker
from lazyfs.snapshotter.layers import FUSE_DIR, LayerSet, layer_name
from lazyfs.snapshotter.metrics import LayerMetrics, serve_metrics
from lazyfs.snapshotter.remote import RemoteLayerService
from lazyfs.snapshotter.remount import Remounter, RemountPolicy
from lazyfs.snapshotter.service import SnapshotsService
from lazyfs.snapshotter.snapshots import Snapshots
from lazyfs.snapshotter.store import Store, database_path

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRPC_THREADS = 16
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class SnapshotterConfig:
    """What `lazyfs snapshotter` serves, and how. `tuning` is how every remote layer reads
    (its `parallel_fetches` is `limits.parallel_fetches`), `low_speed` applies to every
    fetch."""

    address: str  # the unix socket containerd connects to
    root: str
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    cache_size_bytes: int = DEFAULT_CACHE_BYTES
    metrics_address: tuple[str, int] | None = None
    remount: RemountPolicy = field(default_factory=RemountPolicy)
    disk_cache: DiskCacheOptions | None = field(default_factory=DiskCacheOptions)
    prefetch: bool = True  # replay the prefetch lists layers carry
    tuning: ImageTuning = field(default_factory=ImageTuning)
    low_speed: SpeedLimit = field(default_factory=SpeedLimit)
    limits: LayerLimits = field(default_factory=LayerLimits)

    def mount_options(self) -> MountOptions:
        """How the layer host serves the remote layers: the knobs above; of the loads ahead
        of reads, the prefetch lists layers carry, replayed unless `prefetch` is off."""
        return MountOptions(
            cache_size_bytes=self.cache_size_bytes,
            tuning=self.tuning,
            disk_cache=self.disk_cache,
            low_speed=self.low_speed,
            prefetch=PrefetchOptions(use_image_lists=self.prefetch, from_disk=False),
            limits=self.limits,
        )


class SideService(Protocol):
    """A service of the same process beside the snapshots API (the CRI image service of
    `lazyfs.cri`): started, from a thread, once the snapshots socket takes calls (it may
    make containerd call the snapshotter), stopped before the snapshots socket is."""

    def start(self) -> None: ...

    def stop(self, grace_s: float) -> None: ...


def run_snapshotter(config: SnapshotterConfig, on_ready: Callable[[], None],
                    services: Sequence[SideService] = ()) -> None:
    """Serve until SIGTERM/SIGINT, with `services`; `on_ready` once they take calls."""
    trio.run(_main, config, on_ready, services)


async def _main(config: SnapshotterConfig, on_ready: Callable[[], None],
                services: Sequence[SideService] = ()) -> None:
    root = os.path.abspath(config.root)
    os.makedirs(root, mode=0o700, exist_ok=True)
    store = Store(database_path(root))
    server: grpc.Server | None = None
    started: list[SideService] = []
    host: LayerHost | None = None
    layers_kept = 0
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                registry = CollectorRegistry()
                metrics = LayerMetrics(registry)
                wanted = {layer_name(layer.digest) for layer in store.layers()}
                # Loop devices: the next start switches those running containers still read
                # to its own block files (`adopt.py`).
                host = await LayerHost.open(os.path.join(root, FUSE_DIR),
                                            config.mount_options(), nursery,
                                            layer_count=len(wanted), trace=metrics,
                                            allow_other=True, loop_devices=True)
                layers = LayerSet(root, host, config.registry, metrics)
                layers.left = await recover_mounts(host.fuse_dir, layers.layers_dir, wanted)
                os.makedirs(host.fuse_dir, mode=0o700, exist_ok=True)
                os.makedirs(layers.layers_dir, mode=0o700, exist_ok=True)
                host.start_fuse()
                checker = ContentChecker(layers, store)
                layers.on_attached = checker.layer_attached
                nursery.start_soon(checker.run)
                remounter = Remounter(layers, store, config.remount)
                try:
                    await remounter.attach_all()
                    await host.disk_cache_ready()  # else off, logged once
                    token = trio.lowlevel.current_trio_token()
                    remote = RemoteLayerService(layers, store, config.registry, token, checker)
                    snapshots = Snapshots(root, store, remote)
                    snapshots.cleanup()
                    server = _start_server(config.address, SnapshotsService(snapshots))
                    for service in services:
                        await trio.to_thread.run_sync(service.start)
                        started.append(service)
                    if config.metrics_address is not None:
                        serve_metrics(config.metrics_address, layers, registry,
                                      awaiting_remount=lambda: len(remounter.retrying))
                    log.info("serving snapshots on %s (root %s)", config.address, root)
                    on_ready()
                    async for signum in signals:
                        log.info("%s received; stopping", signal.Signals(signum).name)
                        break
                finally:
                    with trio.CancelScope(shield=True):
                        for service in reversed(started):
                            await trio.to_thread.run_sync(service.stop, STOP_GRACE_S)
                        if server is not None:
                            stopping = server
                            await trio.to_thread.run_sync(
                                lambda: stopping.stop(STOP_GRACE_S).wait())
                        remounter.cancel()
                        layers_kept = await layers.detach_all(keep_busy=True)
                        host.stop_fuse()
                    nursery.cancel_scope.cancel()
    finally:
        if host is not None:
            # The next start finds the layers it takes over by their files below the FUSE
            # mount: it stays, dead, while one is kept.
            await host.close(keep_fuse_mount=layers_kept > 0)
        store.close()
        with contextlib.suppress(OSError):
            os.unlink(config.address)
    log.info("stopped")


def _start_server(address: str, service: SnapshotsService) -> grpc.Server:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)  # a socket left by a previous run
    os.makedirs(os.path.dirname(os.path.abspath(address)), exist_ok=True)
    server = grpc.server(ThreadPoolExecutor(max_workers=GRPC_THREADS,
                                            thread_name_prefix="snapshots"))
    server.add_generic_rpc_handlers((service.handler(),))
    if server.add_insecure_port(f"unix:{os.path.abspath(address)}") == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server
