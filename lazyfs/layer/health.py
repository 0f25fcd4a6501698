"""What a layer remembers of failures, and for how long: per chunk and per source, never the
whole layer for one bad range.

- **A failed fetch** (the reader's retries exhausted) holds off only the chunks of that
  request, for `retry_after_s`, doubling each time the same chunk fails again (up to
  `retry_max_s`); every other chunk keeps loading.
- **An integrity failure** (frame digest, decoded size, dm-verity) is refetched first (see
  RemoteImage); a chunk that still fails is *bad* for `bad_retry_after_s`, doubling while it
  keeps failing (up to ten times that). It then gets another chance: a one-off corruption in
  transit, a proxy that served stale bytes, or an origin that was fixed, are not forever.
- **A source that nobody can connect to** (refused, unresolvable, connect timeout on every
  attempt), or that a probe found not answering (a layer opened from the disk cache alone:
  `ChunkLoader.probe_source`), fails every fetch of the layer at once for `retry_after_s`
  (doubling, up to `retry_max_s`): a dead server costs one retry cycle, not one per chunk a
  directory walk touches. It is logged once when it goes down and once when it answers
  again. What the disk cache holds is still served: a disk hit clears a chunk's failures.

All times are `time.monotonic()` seconds, passed in by the caller (statistics are read from
other threads too, outside trio).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lazyfs.layer.tuning import ImageTuning

log = logging.getLogger(__name__)

BAD_RETRY_GROWTH = 10


@dataclass
class _Hold:
    """A chunk or a source that fails at once until `until`; `count` failures in a row."""

    reason: str
    until: float
    count: int = 1


class LayerHealth:
    """The failure memory of one layer, read by every read and written by every load."""

    def __init__(self, name: str, tuning: ImageTuning) -> None:
        self.name = name
        self.tuning = tuning
        self._bad: dict[int, _Hold] = {}
        self._failing: dict[int, _Hold] = {}
        self._down: dict[str, _Hold] = {}

    # -- questions ---------------------------------------------------------------------------

    def refusal(self, chunk_index: int, sources: list[str], now: float) -> str | None:
        """Why a load of `chunk_index` must not even be tried now (bad, held off after a
        failed fetch, or every source down), or None."""
        bad = self._bad.get(chunk_index)
        if bad is not None and now < bad.until:
            return f"failed verification ({bad.reason}); tried again in {bad.until - now:.1f} s"
        failing = self._failing.get(chunk_index)
        if failing is not None and now < failing.until:
            return f"fetch failed ({failing.reason}); tried again in {failing.until - now:.1f} s"
        if sources and not self.usable(sources, now):
            down = self._down[sources[0]]
            return f"source unreachable ({down.reason})"
        return None

    def usable(self, sources: list[str], now: float) -> list[str]:
        """The sources not known to be down, in order."""
        return [s for s in sources if s not in self._down or now >= self._down[s].until]

    def bad_chunks(self, now: float) -> list[int]:
        return sorted(index for index, hold in self._bad.items() if now < hold.until)

    def failing_chunks(self, now: float) -> list[int]:
        return sorted(index for index, hold in self._failing.items() if now < hold.until)

    def down_sources(self, now: float) -> list[str]:
        return sorted(source for source, hold in self._down.items() if now < hold.until)

    # -- what happened -----------------------------------------------------------------------

    def loaded(self, chunk_indices: list[int], source: str | None = None) -> None:
        """Chunks verified and stored (from `source`, or from the disk cache: None): forget
        their failures; their source answers."""
        for index in chunk_indices:
            self._bad.pop(index, None)
            self._failing.pop(index, None)
        if source is not None:
            self.answered(source)

    def answered(self, source: str) -> None:
        """`source` sent an answer (even a bad one): it is not down."""
        if self._down.pop(source, None) is not None:
            log.info("layer %s: %s answers again", self.name, source)

    def chunk_bad(self, chunk_index: int, reason: str, now: float) -> bool:
        """Remember that `chunk_index` failed verification after its refetches. Returns True
        when this is news (to be logged): not bad before, or its previous hold had expired."""
        hold = self._bad.get(chunk_index)
        if hold is not None and now < hold.until:
            return False
        count = 1 if hold is None else hold.count + 1
        base = self.tuning.bad_retry_after_s
        delay = min(base * 2.0 ** (count - 1), base * BAD_RETRY_GROWTH)
        self._bad[chunk_index] = _Hold(reason, now + delay, count)
        return True

    def fetch_failed(self, chunk_indices: list[int], reason: str, now: float) -> None:
        """A fetch of these chunks failed (the source answered, or might have): hold them
        off, doubling for chunks that failed before."""
        for index in chunk_indices:
            hold = self._failing.get(index)
            count = 1 if hold is None else hold.count + 1
            self._failing[index] = _Hold(reason, now + self._backoff(count), count)

    def source_unreachable(self, source: str, reason: str, now: float) -> None:
        """No attempt could connect to `source`: fail its fetches at once for a while. Logs
        one line when the source goes down, none while it stays down."""
        hold = self._down.get(source)
        count = 1 if hold is None else hold.count + 1
        delay = self._backoff(count)
        self._down[source] = _Hold(reason, now + delay, count)
        if hold is None:
            log.warning("layer %s: source unreachable: %s (%s); reads of what no cache holds "
                        "fail at once, tried again after %.1f s and less often while it stays "
                        "down", self.name, source, reason, delay)

    def _backoff(self, count: int) -> float:
        return min(self.tuning.retry_after_s * 2.0 ** (count - 1), self.tuning.retry_max_s)
