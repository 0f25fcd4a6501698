"""Helpers for converter tests: tar layers built with `tarfile`, EROFS mounts that clean up."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import struct
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import zstandard

BASE_MTIME = 1_600_000_000
# A valid version-2 file capability: cap_net_raw (13) permitted and effective. Binary, so it
# also checks that non-UTF-8 xattr values survive pax headers.
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _binary_pax(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


class LayerBuilder:
    """Builds a tar layer entry by entry, in the order given."""

    def __init__(self) -> None:
        self.members: list[tuple[tarfile.TarInfo, bytes | None]] = []
        self._clock = BASE_MTIME

    def _info(
        self,
        name: str,
        kind: bytes,
        *,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        xattrs: dict[str, bytes] | None = None,
        mtime: int | None = None,
    ) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        self._clock += 10
        info.mtime = self._clock if mtime is None else mtime
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": _binary_pax(v) for k, v in xattrs.items()}
        return info

    def add(self, info: tarfile.TarInfo, data: bytes | None = None) -> LayerBuilder:
        self.members.append((info, data))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> LayerBuilder:
        info = self._info(name, tarfile.REGTYPE, mode=mode, **kw)  # type: ignore[arg-type]
        info.size = len(data)
        return self.add(info, data)

    def dir(self, name: str, mode: int = 0o755, **kw: object) -> LayerBuilder:
        return self.add(self._info(name, tarfile.DIRTYPE, mode=mode, **kw))  # type: ignore[arg-type]

    def symlink(self, name: str, target: str, **kw: object) -> LayerBuilder:
        info = self._info(name, tarfile.SYMTYPE, mode=0o777, **kw)  # type: ignore[arg-type]
        info.linkname = target
        return self.add(info)

    def hardlink(self, name: str, target: str, **kw: object) -> LayerBuilder:
        info = self._info(name, tarfile.LNKTYPE, mode=0o644, **kw)  # type: ignore[arg-type]
        info.linkname = target
        return self.add(info)

    def device(
        self, name: str, kind: bytes, major: int, minor: int, mode: int = 0o660, **kw: object
    ) -> LayerBuilder:
        info = self._info(name, kind, mode=mode, **kw)  # type: ignore[arg-type]
        info.devmajor, info.devminor = major, minor
        return self.add(info)

    def fifo(self, name: str, mode: int = 0o600, **kw: object) -> LayerBuilder:
        return self.add(self._info(name, tarfile.FIFOTYPE, mode=mode, **kw))  # type: ignore[arg-type]

    def tar(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for info, data in self.members:
                archive.addfile(info, io.BytesIO(data) if data is not None else None)
        return out.getvalue()

    def gzip(self) -> bytes:
        return gzip.compress(self.tar(), mtime=0)

    def zstd(self, frame_bytes: int | None = None) -> bytes:
        """zstd-compress the tar, as several independent frames when `frame_bytes` is set."""
        raw = self.tar()
        compressor = zstandard.ZstdCompressor(write_checksum=True)
        if frame_bytes is None:
            return compressor.compress(raw)
        return b"".join(
            compressor.compress(raw[i : i + frame_bytes]) for i in range(0, len(raw), frame_bytes)
        )


def rich_layer() -> LayerBuilder:
    """A layer with every kind of entry the converter must carry, and OCI whiteouts."""
    big = bytes(range(256)) * 9000  # > 2 MiB: several read pieces
    layer = LayerBuilder()
    layer.dir("./", mode=0o755)
    layer.dir("etc", mode=0o755)
    layer.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    layer.file("etc/shadow", b"root:*::0:::::\n", mode=0o640, gid=42)
    layer.dir("bin", mode=0o755)
    layer.file("bin/su", b"\x7fELF su", mode=0o4755)
    layer.file("bin/wall", b"\x7fELF wall", mode=0o2755, gid=5)
    layer.file("bin/ping", b"\x7fELF ping", mode=0o755, xattrs={"security.capability": CAP_NET_RAW})
    layer.hardlink("bin/ping-hardlink", "bin/ping")
    layer.symlink("bin/sh", "busybox")
    layer.symlink("bin/abs", "/etc/passwd")
    layer.dir("tmp", mode=0o1777)
    layer.dir("home/user/deep", mode=0o700, uid=100000, gid=70000)  # parents implicit
    layer.file("home/user/deep/big.bin", big, mode=0o600, uid=100000, gid=70000)
    layer.file(
        "home/user/notes",
        b"notes",
        xattrs={"user.comment": b"hello", "user.binary": b"\xff\x00\xfe"},
        uid=4294967294,
        gid=4294967294,
    )
    layer.dir("dev", mode=0o755)
    layer.device("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666)
    layer.device("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660, gid=6)
    layer.device("dev/big", tarfile.CHRTYPE, 4095, 1048575, mode=0o600)
    layer.fifo("dev/initctl", mode=0o600)
    layer.file("empty", b"")
    layer.dir("var", mode=0o755, xattrs={"trusted.lazyfs.test": b"dir-xattr"})
    layer.file("var/.wh.removed", b"", uid=7, gid=8)  # whiteout: hides var/removed
    layer.dir("opaque", mode=0o750)
    layer.file("opaque/.wh..wh..opq", b"")
    layer.file("opaque/kept", b"kept")
    layer.file(".wh..wh.plnk", b"")  # aufs metadata: ignored
    layer.file("replaced", b"first version")
    layer.file("replaced", b"second version", mode=0o600)
    return layer


@contextlib.contextmanager
def mounted_erofs(image: Path, mountpoint: Path) -> Iterator[Path]:
    """Mount a raw EROFS image read-only (file-backed, or through a loop device)."""
    mountpoint.mkdir(exist_ok=True)
    plain = subprocess.run(
        ["mount", "-t", "erofs", "-o", "ro", str(image), str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if plain.returncode != 0:
        subprocess.run(
            ["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(mountpoint)],
            check=True,
            capture_output=True,
        )
    try:
        yield mountpoint
    finally:
        for _ in range(50):
            done = subprocess.run(["umount", str(mountpoint)], capture_output=True)
            if done.returncode == 0 or not os.path.ismount(mountpoint):
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
