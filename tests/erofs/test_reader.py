"""The EROFS structures lazyfs reads trees with, built byte by byte: what each field means,
and every malformed or unsupported value refused with what it is."""

from __future__ import annotations

import struct

import pytest

from lazyfs.erofs.reader import (
    EROFS_MAGIC,
    ErofsError,
    ErofsUnsupportedError,
    Extent,
    chunk_map_range,
    data_extents,
    parse_dir_block,
    parse_inode,
    parse_superblock,
    parse_xattr_body,
    parse_xattr_entry,
)

BLOCK = 4096
IMAGE_SIZE = 1 << 30


def superblock(*, magic: int = EROFS_MAGIC, blkszbits: int = 12, incompat: int = 0,
               extra_devices: int = 0, dirblkbits: int = 0) -> bytes:
    body = struct.pack("<IIIBBHQQIIII16s16sIHHHBBIQ", magic, 0, 0, blkszbits, 0, 36, 0, 0, 0,
                       100, 1, 2, b"", b"", incompat, 0, extra_devices, 0, dirblkbits, 0, 0, 0)
    return bytes(1024) + body.ljust(128, b"\0")


def compact(*, layout: int, mode: int = 0o100644, size: int = 0, raw: int = 0,
            xattr_count: int = 0, uid: int = 1, gid: int = 2) -> bytes:
    return struct.pack("<HHHHIIIIHHI", layout << 1, xattr_count, mode, 1, size, 0, raw, 0, uid,
                       gid, 0)


def extended(*, layout: int, mode: int = 0o100644, size: int = 0, raw: int = 0,
             uid: int = 100000, gid: int = 70000) -> bytes:
    return struct.pack("<HHHHQIIIIQII16s", 1 | layout << 1, 0, mode, 0, size, raw, 0, uid, gid,
                       0, 0, 1, b"")


def test_superblock_fields() -> None:
    sb = parse_superblock(superblock())
    assert (sb.block_size, sb.root_nid, sb.meta_blkaddr, sb.xattr_blkaddr) == (BLOCK, 36, 1, 2)
    assert sb.inode_offset(36) == BLOCK + 36 * 32
    assert sb.shared_xattr_offset(3) == 2 * BLOCK + 12


@pytest.mark.parametrize(("data", "error", "message"), [
    (superblock(magic=0x12345678), ErofsError, "not an EROFS image"),
    (superblock()[:1100], ErofsError, "truncated"),
    (superblock(blkszbits=20), ErofsError, "block size"),
    (superblock(incompat=0x100), ErofsUnsupportedError, "features 0x100"),
    (superblock(incompat=0x08, extra_devices=2), ErofsUnsupportedError, "2 extra devices"),
    (superblock(dirblkbits=1), ErofsUnsupportedError, "directory blocks"),
])
def test_superblock_refusals(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_superblock(data)


def test_inode_forms() -> None:
    small = parse_inode(compact(layout=2, size=10, raw=7, xattr_count=3), 5, 9000)
    assert (small.mode, small.uid, small.gid, small.size, small.raw) == (0o100644, 1, 2, 10, 7)
    assert (small.inode_size, small.xattr_size, small.after_xattrs) == (32, 12 + 8, 9052)
    big = parse_inode(extended(layout=0, size=1 << 33, uid=100000, gid=70000), 6, 0)
    assert (big.inode_size, big.size, big.uid, big.gid) == (64, 1 << 33, 100000, 70000)
    device = parse_inode(compact(layout=0, mode=0o20600, raw=(4095 << 8) | 0xFF | (0xFFF00 << 12)),
                         7, 0)
    assert device.rdev == (4095, 0xFFFFF)
    with pytest.raises(ErofsError, match="data layout 5"):
        parse_inode(compact(layout=5), 8, 0)
    with pytest.raises(ErofsError, match="truncated"):
        parse_inode(extended(layout=0)[:40], 9, 0)


def test_flat_and_inline_data() -> None:
    sb = parse_superblock(superblock())
    plain = parse_inode(compact(layout=0, size=BLOCK + 5, raw=10), 1, 0)
    assert data_extents(sb, plain, IMAGE_SIZE) == [Extent(10 * BLOCK, BLOCK + 5)]
    inline = parse_inode(compact(layout=2, size=BLOCK + 5, raw=10), 1, 3 * BLOCK + 64)
    assert data_extents(sb, inline, IMAGE_SIZE) == [Extent(10 * BLOCK, BLOCK),
                                                    Extent(3 * BLOCK + 96, 5)]
    crossing = parse_inode(compact(layout=2, size=200, raw=0), 1, 4 * BLOCK - 64)
    with pytest.raises(ErofsError, match="crosses a block boundary"):
        data_extents(sb, crossing, IMAGE_SIZE)
    with pytest.raises(ErofsError, match="run past the end"):
        data_extents(sb, plain, 10 * BLOCK + 100)
    compressed = parse_inode(compact(layout=3, size=100), 1, 0)
    with pytest.raises(ErofsUnsupportedError, match="compressed"):
        data_extents(sb, compressed, IMAGE_SIZE)


def test_chunk_based_data() -> None:
    sb = parse_superblock(superblock())
    inode = parse_inode(compact(layout=4, size=4 * BLOCK + 1, raw=0), 1, 100)
    offset, size = chunk_map_range(sb, inode)
    assert (offset, size) == (132, 5 * 4)
    chunk_map = struct.pack("<5I", 20, 21, 0xFFFFFFFF, 0xFFFFFFFF, 30)
    assert data_extents(sb, inode, IMAGE_SIZE, chunk_map) == [
        Extent(20 * BLOCK, 2 * BLOCK), Extent(None, 2 * BLOCK), Extent(30 * BLOCK, 1)]
    indexed = parse_inode(compact(layout=4, size=BLOCK, raw=0x20), 1, 100)
    assert chunk_map_range(sb, indexed) == (136, 8)
    assert data_extents(sb, indexed, IMAGE_SIZE, struct.pack("<HHI", 0, 0, 9)) == [
        Extent(9 * BLOCK, BLOCK)]
    with pytest.raises(ErofsUnsupportedError, match="on device 1"):
        data_extents(sb, indexed, IMAGE_SIZE, struct.pack("<HHI", 0, 1, 9))
    with pytest.raises(ErofsError, match="truncated"):
        data_extents(sb, inode, IMAGE_SIZE, chunk_map[:8])


def _dir_block(names: list[bytes], nids: list[int]) -> bytes:
    head = b""
    offset = 12 * len(names)
    for name, nid in zip(names, nids, strict=True):
        head += struct.pack("<QHBB", nid, offset, 1, 0)
        offset += len(name)
    return head + b"".join(names)


def test_directory_blocks() -> None:
    block = _dir_block([b".", b"..", b"a", b"bb"], [36, 36, 40, 41]) + b"\0" * 10
    assert [(d.name, d.nid) for d in parse_dir_block(block, "dir")] == [
        (b".", 36), (b"..", 36), (b"a", 40), (b"bb", 41)]
    bad = bytearray(block)
    bad[8:10] = (5).to_bytes(2, "little")
    with pytest.raises(ErofsError, match="first name offset 5"):
        parse_dir_block(bytes(bad), "dir")
    with pytest.raises(ErofsError, match="invalid name"):
        parse_dir_block(_dir_block([b"a/b"], [1]), "dir")


def _xattr(index: int, name: bytes, value: bytes) -> bytes:
    entry = struct.pack("<BBH", len(name), index, len(value)) + name + value
    return entry + bytes(-len(entry) % 4)


def test_xattrs() -> None:
    inline = _xattr(1, b"comment", b"hello") + _xattr(4, b"overlay.opaque", b"y")
    body = struct.pack("<IB7s", 0, 1, b"") + struct.pack("<I", 7) + inline
    shared, pairs = parse_xattr_body(body, "inode 1")
    assert shared == [7]
    assert pairs == [("user.comment", b"hello"), ("trusted.overlay.opaque", b"y")]
    assert parse_xattr_entry(_xattr(2, b"", b"\x02\0\0\0"), 0, "x")[:2] == (
        "system.posix_acl_access", b"\x02\0\0\0")
    with pytest.raises(ErofsUnsupportedError, match="long name prefix"):
        parse_xattr_entry(_xattr(0x81, b"x", b""), 0, "x")
    with pytest.raises(ErofsError, match="runs past the end"):
        parse_xattr_entry(_xattr(1, b"name", b"value")[:8], 0, "x")
    with pytest.raises(ErofsError, match="name index 9"):
        parse_xattr_entry(_xattr(9, b"x", b""), 0, "x")
