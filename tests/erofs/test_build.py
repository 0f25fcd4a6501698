"""The EROFS structures lazyfs writes, read back with lazyfs's own reader: every field where it
belongs, directories split into blocks as the kernel reads them, limits refused by name."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.erofs.build import (
    ErofsLimitError,
    InodeFields,
    SuperblockFields,
    chunk_format,
    directory_size,
    encode_device,
    file_type,
    needs_extended,
    pack_directory,
    serialize_chunk_map,
    serialize_directory,
    serialize_inode,
    serialize_superblock,
    serialize_xattr_body,
    split_xattr_name,
    superblock_head,
    xattr_body_size,
    xattr_icount,
)
from lazyfs.erofs.reader import (
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    NULL_ADDR,
    Extent,
    Inode,
    chunk_map_range,
    data_extents,
    parse_dir_block,
    parse_inode,
    parse_superblock,
    parse_xattr_body,
)

BLOCK = 4096


def test_superblock_round_trip() -> None:
    fields = SuperblockFields(block_size_bits=12, root_nid=36, inode_count=7,
                              build_time=1_600_000_000, build_time_nsec=5, blocks=99,
                              uuid=bytes(range(16)), feature_compat=2, feature_incompat=4)
    head = superblock_head(fields)
    assert len(head) == 1024 + 128 and head[1024:] == serialize_superblock(fields)
    sb = parse_superblock(head)
    assert (sb.block_size, sb.root_nid, sb.meta_blkaddr, sb.xattr_blkaddr) == (BLOCK, 36, 0, 0)
    assert (sb.feature_incompat, sb.build_time, sb.build_time_nsec) == (4, 1_600_000_000, 5)
    assert head[1024 + 48:1024 + 64] == bytes(range(16))
    with pytest.raises(ErofsLimitError, match="16 bits"):
        serialize_superblock(SuperblockFields(12, 70000, 1, 0, 0, 1))


ids = st.integers(0, 0xFFFFFFFF)


@given(uid=ids, gid=ids, nlink=st.integers(1, 0xFFFFFFFF), size=st.integers(0, 1 << 40),
       mtime=st.integers(0, 1 << 40), nsec=st.integers(0, 999_999_999),
       layout=st.sampled_from([0, 2, 4]), raw=ids, icount=st.integers(0, 0xFFFF))
def test_inodes_round_trip(uid: int, gid: int, nlink: int, size: int, mtime: int, nsec: int,
                           layout: int, raw: int, icount: int) -> None:
    build = (1_600_000_000, 0)
    extended = needs_extended(uid=uid, gid=gid, nlink=nlink, size=size, mtime=mtime,
                              mtime_nsec=nsec, build_time=build[0], build_time_nsec=build[1])
    fields = InodeFields(0o100644, uid, gid, size, nlink, mtime, nsec, layout, raw, 5, icount,
                         extended)
    data = serialize_inode(fields)
    inode = parse_inode(data, 5, 4096)
    assert len(data) == inode.inode_size == (64 if extended else 32)
    assert (inode.mode, inode.uid, inode.gid, inode.size, inode.nlink, inode.layout,
            inode.raw, inode.xattr_count) == (0o100644, uid, gid, size, nlink, layout, raw,
                                              icount)
    assert inode.mtime == (mtime if extended else None)
    assert inode.mtime_nsec == (nsec if extended else 0)


def test_compact_only_where_nothing_is_lost() -> None:
    same = {"mtime": 10, "mtime_nsec": 0, "build_time": 10, "build_time_nsec": 0}
    assert not needs_extended(uid=65535, gid=65535, nlink=65535, size=(1 << 32) - 1, **same)
    for changed in ({"uid": 65536}, {"gid": 65536}, {"nlink": 65536}, {"size": 1 << 32}):
        values = {"uid": 0, "gid": 0, "nlink": 1, "size": 0, **changed}
        assert needs_extended(**values, **same)  # type: ignore[arg-type]
    assert needs_extended(uid=0, gid=0, nlink=1, size=0, mtime=10, mtime_nsec=1,
                          build_time=10, build_time_nsec=0)
    with pytest.raises(ErofsLimitError, match="compact"):
        serialize_inode(InodeFields(0o100644, 70000, 0, 0, 1, 0, 0, 0, 0, 1, 0, False))


@pytest.mark.parametrize(("major", "minor"), [(1, 3), (8, 0), (4095, 1048575), (0, 0),
                                              (259, 65536)])
def test_device_numbers(major: int, minor: int) -> None:
    fields = InodeFields(stat.S_IFCHR | 0o600, 0, 0, 0, 1, 0, 0, 0, encode_device(major, minor),
                         1, 0, False)
    assert parse_inode(serialize_inode(fields), 1, 0).rdev == (major, minor)


xattr_names = st.sampled_from(["user.", "trusted.", "security.", "lustre."]).flatmap(
    lambda prefix: st.binary(min_size=1, max_size=40).map(
        lambda suffix: prefix.encode() + suffix)) | st.sampled_from(
    [b"system.posix_acl_access", b"system.posix_acl_default"])


@given(st.dictionaries(xattr_names, st.binary(max_size=300), max_size=8))
def test_xattr_bodies_round_trip(xattrs: dict[bytes, bytes]) -> None:
    pairs = sorted(xattrs.items())
    body = serialize_xattr_body(pairs)
    assert len(body) == xattr_body_size(pairs) and len(body) % 4 == 0
    inode = Inode(1, 0, 0o100644, 0, 0, 0, 0, 0, 32, xattr_icount(len(body)))
    assert inode.xattr_size == len(body)
    shared, found = parse_xattr_body(body, "test")
    assert shared == []
    assert found == [(name.decode("utf-8", "surrogateescape"), value) for name, value in pairs]


def test_xattr_limits() -> None:
    assert split_xattr_name(b"trusted.overlay.opaque") == (4, b"overlay.opaque")
    assert split_xattr_name(b"system.posix_acl_access") == (2, b"")
    for name in (b"system.nfs4_acl", b"user.", b"other.name", b"system.posix_acl_accessx"):
        with pytest.raises(ErofsLimitError, match="EROFS stores only"):
            split_xattr_name(name)
    with pytest.raises(ErofsLimitError, match="longer than 255"):
        split_xattr_name(b"user." + b"x" * 256)
    with pytest.raises(ErofsLimitError, match="at most 65535"):
        serialize_xattr_body([(b"user.big", bytes(65536))])


names = st.binary(min_size=1, max_size=255).filter(lambda name: b"/" not in name
                                                     and b"\0" not in name)


@given(st.sets(names, max_size=400))
def test_directories_round_trip(found: set[bytes]) -> None:
    """Entries sorted across blocks, as many per block as fit; the last name of a block
    ends at the block's end (zero padding) or at the directory's size."""
    entries = sorted([(name, number + 100, 1) for number, name in enumerate(found - {b".",
                                                                                  b".."})]
                     + [(b".", 1, 2), (b"..", 2, 2)])
    data = serialize_directory(entries, BLOCK)
    assert len(data) == directory_size([name for name, _, _ in entries], BLOCK)
    counts = pack_directory([name for name, _, _ in entries], BLOCK)
    assert len(counts) == -(-len(data) // BLOCK)
    read = []
    for start in range(0, len(data), BLOCK):
        block = parse_dir_block(data[start:start + BLOCK], "test")
        assert len(block) == counts[start // BLOCK]
        read += [(dirent.name, dirent.nid, dirent.file_type) for dirent in block]
    assert read == entries


def test_directory_blocks_fill_up() -> None:
    name = b"n" * 243  # 258 bytes with its dirent: 15 after "." and ".." (27 bytes)
    entries = [(b".", 1, 2), (b"..", 1, 2)] + [(name + b"%03d" % i, i, 1) for i in range(30)]
    assert pack_directory([n for n, _, _ in entries], BLOCK) == [17, 15]
    assert directory_size([n for n, _, _ in entries], BLOCK) == BLOCK + 15 * 258
    with pytest.raises(ErofsLimitError, match="1 to 255 bytes"):
        pack_directory([b"x" * 256], BLOCK)


def test_file_types() -> None:
    assert [file_type(mode) for mode in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK,
                                         stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFLNK)] == \
        [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("indexes", [False, True])
def test_chunk_maps_as_the_reader_takes_them(indexes: bool) -> None:
    from lazyfs.erofs.reader import Superblock

    sb = Superblock(BLOCK, 36, 0, 0, 4, 0)
    addresses = [10, 11, NULL_ADDR, NULL_ADDR, 20, 12]
    size = 5 * BLOCK + 100
    inode = Inode(40, 1280, 0o100644, 0, 0, size, LAYOUT_CHUNK_BASED,
                  chunk_format(0, indexes=indexes), 32, 0)
    offset, length = chunk_map_range(sb, inode)
    assert offset == 1312
    chunk_map = serialize_chunk_map(addresses, indexes=indexes)
    assert len(chunk_map) == length == 6 * (8 if indexes else 4)
    assert data_extents(sb, inode, 1 << 30, chunk_map) == [
        Extent(10 * BLOCK, 2 * BLOCK), Extent(None, 2 * BLOCK), Extent(20 * BLOCK, BLOCK),
        Extent(12 * BLOCK, 100)]


def test_inline_layout_constant() -> None:
    assert LAYOUT_FLAT_INLINE == 2  # what the writer's inline tails are read as
