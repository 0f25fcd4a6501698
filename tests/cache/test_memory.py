"""ChunkCache: the claim/complete/fail protocol, the byte cap, and the counts it alone keeps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from lazyfs.cache.memory import NAMESPACES_COUNTED, ChunkCache


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_one_claimer_per_key_and_waiters_get_its_bytes() -> None:
    cache = ChunkCache(100)
    seen: list[bytes | None] = []

    async def waiter() -> None:
        seen.append(await cache.wait("k"))

    async def main() -> None:
        assert cache.claim("k")
        assert not cache.claim("k")  # loading: the others wait
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            nursery.start_soon(waiter)
            await trio.sleep(1)
            assert seen == []
            cache.complete("k", b"abc")
        assert not cache.claim("k")  # cached now
        assert cache.get("k") == b"abc"

    run(main)
    assert seen == [b"abc", b"abc"]


def test_fail_raises_in_every_waiter_and_caches_nothing() -> None:
    cache = ChunkCache(100)
    errors: list[BaseException] = []
    boom = ValueError("chunk 3: fetch failed")

    async def waiter() -> None:
        try:
            await cache.wait("k")
        except ValueError as exc:
            errors.append(exc)

    async def main() -> None:
        assert cache.claim("k")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            nursery.start_soon(waiter)
            await trio.sleep(1)
            cache.fail("k", boom)
        assert "k" not in cache and not cache.is_loading("k")
        assert cache.claim("k")  # a failure is not remembered: the next loader may retry
        cache.fail("k", boom)

    run(main)
    assert errors == [boom, boom]


def test_a_resolved_key_ignores_a_late_fail_and_refuses_a_second_complete() -> None:
    cache = ChunkCache(100)
    assert cache.claim("k")
    cache.complete("k", b"x")
    cache.fail("k", ValueError("late"))  # not loading: nothing happens
    assert cache.get("k") == b"x"
    with pytest.raises(KeyError):
        cache.complete("k", b"y")


def test_a_claimer_cancelled_before_completing_fails_in_finally() -> None:
    cache = ChunkCache(100)
    outcome: list[str] = []

    async def loader() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cache.fail("k", RuntimeError("not loaded"))

    async def waiter() -> None:
        with pytest.raises(RuntimeError, match="not loaded"):
            await cache.wait("k")
        outcome.append("woken")

    async def main() -> None:
        assert cache.claim("k")
        async with trio.open_nursery() as waiting:
            waiting.start_soon(waiter)
            async with trio.open_nursery() as loading:
                loading.start_soon(loader)
                await trio.sleep(1)
                loading.cancel_scope.cancel()

    run(main)
    assert outcome == ["woken"]


def test_waiters_get_bytes_evicted_at_once_and_later_callers_see_none() -> None:
    cache = ChunkCache(4)  # holds one 4-byte chunk; a 5-byte one is never stored
    seen: list[bytes | None] = []

    async def waiter() -> None:
        seen.append(await cache.wait("big"))

    async def main() -> None:
        assert cache.claim("big")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(1)
            cache.complete("big", b"12345")
        assert seen == [b"12345"]
        assert await cache.wait("big") is None  # not loading, not cached: go round again
        assert cache.claim("big")
        cache.fail("big", ValueError("gave up"))

    run(main)


def test_lru_within_the_byte_cap_and_the_counts() -> None:
    cache = ChunkCache(10)
    for key, data in (("a", b"aaaa"), ("b", b"bbbb")):
        assert cache.claim(key)
        cache.complete(key, data)
    assert cache.get("a") == b"aaaa"  # a is now the most recent
    assert cache.claim("c")
    cache.complete("c", b"cccc")  # 12 bytes > 10: b, the least recent, goes
    assert cache.get("b") is None
    assert cache.get("c") == b"cccc"
    assert cache.stats_snapshot() == {
        "capacity_bytes": 10,
        "size_bytes": 8,
        "held_bytes": 0,
        "entries": 2,
        "hits": 2,
        "misses": 1,
        "evictions": 1,
    }


def test_capacity_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        ChunkCache(-1)


def test_hits_and_misses_per_namespace_add_up_to_the_totals() -> None:
    cache = ChunkCache(100)
    for key in (("layer-a", 0), ("layer-b", 0)):
        assert cache.claim(key)
        cache.complete(key, b"x")
    for key in (("layer-a", 0), ("layer-a", 0), ("layer-a", 1), ("layer-b", 0), ("layer-b", 2)):
        cache.get(key)
    assert cache.counts("layer-a") == (2, 1)
    assert cache.counts("layer-b") == (1, 1)
    assert cache.counts("layer-c") == (0, 0)
    assert (cache.hits, cache.misses) == (3, 2)  # each get counted once in each


def test_only_the_most_recently_counted_namespaces_are_kept() -> None:
    cache = ChunkCache(100)
    cache.get(("first", 0))
    for number in range(NAMESPACES_COUNTED - 1):
        cache.get((number, 0))
    cache.get(("first", 1))  # counted again: now the most recent
    cache.get(("one-more", 0))  # the oldest, namespace 0, goes
    assert cache.counts("first") == (0, 2)
    assert cache.counts(0) == (0, 0) and cache.counts(1) == (0, 1)


def test_bytes_held_for_chunks_on_their_way_in_count_in_the_cap() -> None:
    cache = ChunkCache(capacity_bytes=12)
    for key in ("a", "b", "c"):
        assert cache.claim(key)
        cache.complete(key, key.encode() * 4)
    cache.hold(5)  # a chunk streaming in: the two least recent make room now
    assert cache.get("a") is None and cache.get("b") is None and cache.get("c") == b"cccc"
    assert cache.claim("d")
    cache.complete("d", b"dddd")  # 8 + 5 held > 12: c goes
    assert cache.get("c") is None and cache.get("d") == b"dddd"
    cache.release(5)
    assert cache.stats_snapshot()["held_bytes"] == 0
    cache.keep("e", b"eeee")
    assert cache.size_bytes == 8 and cache.get("d") == b"dddd"
