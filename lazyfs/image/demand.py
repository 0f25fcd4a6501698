"""The on-demand fetches of a layer, counted so that background loads can yield to them."""

from __future__ import annotations

import trio


class DemandGate:
    """The on-demand fetches of one layer that are waiting or in flight; background loads
    wait until there are none."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.active += 1
        if self.active == 1:
            self._idle = trio.Event()

    def end(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        while self.active:
            await self._idle.wait()
