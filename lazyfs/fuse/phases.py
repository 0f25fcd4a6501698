"""Where the time to a first file goes: the start-up phases of a mount, for `lazyfs stats`.

Marks are CLOCK_MONOTONIC times, one clock for the whole machine, so the command's marks (its
process start, the fork) and the daemon's compare. Each phase lasts from the mark before it to
its own; a phase whose marks are missing (a foreground mount has no fork) is left out, and the
next one starts from the last mark present. Work that overlaps counts in the phase it ends in.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

# (mark, the phase that ends at it), in the order a mount passes them.
MARKS = (
    ("command", ""),
    ("forked", "cli_start_s"),
    ("daemon", "daemon_start_s"),
    ("metadata", "metadata_s"),
    ("fuse", "fuse_init_s"),
    ("kernel", "kernel_mount_s"),
)
PHASE_NAMES = (*(phase for _, phase in MARKS if phase), "ready_s", "first_read_s")


def process_started_monotonic(pid: int | None = None) -> float | None:
    """When process `pid` (default: this one) started, on the monotonic clock; None when
    /proc does not say. Its resolution is a clock tick (10 ms on most kernels)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat", encoding="ascii") as stat:
            ticks = int(stat.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    since_boot = ticks / os.sysconf("SC_CLK_TCK")
    # The start time counts from boot, suspended time included: CLOCK_BOOTTIME's origin.
    boot_offset = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()
    return since_boot - boot_offset


@dataclass
class StartupPhases:
    """Marks passed so far, and the first read the kernel asks for after the mount is ready
    (the first file a user reads: its latency is the last phase)."""

    marks: dict[str, float] = field(default_factory=dict)
    first_read_s: float | None = None

    def mark(self, name: str, at: float | None = None) -> None:
        if name not in dict(MARKS):
            raise ValueError(f"unknown start-up mark {name!r}")
        self.marks[name] = time.monotonic() if at is None else at

    def record_read(self, started: float, ended: float) -> None:
        ready = self.marks.get("kernel")
        if self.first_read_s is None and ready is not None and started >= ready:
            self.first_read_s = ended - started

    def snapshot(self) -> dict[str, float | None]:
        """Each phase in seconds (None when not passed yet); `ready_s` from the first mark to
        ready, `first_read_s` the first read after it."""
        out: dict[str, float | None] = dict.fromkeys(PHASE_NAMES)
        previous: float | None = None
        for name, phase in MARKS:
            at = self.marks.get(name)
            if at is None:
                continue
            if phase and previous is not None:
                out[phase] = round(at - previous, 6)
            previous = at
        if "kernel" in self.marks and self.marks:
            out["ready_s"] = round(self.marks["kernel"] - min(self.marks.values()), 6)
        if self.first_read_s is not None:
            out["first_read_s"] = round(self.first_read_s, 6)
        return out
