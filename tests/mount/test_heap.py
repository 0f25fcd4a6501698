"""The daemon's heap trimmer: it hands free memory back only once the RSS has grown past the
chunk cache and a slack, one trimmer a process, and it stops with its nursery."""

from __future__ import annotations

import pytest
import trio

from lazyfs.mount import heap

MiB = 1024 * 1024


class FakeLibc:
    def __init__(self) -> None:
        self.trims = 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_the_resident_size_is_read() -> None:
    assert heap.resident_bytes() > MiB


def test_the_heap_is_trimmed_only_while_the_rss_is_over_the_cache_and_slack(
        monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    sizes = iter([100 * MiB] + [150 * MiB] * 3 + [300 * MiB] * 2 + [150 * MiB] * 100)
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    monkeypatch.setattr(heap, "resident_bytes", lambda: next(sizes))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # Started with 100 MiB: a trim once over 100 + 64 (cache) + 16 (slack) MiB.
            nursery.start_soon(heap.keep_heap_trimmed, 64 * MiB, 0.01, 16 * MiB)
            nursery.start_soon(heap.keep_heap_trimmed, 64 * MiB, 0.01, 16 * MiB)  # returns
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert libc.trims == 2
    assert not heap._trimming  # a later host may start one again


def test_without_glibc_nothing_is_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_libc", lambda: None)
    trio.run(heap.keep_heap_trimmed, 0)  # returns at once
    assert heap.bound_heap() is False
