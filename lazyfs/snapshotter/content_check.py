"""Proof that a remote layer holds what its image says it holds.

containerd names a layer's snapshot by its chain ID, made of the diff IDs an image's config
claims, and shares that snapshot with every image, in every namespace, that claims the same.
containerd's own unpack hashes each uncompressed layer against its diff ID before it commits
it; a remote snapshot skips that, so a config could copy another image's diff IDs and have its
own layers stand for that image's. The snapshotter therefore

- records with each remote snapshot the diff ID its image claims, and refuses a Prepare whose
  target is not the chain ID those diff IDs make (`RemoteLayerService`);
- binds each chain ID to the layer that made it: a Prepare naming another layer for the same
  chain ID shares the snapshot only once the first layer is proven (`RemoteLayerService.share`);
- measures every remote layer once, in the background: its frames fetched in order, each
  checked against the authenticated chunk table, decoded and hashed (sha256 of the raw EROFS
  image, which is what a diff ID of seekable EROFS is), after on-demand reads, never on the
  start-up path: each request waits until the reads of every layer have paused for QUIET_S
  (a start-up reads in bursts with short pauses between them, and 4 MiB requests there would
  take its link and CPUs), at most PATIENCE_S after the measurement began (a layer read
  without pause), then only until no read's fetch is in flight; a measurement a Prepare waits
  for (`wait_measured`) waits for no pause;
- tears down a layer whose content is not what a snapshot of it claims: that snapshot's Mounts
  fail with a message naming the claim and the finding, running containers on it read EIO,
  and the next Prepare of its chain ID takes the name back (`Store.quarantine`).
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from lazyfs.errors import LazyfsError
from lazyfs.format.chunk_table import verify_frame
from lazyfs.format.frames import decode_chunk_frame
from lazyfs.format.layout import BlobMetadata
from lazyfs.layer.demand import DemandGate, wait_for_pause
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.snapshotter.layers import LayerSet, MountedLayer
from lazyfs.snapshotter.store import Layer, NotFoundError, Snapshot, Store

log = logging.getLogger(__name__)

PIECE_BYTES = 4 << 20  # frames fetched per request while measuring
RETRY_DELAYS_S = (5.0, 30.0, 120.0, 600.0)  # a measurement that failed (source down) again
QUIET_S = 1.0  # how long reads must have paused before a measuring request starts
PATIENCE_S = 30.0  # how long a measurement waits for such pauses before it no longer does


class Verdict(enum.Enum):
    UNCLAIMED = "unclaimed"  # the snapshot records no diff ID (made by an older lazyfs)
    PENDING = "pending"  # its layer is not measured yet
    HOLDS = "holds"
    LIES = "lies"


def verdict(snapshot: Snapshot, layer: Layer) -> Verdict:
    """Whether the remote `snapshot`'s layer holds the content the snapshot's image claims."""
    if snapshot.diff_id is None:
        return Verdict.UNCLAIMED
    if layer.content_digest is None:
        return Verdict.PENDING
    return Verdict.HOLDS if layer.content_digest == snapshot.diff_id else Verdict.LIES


def mismatch(snapshot: Snapshot, layer: Layer) -> str:
    return (f"layer {layer.digest} is not what the image says: its config gives diff ID "
            f"{snapshot.diff_id}, the layer's content hashes to {layer.content_digest}")


def torn_down(store: Store, layer: Layer) -> bool:
    """Whether every snapshot of `layer` claims content it does not hold (then nothing may
    mount it again)."""
    claims = store.claims(layer.digest)
    return bool(claims) and all(verdict(s, layer) is Verdict.LIES for s in claims)


def _hash_frames(metadata: BlobMetadata, run: list[int], data: bytes, start: int,
                 hasher: hashlib._Hash) -> None:
    """Check each frame of `run` (bytes `data` from blob offset `start`) against the chunk
    table, decode it and feed it to `hasher`. Raises FormatError subclasses."""
    table = metadata.table
    for index in run:
        begin, end = metadata.frame_range(index)
        frame = data[begin - start:end - start]
        verify_frame(table, index, frame, begin)
        hasher.update(decode_chunk_frame(frame, table.decoded_size(index), index, begin))


async def measure_layer(image: RemoteImage, limiter: trio.CapacityLimiter,
                        wait_turn: Callable[[], Awaitable[None]]) -> str:
    """The sha256 (`sha256:` + hex) of the layer's raw EROFS image, from its frames fetched
    in order, `wait_turn` awaited before each request (to let on-demand reads go first).
    Raises FetchError and FormatError subclasses (LazyfsError)."""
    metadata = image.metadata
    hasher = hashlib.sha256()
    chunks = list(range(metadata.table.chunk_count))
    for run in metadata.frame_runs(chunks, PIECE_BYTES):
        await wait_turn()
        start, end = metadata.frame_range(run[0])[0], metadata.frame_range(run[-1])[1]
        data = await image.reader.read(start, end - start)
        await trio.to_thread.run_sync(_hash_frames, metadata, run, data, start, hasher,
                                      limiter=limiter)
    return "sha256:" + hasher.hexdigest()


class ContentChecker:
    """Measures mounted remote layers one at a time, in the daemon's nursery (`run`), and
    acts on what it finds. Trio thread only, except `refusal` (any thread)."""

    def __init__(self, layers: LayerSet, store: Store) -> None:
        self.layers = layers
        self.store = store
        self._queue: OrderedDict[str, None] = OrderedDict()
        self._wake = trio.Event()
        self._measured: dict[str, trio.Event] = {}
        self._awaited: set[str] = set()  # layers a Prepare waits for: no waiting for pauses
        self._failures: dict[str, int] = {}
        self.mismatches = 0  # layers found to hold other content than claimed

    def layer_attached(self, mounted: MountedLayer) -> None:
        """LayerSet's hook: measure a newly mounted layer unless it was measured before."""
        self.enqueue(mounted.spec.digest)

    def enqueue(self, digest: str, *, urgent: bool = False) -> None:
        if digest not in self._queue:
            self._queue[digest] = None
        if urgent:
            self._queue.move_to_end(digest, last=False)
        self._wake.set()

    async def wait_measured(self, digest: str) -> None:
        """Return once the layer `digest` has been measured (first in line)."""
        event = self._measured.setdefault(digest, trio.Event())
        if self._content_digest(digest) is None:
            self._awaited.add(digest)
            self.enqueue(digest, urgent=True)
            await event.wait()

    def refusal(self, snapshot: Snapshot) -> str | None:
        """Why the remote `snapshot` must not be mounted (its layer lies), or None."""
        if snapshot.layer_id is None:
            return None
        try:
            layer = self.store.layer(snapshot.layer_id)
        except NotFoundError:
            return None
        if verdict(snapshot, layer) is Verdict.LIES:
            return mismatch(snapshot, layer)
        return None

    async def run(self) -> None:
        """Measure what is queued, forever (cancelled with the daemon's nursery)."""
        while True:
            while not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            digest, _ = self._queue.popitem(last=False)
            try:
                await self._check(digest)
            except Exception:  # one layer's check must never end the snapshotter
                log.exception("layer %s: its content check failed; not tried again until it "
                              "is mounted again", digest)

    # -- helpers -----------------------------------------------------------------------------

    def _content_digest(self, digest: str) -> str | None:
        claims = self.store.claims(digest)
        if not claims or claims[0].layer_id is None:
            return None
        return self.store.layer(claims[0].layer_id).content_digest

    def _demand_gates(self) -> list[DemandGate]:
        return [mounted.image.demand for mounted in self.layers.mounted.values()]

    async def _check(self, digest: str) -> None:
        mounted = self.layers.mounted.get(digest)
        if mounted is None:
            return  # measured when it is mounted again (`layer_attached`)
        if self._content_digest(digest) is None:
            began = trio.current_time()

            async def wait_turn() -> None:
                """On-demand reads of every layer go first (see the module's note)."""
                patience_s = 0.0 if digest in self._awaited else PATIENCE_S
                await wait_for_pause(self._demand_gates, QUIET_S, began + patience_s)

            try:
                found = await measure_layer(mounted.image, self.layers.host.cpu_limiter,
                                            wait_turn)
            except Exception as exc:
                if self.layers.mounted.get(digest) is not mounted:
                    # Unmounted while measured (its reader closed under the check): measured
                    # again if it is mounted again.
                    log.info("layer %s: unmounted while its content was checked", digest)
                    return
                if not isinstance(exc, LazyfsError):
                    raise
                self._measure_failed(digest, exc)
                return
            self.store.set_content_digest(digest, found)
            self._failures.pop(digest, None)
        self._measured.setdefault(digest, trio.Event()).set()
        self._awaited.discard(digest)
        await self._judge(digest)

    def _measure_failed(self, digest: str, exc: LazyfsError) -> None:
        attempt = self._failures.get(digest, 0)
        self._failures[digest] = attempt + 1
        if attempt >= len(RETRY_DELAYS_S):
            log.error("layer %s: its content could not be checked (%s); not tried again until "
                      "it is mounted again: other images' layers cannot share its snapshots",
                      digest, exc)
            self._measured.setdefault(digest, trio.Event()).set()  # nobody waits forever
            self._awaited.discard(digest)
            return
        delay = RETRY_DELAYS_S[attempt]
        log.warning("layer %s: its content could not be checked yet (%s); trying again in "
                    "%g s", digest, exc, delay)

        async def later() -> None:
            await trio.sleep(delay)
            self.enqueue(digest)

        self.layers.host.nursery.start_soon(later)

    async def _judge(self, digest: str) -> None:
        claims = self.store.claims(digest)
        if not claims or claims[0].layer_id is None:
            return
        layer = self.store.layer(claims[0].layer_id)
        lying = [s for s in claims if verdict(s, layer) is Verdict.LIES]
        if not lying:
            log.info("layer %s: content checked: it hashes to %s, as its image says", digest,
                     layer.content_digest)
            return
        self.mismatches += 1
        for snapshot in lying:
            log.error("snapshot %s: %s; its mounts fail from now on", snapshot.key,
                      mismatch(snapshot, layer))
        if torn_down(self.store, layer):
            await self.layers.detach(digest)
            log.error("layer %s: torn down (no image it came with holds it rightly)", digest)
