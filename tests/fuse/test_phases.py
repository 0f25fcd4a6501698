"""Start-up phases: durations between marks, missing marks skipped, the first read after
ready, and process start times from /proc."""

from __future__ import annotations

import time

import pytest

from lazyfs.fuse.phases import PHASE_NAMES, StartupPhases, process_started_monotonic


def test_phases_are_the_gaps_between_marks() -> None:
    phases = StartupPhases()
    for name, at in (("command", 10.0), ("forked", 10.05), ("daemon", 10.2),
                     ("metadata", 10.3), ("fuse", 10.31), ("kernel", 10.4)):
        phases.mark(name, at)
    phases.record_read(10.35, 10.36)  # during the kernel mount: not the first file's read
    phases.record_read(10.5, 10.58)
    phases.record_read(10.6, 10.9)
    assert phases.snapshot() == pytest.approx({
        "cli_start_s": 0.05, "daemon_start_s": 0.15, "metadata_s": 0.1, "fuse_init_s": 0.01,
        "kernel_mount_s": 0.09, "ready_s": 0.4, "first_read_s": 0.08,
    })


def test_a_missing_mark_folds_its_phase_into_the_next() -> None:
    phases = StartupPhases()
    phases.mark("command", 1.0)
    phases.mark("daemon", 1.5)  # a foreground mount: no fork
    snapshot = phases.snapshot()
    assert snapshot["cli_start_s"] is None and snapshot["daemon_start_s"] == pytest.approx(0.5)
    assert snapshot["ready_s"] is None and set(snapshot) == set(PHASE_NAMES)
    with pytest.raises(ValueError):
        phases.mark("nonsense")


def test_this_process_started_before_now() -> None:
    started = process_started_monotonic()
    assert started is not None
    assert 0 <= time.monotonic() - started < 24 * 3600
