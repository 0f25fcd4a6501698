"""An in-memory image with the interface the FUSE layer uses, for tests of the handlers
alone: no fetching, no verification, just bytes and an optional range that fails."""

from __future__ import annotations

from typing import Any

import trio

from lazyfs.layer.errors import ImageReadError


class FakeImage:
    """Serves `data`; a read overlapping `[bad_offset, bad_offset + bad_size)` fails."""

    def __init__(
        self, name: str, data: bytes, *, bad_offset: int | None = None, bad_size: int = 0
    ) -> None:
        self.name = name
        self.data = data
        self.bad_offset = bad_offset
        self.bad_size = bad_size
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self.reads.append((offset, size))
        if (
            self.bad_offset is not None
            and offset < self.bad_offset + self.bad_size
            and self.bad_offset < offset + size
        ):
            raise ImageReadError(f"{self.name}: bytes {offset}+{size} cannot be verified")
        return self.data[offset : offset + size]

    def stats_snapshot(self) -> dict[str, Any]:
        return {"name": self.name, "image_size": self.size, "reads": len(self.reads)}


class BuggyImage(FakeImage):
    """An image whose read has a bug: the exception must surface, not become EIO."""

    async def read(self, offset: int, size: int) -> bytes:
        raise KeyError(offset)
