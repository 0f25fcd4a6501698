"""Which FUSE connection a mountpoint is (lazyfs/mount/fuse_connection.py), from mountinfo."""

from __future__ import annotations

from pathlib import Path

from lazyfs.mount.fuse_connection import connection_id

MOUNTINFO = """\
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
612 27 0:59 / /run/lazyfs/mnt\\040one.fuse rw,nosuid,nodev,relatime - fuse.lazyfs lazyfs ro
613 27 259:5 / /srv/other rw - fuse.lazyfs lazyfs ro
"""


def test_the_connection_is_the_kernel_device_number_of_the_mount(tmp_path: Path) -> None:
    assert connection_id("/run/lazyfs/mnt one.fuse", MOUNTINFO) == 59
    # Beyond anonymous devices (major 0), fusectl names the kernel's dev_t (major << 20).
    assert connection_id("/srv/other", MOUNTINFO) == (259 << 20) | 5
    assert connection_id(str(tmp_path), MOUNTINFO) is None
