"""lazyfs's own EROFS writer, checked by fsck.erofs 1.5, by lazyfs's reader and through the
kernel's EROFS driver against its sources: directories, tar layers (the tree `extract_layer`
writes, to the mtime) and EROFS images (containerd's vectors, written anew)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import zstandard

from converter.erofs.dir_inodes import DirectorySource
from converter.erofs.image_inodes import ErofsSource
from converter.erofs.inode_tree import LayerSource, Node
from converter.erofs.tar_inodes import TarSource
from converter.erofs.writer import ImageOptions, ImageResult, place_blocks, write_image
from converter.erofs_tree import ErofsReader, ImageFile, scan_erofs
from converter.errors import ConvertError, UnsafeTarError
from converter.mkfs import fsck_erofs
from converter.tar_extract import extract_layer
from converter.tree import compare_trees, scan_directory, scan_tar
from lazyfs.erofs.reader import parse_superblock
from tests.converter import BASE_MTIME, CAP_NET_RAW, LayerBuilder, mounted_erofs, rich_layer

BLOCK = 4096
VECTORS = ("basic-noverity", "basic-verity-64k", "ctd-tar-whiteouts")


def _tar_source(data: bytes) -> TarSource:
    return TarSource(lambda: contextlib.closing(io.BytesIO(data)))


def _paths(root: Path) -> list[Path]:
    """`root` and everything under it (symlinks not followed)."""
    found = [root]
    for top, dirs, files in os.walk(root):
        found += [Path(top) / name for name in dirs + files]
    return found


def _plain_tree(root: Path) -> Path:
    """Files, directories and symlinks any user can make, blocks repeated and zero."""
    (root / "dir/sub").mkdir(parents=True)
    unique = bytes(range(256)) * 16 * 3  # three identical blocks
    (root / "dir/a").write_bytes(unique + b"tail")
    (root / "dir/copy").write_bytes(unique + b"tail")  # the same blocks again
    (root / "zeros").write_bytes(bytes(5 * BLOCK + 7))  # holes, and a zero tail
    (root / "empty").write_bytes(b"")
    for number in range(400):  # several directory blocks
        (root / "dir/sub" / f"entry-with-a-long-name-{number:04}").write_bytes(b"%d" % number)
    for name in ("-dash", "!bang", " space", "\udcff-not-utf8"):  # before "." bytewise
        (root / os.fsencode(name).decode("utf-8", "surrogateescape")).write_bytes(b"odd")
    os.symlink("dir/a", root / "link")
    os.symlink("x" * 4000, root / "long-link")  # too long to inline after its inode
    os.link(root / "dir/a", root / "hard")
    for path in _paths(root):
        os.utime(path, ns=(BASE_MTIME * 10**9, BASE_MTIME * 10**9), follow_symlinks=False)
    os.utime(root / "dir/a", ns=(0, BASE_MTIME * 10**9 + 123))  # an mtime of its own
    return root


def _every_kind_tree(root: Path) -> Path:
    """_plain_tree plus what needs root: owners, devices, a socket, xattrs."""
    _plain_tree(root)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "big-dev", stat.S_IFCHR | 0o600, os.makedev(4095, 1048575))
    os.mknod(root / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mknod(root / "whiteout", stat.S_IFCHR, os.makedev(0, 0))
    os.mkfifo(root / "fifo", 0o600)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(root / "sock"))
    os.chown(root / "dir/copy", 100000, 70000)  # beyond a compact inode
    os.chmod(root / "dir/copy", 0o4755)
    os.setxattr(root / "dir/a", "security.capability", CAP_NET_RAW)
    os.setxattr(root / "dir", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "dir", "trusted.overlay.origin", b"")
    os.setxattr(root / "dir/sub", "user.big", os.urandom(3900))  # pushed to the next block
    os.setxattr(root / "link", "trusted.on-a-link", b"\xff\x00")
    return root


def _write(source: LayerSource, image: Path, **options: object) -> ImageResult:
    result = write_image(source, image, ImageOptions(**options))  # type: ignore[arg-type]
    assert image.stat().st_size == result.image_size
    return result


def _stat_of(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime in ns, link count) of every path under `root`."""
    found = {}
    for path in _paths(root):
        st = os.lstat(path)
        found[os.fspath(path.relative_to(root))] = (st.st_mtime_ns, st.st_nlink)
    return found


@pytest.mark.root
@pytest.mark.parametrize("chunk_indexes", [False, True], ids=["block-map", "chunk-indexes"])
def test_a_directory_through_the_kernel(tmp_path: Path, chunk_indexes: bool) -> None:
    src = _every_kind_tree(tmp_path / "src")
    image = tmp_path / "image.erofs"
    _write(DirectorySource(src), image, chunk_indexes=chunk_indexes)
    fsck_erofs(image)
    expected = scan_directory(src)
    assert compare_trees(expected, scan_erofs(image)) == []
    with mounted_erofs(image, tmp_path / "mnt") as mounted:
        assert compare_trees(expected, scan_directory(mounted)) == []
        assert _stat_of(mounted) == _stat_of(src)  # mtimes to the nanosecond, link counts


def test_identical_blocks_once_zero_blocks_as_holes(tmp_path: Path) -> None:
    src = _plain_tree(tmp_path / "src")
    image = tmp_path / "image.erofs"
    result = _write(DirectorySource(src), image)
    # dir/a: 3 identical blocks, stored once; dir/copy: the same blocks and tail; the four
    # odd names: one block; hard is dir/a.
    assert result.shared_blocks == 2 + 4 + 3
    assert result.hole_blocks == 6
    assert compare_trees(scan_directory(src), scan_erofs(image), ignore={"owner"}) == []
    assert result.startup_end == result.metadata_size < result.image_size
    with open(image, "rb") as f:
        reader = ErofsReader(ImageFile(f), parse_superblock(f.read(2048)))
        entries = dict(reader.entries(reader.inode(reader.sb.root_nid)))
        a_inode = reader.inode(dict(reader.entries(reader.inode(entries[b"dir"])))[b"a"])
        zero_inode = reader.inode(entries[b"zeros"])
        assert reader.extents(zero_inode)[0].offset is None  # a hole
        assert reader.inode(reader.sb.root_nid).nid == 36  # right after the superblock
        assert a_inode.mtime == BASE_MTIME and a_inode.mtime_nsec == 123  # extended
        assert reader.inode(entries[b"zeros"]).mtime is None  # compact: the build time
        assert reader.sb.build_time == BASE_MTIME


@pytest.mark.root
def test_a_tar_layer_is_what_extraction_writes(tmp_path: Path) -> None:
    """The tree, the mtimes (implicit directories get the layer's newest), the counts."""
    data = rich_layer().tar()
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    extract_stats = extract_layer(io.BytesIO(data), extracted)
    source = _tar_source(data)
    assert source.stats == extract_stats
    image = tmp_path / "image.erofs"
    _write(source, image)
    fsck_erofs(image)
    expected = scan_tar(io.BytesIO(data))
    assert compare_trees(expected, scan_erofs(image)) == []
    with mounted_erofs(image, tmp_path / "mnt") as mounted:
        assert compare_trees(expected, scan_directory(mounted)) == []
        assert compare_trees(scan_directory(extracted), scan_directory(mounted)) == []
        assert _stat_of(mounted) == _stat_of(extracted)


@pytest.mark.root
def test_xattrs_beyond_a_block(tmp_path: Path) -> None:
    """An inode record larger than a block (64 KiB xattrs: more than ext4 stores) crosses
    blocks, as the kernel reads it."""
    layer = (LayerBuilder().file("big", b"data", xattrs={"user.big": os.urandom(65000)})
             .file("next", b"n").dir("d", xattrs={"trusted.a": os.urandom(5000),
                                                   "security.b": b"b"}).symlink("d/l", "x"))
    data = layer.tar()
    image = tmp_path / "image.erofs"
    _write(_tar_source(data), image)
    fsck_erofs(image)
    expected = scan_tar(io.BytesIO(data))
    assert compare_trees(expected, scan_erofs(image)) == []
    with mounted_erofs(image, tmp_path / "mnt") as mounted:
        assert compare_trees(expected, scan_directory(mounted)) == []


@pytest.mark.parametrize(("layer", "error", "message"), [
    (LayerBuilder().symlink("link", "/etc").file("link/passwd", b"x"), UnsafeTarError,
     "parent 'link' is a symlink"),
    (LayerBuilder().hardlink("a", "missing"), UnsafeTarError, "is not in the layer"),
    (LayerBuilder().file("f", b"x").file("f/g", b"y"), ConvertError,
     "parent 'f' is not a directory"),
    (LayerBuilder().dir("d").hardlink("h", "d"), ConvertError, "hardlink to directory"),
    (LayerBuilder().file("f", b"x", xattrs={"system.nfs4_acl": b"x"}), ConvertError,
     "EROFS stores only"),
    (LayerBuilder().file("n" * 256, b"x"), ConvertError, "longer than 255 bytes"),
], ids=["through-symlink", "missing-link-target", "file-as-parent", "link-to-dir",
        "xattr-namespace", "long-name"])
def test_what_a_tar_layer_cannot_be(layer: LayerBuilder, error: type[Exception],
                                    message: str) -> None:
    with pytest.raises(error, match=message):
        _tar_source(layer.tar())


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    """Only the data of files still in the tree is written; a hard link keeps a replaced
    file's data; a directory entry over a directory adds xattrs."""
    layer = (LayerBuilder().file("a", b"first" * 2000).hardlink("keep", "a")
             .file("a", b"second").dir("d", xattrs={"user.one": b"1"}).file("d/x", b"x")
             .dir("d", mode=0o700, xattrs={"user.two": b"2"}).file("gone", b"gone" * 3000)
             .file(".wh.gone", b""))
    data = layer.tar()
    image = tmp_path / "image.erofs"
    result = _write(_tar_source(data), image)
    tree = scan_erofs(image)
    assert compare_trees(scan_tar(io.BytesIO(data)), tree) == []
    assert tree["keep"].size == 10000 and tree["a"].size == 6
    assert tree["d"].mode == 0o700 and set(tree["d"].xattrs) == {"user.one", "user.two"}
    assert tree["gone"].kind == "chardev"
    assert result.data_blocks == 3 + 1 + 1  # keep (3 blocks), a, d/x: not "gone"


def test_two_builds_are_identical(tmp_path: Path) -> None:
    src = _plain_tree(tmp_path / "src")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, symlinks=True)  # other inodes, same names, modes and mtimes
    os.unlink(copy / "hard")
    os.link(copy / "dir/a", copy / "hard")
    for path in _paths(copy):
        original = src / path.relative_to(copy)
        st = os.lstat(original)
        os.utime(path, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
    images = []
    for number, tree in enumerate((src, copy, src)):
        image = tmp_path / f"{number}.erofs"
        _write(DirectorySource(tree), image, uuid=b"u" * 16)
        images.append(image.read_bytes())
    assert images[0] == images[1] == images[2]
    data = rich_layer().tar()
    first, second = tmp_path / "t1", tmp_path / "t2"
    _write(_tar_source(data), first)
    _write(_tar_source(data), second)
    assert first.read_bytes() == second.read_bytes()


def test_timestamp_is_the_build_time_and_clamps(tmp_path: Path) -> None:
    layer = LayerBuilder().file("old", b"o", mtime=BASE_MTIME).file("new", b"n",
                                                                   mtime=BASE_MTIME + 900)
    image = tmp_path / "image.erofs"
    _write(_tar_source(layer.tar()), image, timestamp=BASE_MTIME + 500)
    with open(image, "rb") as f:
        reader = ErofsReader(ImageFile(f), parse_superblock(f.read(2048)))
        assert reader.sb.build_time == BASE_MTIME + 500
        entries = dict(reader.entries(reader.inode(reader.sb.root_nid)))
        assert reader.inode(entries[b"old"]).mtime == BASE_MTIME
        assert reader.inode(entries[b"new"]).mtime is None  # clamped: the build time


def test_the_dry_run_places_blocks_where_the_image_has_them(tmp_path: Path) -> None:
    src = _plain_tree(tmp_path / "src")
    placed: dict[int, tuple[Node, int]] = {}
    size = place_blocks(DirectorySource(src), None,
                        lambda block, node, number: placed.setdefault(block, (node, number)))
    image = tmp_path / "image.erofs"
    assert _write(DirectorySource(src), image).image_size == size
    with ErofsSource(image) as written:
        stored: dict[int, int] = {}
        for block, _, number in written.blocks_of(BLOCK):
            stored.setdefault(block, number)
    assert {block: number for block, (_, number) in placed.items()} == {
        block: number for block, number in stored.items() if block in placed}
    assert set(placed) <= set(stored)


@pytest.mark.parametrize("name", VECTORS)
def test_containerd_images_written_anew(vectors_dir: Path, tmp_path: Path, name: str) -> None:
    raw = tmp_path / "containerd.erofs"
    blob = (vectors_dir / f"{name}.blob").read_bytes()
    raw.write_bytes(zstandard.ZstdDecompressor().stream_reader(blob,
                                                               read_across_frames=True).read())
    image = tmp_path / "lazyfs.erofs"
    with ErofsSource(raw) as source:
        _write(source, image)
    fsck_erofs(image)
    assert compare_trees(scan_erofs(raw), scan_erofs(image)) == []
    if os.geteuid() == 0:
        with mounted_erofs(raw, tmp_path / "a") as first, \
                mounted_erofs(image, tmp_path / "b") as second:
            assert compare_trees(scan_directory(first), scan_directory(second)) == []
            assert _stat_of(first) == _stat_of(second)


def test_compressed_images_cannot_be_written_anew(tmp_path: Path) -> None:
    from converter.mkfs import build_erofs

    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(b"compressible " * 10_000)
    image = tmp_path / "image.erofs"
    build_erofs(src, image, compression="lz4hc")
    with pytest.raises(ConvertError, match="compressed"):
        ErofsSource(image)


def test_metadata_written_in_place_as_in_memory(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Metadata beyond the memory budget is written piece by piece, to the same bytes."""
    data = rich_layer().tar()
    in_memory, in_place = tmp_path / "memory.erofs", tmp_path / "place.erofs"
    _write(_tar_source(data), in_memory)
    monkeypatch.setattr("converter.erofs.writer.METADATA_BUFFER_BYTES", 0)
    _write(_tar_source(data), in_place)
    assert in_memory.read_bytes() == in_place.read_bytes()


def test_identical_blocks_already_written_are_read_back(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A block shared with one written out before (not in the buffer any more) is compared
    with the image's bytes; one whose key matches but whose bytes differ is stored anew."""
    monkeypatch.setattr("converter.erofs.writer._FLUSH_BYTES", BLOCK)
    src = _plain_tree(tmp_path / "src")
    image = tmp_path / "image.erofs"
    assert _write(DirectorySource(src), image).shared_blocks == 9
    monkeypatch.setattr("converter.erofs.writer.block_key", lambda block: 7)  # all collide
    colliding = tmp_path / "colliding.erofs"
    result = _write(DirectorySource(src), colliding)
    # One key for all: the index holds the first block stored (" space"), and only blocks
    # with its bytes share it; every other block is stored anew, none wrongly shared.
    assert result.shared_blocks == 3
    assert compare_trees(scan_directory(src), scan_erofs(colliding), ignore={"owner"}) == []


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_sparse_tar_members(tmp_path: Path, tar_format: str) -> None:
    """GNU tar's sparse members (read through tarfile, which assembles them) beside plain
    ones (read straight from the stream)."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    src = tmp_path / "src"
    src.mkdir()
    (src / "before").write_bytes(os.urandom(10000))
    with open(src / "sparse", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"in the middle")
    (src / "after").write_bytes(os.urandom(5000))
    layer = tmp_path / "layer.tar"
    subprocess.run(["tar", "--sparse", f"--format={tar_format}", "-cf", str(layer), "-C",
                    str(src), "before", "sparse", "after"], check=True)
    image = tmp_path / "image.erofs"
    _write(TarSource(lambda: open(layer, "rb")), image)  # noqa: SIM115 - TarSource closes it
    found = scan_erofs(image)
    expected = scan_directory(src)
    for name in ("before", "sparse", "after"):
        assert (found[name].size, found[name].sha256) == (expected[name].size,
                                                          expected[name].sha256)
