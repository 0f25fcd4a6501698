"""Mounting the layers of committed remote snapshots again after a restart, and retrying in
the background those whose source was down.

At start-up every layer a snapshot uses is attached before the socket takes calls. One that
fails (registry down, credentials expired) does not stop the others: it is logged and retried
in the daemon's nursery with a growing delay, a bounded number of times. Meanwhile a
Mounts/Prepare/View that needs it tries it again at once (`RemoteLayerService.path`), and
fails with a message naming the layer and why if it still cannot be mounted. A retry stops
when the layer got mounted on demand, or when no snapshot uses it any more; a layer that
comes up after its last snapshot was removed is unmounted again. `cancel()` stops every
retry before the daemon unmounts its layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from lazyfs.errors import LazyfsError
from lazyfs.snapshotter.content_check import torn_down
from lazyfs.snapshotter.layers import LayerSet, LayerSpec
from lazyfs.snapshotter.store import Store

log = logging.getLogger(__name__)

PARALLEL_REATTACH = 4


FIRST_DELAY_S = 1.0


@dataclass(frozen=True)
class RemountPolicy:
    """How often a layer that could not be mounted at start-up is tried again in the
    background: `attempts` times, the first a second after the failure, each delay twice the
    one before, at most `max_delay_s` (by default about 4 minutes in all)."""

    attempts: int = 8
    max_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 0 or not self.max_delay_s > 0:
            raise ValueError(f"remount retries must be >= 0 and their delay > 0, got {self}")

    def delays(self) -> Iterator[float]:
        delay = min(FIRST_DELAY_S, self.max_delay_s)
        for _ in range(self.attempts):
            yield delay
            delay = min(delay * 2, self.max_delay_s)


class Remounter:
    """Start-up attachment and background retries of remote layers (trio thread only)."""

    def __init__(self, layers: LayerSet, store: Store, policy: RemountPolicy) -> None:
        self.layers = layers
        self.store = store
        self.policy = policy
        self._scopes: set[trio.CancelScope] = set()
        self._cancelled = False
        self.retrying: set[str] = set()  # digests with a background retry pending

    def in_use(self, digest: str) -> bool:
        return any(layer.digest == digest for layer in self.store.layers())

    async def attach_all(self) -> None:
        """Mount every layer a committed snapshot uses; retry those that fail later."""
        limiter = trio.CapacityLimiter(PARALLEL_REATTACH)

        async def one(spec: LayerSpec) -> None:
            async with limiter:
                try:
                    await self.layers.ensure(spec)
                except (LazyfsError, OSError) as exc:
                    log.error("layer %s: cannot mount it again: %s (retrying in the "
                              "background)", spec.digest, exc)
                    self.retrying.add(spec.digest)
                    self.layers.host.nursery.start_soon(self._retry, spec)

        async with trio.open_nursery() as nursery:
            for layer in self.store.layers():
                if torn_down(self.store, layer):
                    log.error("layer %s: not mounted again: it does not hold what its images "
                              "say (its snapshots fail until containerd removes them)",
                              layer.digest)
                    continue
                nursery.start_soon(one, LayerSpec.from_json(layer.source))

    def cancel(self) -> None:
        self._cancelled = True
        for scope in list(self._scopes):
            scope.cancel()

    async def _retry(self, spec: LayerSpec) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if not self._cancelled:
                    await self._retry_until_mounted(spec)
            finally:
                self._scopes.discard(scope)
                self.retrying.discard(spec.digest)

    async def _retry_until_mounted(self, spec: LayerSpec) -> None:
        attempt = 0
        for attempt, delay in enumerate(self.policy.delays(), start=1):
            await trio.sleep(delay)
            if spec.digest in self.layers.mounted:
                return  # mounted on demand meanwhile
            if not self.in_use(spec.digest):
                log.info("layer %s: no snapshot uses it any more; not retried", spec.digest)
                return
            try:
                await self.layers.ensure(spec)
            except (LazyfsError, OSError) as exc:
                log.warning("layer %s: retry %d of %d failed: %s", spec.digest, attempt,
                            self.policy.attempts, exc)
                continue
            if not self.in_use(spec.digest):  # its last snapshot went while we mounted it
                await self.layers.detach(spec.digest)
                return
            log.info("layer %s mounted again (retry %d)", spec.digest, attempt)
            return
        log.error("layer %s: not mounted after %d retries; its snapshots fail until a call "
                  "that needs it mounts it", spec.digest, attempt)
