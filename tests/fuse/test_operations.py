"""The FUSE handlers called directly under trio, without a kernel mount."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pyfuse3
import pytest
import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.fuse.operations import (
    FIRST_LAYER_INODE,
    STATS_FILE_NAME,
    STATS_INODE,
    LayerOperations,
)
from tests.fuse.fakes import BuggyImage, FakeImage

T = TypeVar("T")
DATA = bytes(range(256)) * 64  # 16 KiB, every offset distinguishable mod 256


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


def fuse_errno(fn: Callable[[], Awaitable[object]]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(fn)
    return info.value.errno


@pytest.fixture
def image() -> FakeImage:
    return FakeImage("layer.erofs", DATA, bad_offset=8192, bad_size=4096)


@pytest.fixture
def ops(image: FakeImage) -> LayerOperations:
    return LayerOperations([image, FakeImage("second", b"xyz")])


def test_root_is_a_read_only_directory(ops: LayerOperations) -> None:
    attr = run(lambda: ops.getattr(pyfuse3.ROOT_INODE))
    assert stat.S_ISDIR(attr.st_mode)
    assert stat.S_IMODE(attr.st_mode) == 0o555


def test_layer_file_has_image_size_and_mode_0444(ops: LayerOperations) -> None:
    attr = run(lambda: ops.lookup(pyfuse3.ROOT_INODE, b"layer.erofs"))
    assert attr.st_ino == FIRST_LAYER_INODE
    assert stat.S_ISREG(attr.st_mode)
    assert stat.S_IMODE(attr.st_mode) == 0o444
    assert attr.st_size == len(DATA)
    second = run(lambda: ops.lookup(pyfuse3.ROOT_INODE, b"second"))
    assert (second.st_ino, second.st_size) == (FIRST_LAYER_INODE + 1, 3)


def test_lookup_of_dot_entries_and_misses(ops: LayerOperations) -> None:
    for name in (b".", b".."):
        assert run(lambda n=name: ops.lookup(pyfuse3.ROOT_INODE, n)).st_ino == pyfuse3.ROOT_INODE
    assert fuse_errno(lambda: ops.lookup(pyfuse3.ROOT_INODE, b"missing")) == errno.ENOENT
    assert fuse_errno(lambda: ops.lookup(FIRST_LAYER_INODE, b"x")) == errno.ENOTDIR
    assert fuse_errno(lambda: ops.lookup(999, b"x")) == errno.ENOENT
    assert fuse_errno(lambda: ops.getattr(999)) == errno.ENOENT


def test_directory_entries_resume_after_each_id(ops: LayerOperations) -> None:
    entries = list(ops.entries(0))
    names = [name for name, _, _ in entries]
    assert names == sorted([b"layer.erofs", b"second", STATS_FILE_NAME.encode()])
    assert [next_id for _, _, next_id in entries] == [1, 2, 3]
    assert [name for name, _, _ in ops.entries(2)] == names[2:]
    assert list(ops.entries(3)) == []
    assert run(lambda: ops.opendir(pyfuse3.ROOT_INODE)) == pyfuse3.ROOT_INODE
    assert fuse_errno(lambda: ops.opendir(FIRST_LAYER_INODE)) == errno.ENOTDIR


def test_open_layer_keeps_page_cache(ops: LayerOperations) -> None:
    info = run(lambda: ops.open(FIRST_LAYER_INODE, os.O_RDONLY))
    assert info.fh == FIRST_LAYER_INODE
    assert info.keep_cache
    assert not info.direct_io


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_open_for_writing_is_refused(ops: LayerOperations, flags: int) -> None:
    assert fuse_errno(lambda: ops.open(FIRST_LAYER_INODE, flags)) == errno.EROFS


def test_open_of_directory_or_unknown_inode(ops: LayerOperations) -> None:
    assert fuse_errno(lambda: ops.open(pyfuse3.ROOT_INODE, os.O_RDONLY)) == errno.EISDIR
    assert fuse_errno(lambda: ops.open(999, os.O_RDONLY)) == errno.ENOENT


def test_read_returns_image_bytes_and_empty_at_eof(ops: LayerOperations) -> None:
    assert run(lambda: ops.read(FIRST_LAYER_INODE, 100, 50)) == DATA[100:150]
    assert run(lambda: ops.read(FIRST_LAYER_INODE, len(DATA) - 10, 4096)) == DATA[-10:]
    assert run(lambda: ops.read(FIRST_LAYER_INODE, len(DATA), 4096)) == b""
    assert run(lambda: ops.read(FIRST_LAYER_INODE + 1, 0, 4096)) == b"xyz"


def test_unverifiable_read_is_eio_and_counted(image: FakeImage) -> None:
    began = time.monotonic()
    ops = LayerOperations([image, FakeImage("second", b"xyz")])
    assert fuse_errno(lambda: ops.read(FIRST_LAYER_INODE, 8000, 1000)) == errno.EIO
    assert run(lambda: ops.read(FIRST_LAYER_INODE, 0, 100)) == DATA[:100]
    stats = ops.daemon_stats
    assert (stats.reads, stats.read_errors, stats.read_bytes) == (2, 1, 100)
    assert stats.first_read_after_s is not None
    assert 0 < stats.first_read_after_s < time.monotonic() - began


def test_a_bug_in_the_image_is_not_turned_into_eio() -> None:
    ops = LayerOperations([BuggyImage("bug", b"abc")])
    with pytest.raises(KeyError):
        run(lambda: ops.read(FIRST_LAYER_INODE, 0, 3))


def test_stats_file_is_rendered_at_open_and_read_direct(
    ops: LayerOperations, image: FakeImage
) -> None:
    run(lambda: ops.read(FIRST_LAYER_INODE, 0, 4096))
    attr = run(lambda: ops.lookup(pyfuse3.ROOT_INODE, STATS_FILE_NAME.encode()))
    assert attr.st_ino == STATS_INODE
    info = run(lambda: ops.open(STATS_INODE, os.O_RDONLY))
    assert info.direct_io
    assert info.fh not in (FIRST_LAYER_INODE, FIRST_LAYER_INODE + 1)
    first = run(lambda: ops.read(info.fh, 0, 10))
    rest = run(lambda: ops.read(info.fh, 10, 1 << 20))
    stats = json.loads(first + rest)
    assert stats["layers"]["layer.erofs"] == image.stats_snapshot()
    assert stats["daemon"]["reads"] == 1
    assert stats["daemon"]["read_bytes"] == 4096
    assert stats["daemon"]["read_latency"]["count"] == 1
    assert stats["daemon"]["pid"] == os.getpid()
    # A snapshot is frozen at open: later reads of the layer do not change it.
    run(lambda: ops.read(FIRST_LAYER_INODE, 0, 1))
    assert run(lambda: ops.read(info.fh, 0, 1 << 20)) == first + rest
    run(lambda: ops.release(info.fh))
    assert fuse_errno(lambda: ops.read(info.fh, 0, 10)) == errno.EBADF


def test_statfs_reports_a_full_read_only_file_system(ops: LayerOperations) -> None:
    data = run(lambda: ops.statfs())
    assert data.f_bsize == 4096
    assert data.f_blocks == len(DATA) // 4096 + 1
    assert (data.f_bfree, data.f_bavail, data.f_ffree) == (0, 0, 0)


def test_every_modification_is_refused(ops: LayerOperations) -> None:
    root = pyfuse3.ROOT_INODE
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: ops.write(FIRST_LAYER_INODE, 0, b"x"),
        lambda: ops.setattr(
            FIRST_LAYER_INODE, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None
        ),
        lambda: ops.create(root, b"new", 0o644, os.O_WRONLY),
        lambda: ops.mknod(root, b"node", 0o644, 0),
        lambda: ops.mkdir(root, b"dir", 0o755),
        lambda: ops.symlink(root, b"link", b"target"),
        lambda: ops.link(FIRST_LAYER_INODE, root, b"hard"),
        lambda: ops.unlink(root, b"layer.erofs"),
        lambda: ops.rmdir(root, b"x"),
        lambda: ops.rename(root, b"layer.erofs", root, b"y", 0),
        lambda: ops.setxattr(FIRST_LAYER_INODE, b"user.x", b"1"),
        lambda: ops.removexattr(FIRST_LAYER_INODE, b"user.x"),
        lambda: ops.access(FIRST_LAYER_INODE, os.W_OK),
    ]
    for call in calls:
        assert fuse_errno(call) == errno.EROFS
    assert run(lambda: ops.access(FIRST_LAYER_INODE, os.R_OK)) is True


def test_extended_attributes_are_absent(ops: LayerOperations) -> None:
    assert run(lambda: ops.listxattr(FIRST_LAYER_INODE)) == []
    assert fuse_errno(lambda: ops.getxattr(FIRST_LAYER_INODE, b"user.x")) == pyfuse3.ENOATTR


@pytest.mark.parametrize("names", [["a", "a"], ["a/b"], [""], [".."], [STATS_FILE_NAME]])
def test_layer_names_must_be_usable_and_unique(names: list[str]) -> None:
    with pytest.raises(ValueError):
        LayerOperations([FakeImage(name, b"") for name in names])


def test_stats_file_has_the_shared_cache_when_given(image: FakeImage) -> None:
    cache = ChunkCache(1000)
    assert cache.claim("chunk")
    cache.complete("chunk", b"x" * 300)
    assert cache.get("chunk") is not None and cache.get("other") is None
    with_cache = json.loads(LayerOperations([image], cache=cache).render_stats())
    assert with_cache["cache"] == cache.stats_snapshot() == {
        "capacity_bytes": 1000, "size_bytes": 300, "held_bytes": 0, "entries": 1, "hits": 1,
        "misses": 1, "evictions": 0,
    }
    assert "cache" not in json.loads(LayerOperations([image]).render_stats())
