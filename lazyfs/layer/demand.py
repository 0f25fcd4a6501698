"""The on-demand fetches of a layer, counted so that background loads can yield to them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import trio


class DemandGate:
    """The on-demand fetches of one layer that are waiting or in flight; background loads
    wait until there are none. `idle_since` is the trio time the last of them ended."""

    def __init__(self) -> None:
        self.active = 0
        self.idle_since = -math.inf
        self._idle = trio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.active += 1
        if self.active == 1:
            self._idle = trio.Event()

    def end(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle_since = trio.current_time()
            self._idle.set()

    async def wait_idle(self) -> None:
        while self.active:
            await self._idle.wait()


async def wait_for_pause(gates: Callable[[], Iterable[DemandGate]], quiet_s: float,
                         patience_until: float) -> None:
    """Return once none of `gates()` (asked again each time round) has had an on-demand fetch
    waiting or in flight for `quiet_s`; from trio time `patience_until` on, as soon as none
    has one."""
    while True:
        current = list(gates())
        busy = next((gate for gate in current if gate.active), None)
        if busy is not None:
            await busy.wait_idle()
            continue
        quiet_at = max((gate.idle_since for gate in current), default=-math.inf) + quiet_s
        resume_at = min(quiet_at, patience_until)
        if trio.current_time() >= resume_at:
            return
        await trio.sleep_until(resume_at)
