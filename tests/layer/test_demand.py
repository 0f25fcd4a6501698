"""On-demand fetches and the background work that yields to them (lazyfs/layer/demand.py):
`wait_for_pause` waits for the reads of every layer to pause, up to a patience."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from lazyfs.layer.demand import DemandGate, wait_for_pause


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


async def fetch(gate: DemandGate, at: float, seconds: float) -> None:
    """An on-demand fetch from trio time `at`, lasting `seconds`."""
    await trio.sleep_until(at)
    gate.begin()
    await trio.sleep(seconds)
    gate.end()


async def resumed(gates: list[DemandGate], quiet_s: float, patience_until: float) -> float:
    await wait_for_pause(lambda: gates, quiet_s, patience_until)
    return trio.current_time()


def test_with_no_layers_or_no_read_yet_there_is_no_wait() -> None:
    async def main() -> None:
        assert await resumed([], 1.0, math.inf) == 0
        assert await resumed([DemandGate(), DemandGate()], 1.0, math.inf) == 0

    run(main)


def test_it_waits_for_a_pause_after_the_last_fetch_of_any_layer() -> None:
    async def main() -> None:
        gates = [DemandGate(), DemandGate()]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, gates[0], 0.0, 0.2)
            nursery.start_soon(fetch, gates[1], 0.5, 0.3)
            nursery.start_soon(fetch, gates[0], 1.5, 0.1)  # within the pause: starts it again
            await trio.sleep(0.1)
            assert await resumed(gates, 1.0, math.inf) == 2.6
        assert gates[0].idle_since == 1.6 and gates[1].idle_since == 0.8

    run(main)


def test_past_its_patience_it_waits_only_for_fetches_in_flight() -> None:
    async def main() -> None:
        gate = DemandGate()
        async with trio.open_nursery() as nursery:
            for tick in range(40):  # reads without a pause: 0.2 s fetches, 0.1 s apart
                nursery.start_soon(fetch, gate, tick * 0.3, 0.2)
            await trio.sleep(0.1)
            # Patience ends during the fetch from 5.1 s: when it has ended.
            assert await resumed([gate], 1.0, 5.15) == pytest.approx(5.3)
            nursery.cancel_scope.cancel()

    run(main)
