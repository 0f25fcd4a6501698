"""Start-up order: the file blocks a recorded start read go right after the metadata, in the
order they were read, whatever the layer's source (a directory, a tar layer, the raw image or
the seekable blob that was recorded); the tree stays the same, fsck.erofs 1.5 passes, and the
new layer carries its prefetch list. Recordings are made here from the recorded image's own
block maps (a real `--record` is in tests/mount/test_startup_order.py)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import trio

from converter.erofs.image_inodes import ErofsSource
from converter.erofs.inode_tree import walk
from converter.erofs.startup_order import (
    LayoutMismatchError,
    NoStartupOrderError,
    in_order,
    layer_for_size,
    startup_prefetch,
)
from converter.erofs.writer import ImageResult
from converter.erofs_tree import scan_erofs
from converter.errors import ConvertError
from converter.image.convert import convert_image
from converter.image.sources import open_image_source
from converter.layer import ConvertOptions, ConvertResult, convert_layer
from converter.layer_image import decode_seekable
from converter.mkfs import fsck_erofs
from converter.tree import compare_trees, scan_directory, scan_tar
from lazyfs.format.descriptor import parse_descriptor
from lazyfs.format.prefetch_list import (
    ANNOTATION_PREFETCH,
    LayerPrefetch,
    PrefetchList,
    parse_prefetch_annotation,
)
from tests.converter import LayerBuilder
from tests.support.images import busybox_layers, write_oci_image

BLOCK = 4096
CHUNK = 64 * 1024
# What a start read, in order: file blocks (and the superblock, which is no file's).
READS = [("bin/tool", 2), ("etc/conf", 0), ("bin/tool", 0), ("lib/libz.so", 5),
         ("lib/libz.so", 6), ("etc/conf", 1)]


def _tree(root: Path) -> Path:
    for name, blocks in (("bin/tool", 4), ("etc/conf", 2), ("lib/libz.so", 8),
                         ("share/doc", 3), ("share/zeros", 0)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(blocks * BLOCK + 100))
    (root / "share/zeros").write_bytes(bytes(5 * BLOCK))
    (root / "etc/copy").write_bytes((root / "etc/conf").read_bytes())  # blocks shared
    return root


def _layer() -> LayerBuilder:
    layer = LayerBuilder()
    for name, blocks in (("bin/tool", 4), ("etc/conf", 2), ("lib/libz.so", 8),
                         ("share/doc", 3)):
        layer.file(name, os.urandom(blocks * BLOCK + 100))
    return layer


def _options(**fields: object) -> ConvertOptions:
    from converter.encoder import EncodeOptions

    return ConvertOptions(encode=EncodeOptions(chunk_size=CHUNK), **fields)  # type: ignore[arg-type]


def _raw(blob: Path, work: Path) -> Path:
    raw = work / (blob.name + ".erofs")
    decode_seekable(blob, raw)
    return raw


def _block_of(raw: Path) -> dict[tuple[str, int], int]:
    """(path, file block) -> image block, for every stored file block of an image."""
    with ErofsSource(raw) as source:
        paths = {}
        for path, node in walk(source.root):
            paths.setdefault(node, os.fsdecode(path))
        found: dict[tuple[str, int], int] = {}
        for block, node, number in source.blocks_of(BLOCK):
            found.setdefault((paths[node], number), block)
    return found


def _recording(result: ConvertResult, raw: Path, reads: list[tuple[str, int]],
               layout: str = "") -> PrefetchList:
    """The list a start that read `reads` from the layer `result` would have recorded (with
    the layout fingerprint `layout`; "": as a list of an older lazyfs)."""
    where = _block_of(raw)
    blocks = (0, *(where[read] for read in reads))
    annotations = result.descriptor.annotations
    return PrefetchList((LayerPrefetch(
        annotations["dev.containerd.erofs.zstd.chunk_digest"], result.encoded.chunk_count,
        (0,), "layer", blocks, BLOCK, result.encoded.image_size, layout),))


def _check_order(result: ConvertResult, raw: Path, reads: list[tuple[str, int]]) -> None:
    assert result.startup_end is not None and result.prefetch is not None
    where = _block_of(raw)
    first = result.startup_end // BLOCK - len(reads)
    assert [where[read] for read in reads] == list(range(first, first + len(reads)))
    chunks = -(-result.startup_end // CHUNK)
    assert result.prefetch.chunks == tuple(range(chunks))
    descriptor = parse_descriptor(result.descriptor_path.read_bytes())
    carried = parse_prefetch_annotation(descriptor.annotations[ANNOTATION_PREFETCH], "x")
    assert carried.chunks == result.prefetch.chunks
    assert carried.chunk_digest == descriptor.annotations[
        "dev.containerd.erofs.zstd.chunk_digest"]
    fsck_erofs(raw)


@pytest.mark.parametrize("source", ["directory", "tar", "raw image", "seekable blob"])
def test_the_blocks_a_start_read_come_first(tmp_path: Path, source: str) -> None:
    if source == "tar":
        data = _layer().gzip()
        src = tmp_path / "layer.tar.gz"
        src.write_bytes(data)
        expected = scan_tar(io.BytesIO(_layer_tar(data)))
    else:
        src = _tree(tmp_path / "tree")
        expected = scan_directory(src)
    recorded = convert_layer(src, tmp_path / "recorded.blob", _options())
    recorded_raw = _raw(tmp_path / "recorded.blob", tmp_path)
    reads = READS
    prefetch = _recording(recorded, recorded_raw, reads)
    if source == "raw image":
        src = recorded_raw
    elif source == "seekable blob":
        src = tmp_path / "recorded.blob"
    result = convert_layer(src, tmp_path / "ordered.blob", _options(startup_order=prefetch))
    raw = _raw(tmp_path / "ordered.blob", tmp_path)
    _check_order(result, raw, reads)
    assert compare_trees(expected, scan_erofs(raw), ignore={"owner"}) == []
    assert raw.stat().st_size == recorded_raw.stat().st_size  # only the order changed


def _layer_tar(gzipped: bytes) -> bytes:
    import gzip

    return gzip.decompress(gzipped)


def test_a_list_of_another_layer_is_refused(tmp_path: Path) -> None:
    src = _tree(tmp_path / "tree")
    recorded = convert_layer(src, tmp_path / "recorded.blob", _options())
    prefetch = _recording(recorded, _raw(tmp_path / "recorded.blob", tmp_path), READS)
    (src / "share/doc").write_bytes(os.urandom(40 * BLOCK))  # another layer now
    with pytest.raises(NoStartupOrderError, match="no recorded layer has an image of"):
        convert_layer(src, tmp_path / "x.blob", _options(startup_order=prefetch))
    chunks_only = PrefetchList((LayerPrefetch(prefetch.layers[0].chunk_digest, 3, (0, 1)),))
    with pytest.raises(ConvertError, match="records no blocks"):
        convert_layer(src, tmp_path / "x.blob", _options(startup_order=chunks_only))
    with pytest.raises(ConvertError, match="--startup-order: only lazyfs's writer"):
        from converter.erofs.writer import ErofsWriter

        convert_layer(src, tmp_path / "x.blob", _options(startup_order=prefetch,
                                                         erofs_writer=ErofsWriter.MKFS))
    assert not (tmp_path / "x.blob").exists()


def test_mapping_helpers() -> None:
    from converter.erofs.inode_tree import Node

    a, b = Node(0o100644, size=3 * BLOCK), Node(0o100644, size=BLOCK)
    owners = [(10, a, 0), (11, a, 1), (12, a, 2), (11, b, 0), (13, b, 0)]
    assert in_order([12, 0, 11, 99, 10], owners) == [(a, 2), (a, 1), (a, 0)]
    layers = PrefetchList((LayerPrefetch("sha512:" + "0" * 128, 2, (0,), "", (1,), BLOCK, 9000),
                           LayerPrefetch("sha512:" + "1" * 128, 2, (0,), "", (2,), BLOCK, 8000)))
    assert layer_for_size(layers, 8000, "x").chunk_digest.endswith("1")
    with pytest.raises(NoStartupOrderError, match="recorded: 9000, 8000"):
        layer_for_size(layers, 7000, "x")
    assert startup_prefetch("d", 10, CHUNK, 3 * CHUNK + 1).chunks == (0, 1, 2, 3)
    assert startup_prefetch("d", 2, CHUNK, 3 * CHUNK + 1).chunks == (0, 1)


@pytest.mark.root
def test_an_image_whose_recorded_layer_is_written_anew(tmp_path: Path) -> None:
    """The recorded seekable layer is decoded and written in start-up order with its new
    list and diff ID; the others pass through."""
    layout = tmp_path / "source"
    write_oci_image(layout, "v1", busybox_layers())

    async def convert(src: str, dest: Path, options: ConvertOptions) -> object:
        async with open_image_source(src) as source:
            return await convert_image(source, dest_layout=dest, layer_options=options,
                                       progress=lambda line: None)

    converted = tmp_path / "converted"
    first = trio.run(convert, f"{layout}:v1", converted, _options())
    layers = [outcome.result for outcome in first.layers]  # type: ignore[attr-defined]
    top = layers[-1]
    blob = converted / "blobs/sha256" / top.digest.partition(":")[2]
    raw = _raw(blob, tmp_path)
    reads = sorted(_block_of(raw))[:3]
    where = _block_of(raw)
    prefetch = PrefetchList((LayerPrefetch(
        top.annotations["dev.containerd.erofs.zstd.chunk_digest"],
        -(-raw.stat().st_size // CHUNK), (0,), "top", tuple(where[read] for read in reads),
        BLOCK, raw.stat().st_size),))
    second = trio.run(convert, f"{converted}", tmp_path / "ordered",
                      _options(startup_order=prefetch))
    actions = [outcome.action for outcome in second.layers]  # type: ignore[attr-defined]
    assert actions == ["passed"] * (len(layers) - 1) + ["reordered"]
    new = second.layers[-1]  # type: ignore[attr-defined]
    assert new.diff_id is not None and ANNOTATION_PREFETCH in new.result.annotations
    new_raw = _raw(tmp_path / "ordered/blobs/sha256" / new.result.digest.partition(":")[2],
                   tmp_path)
    assert compare_trees(scan_erofs(raw), scan_erofs(new_raw)) == []
    ordered = _block_of(new_raw)
    first = ordered[reads[0]]
    assert [ordered[read] for read in reads] == [first, first + 1, first + 2]
    config = json.loads((tmp_path / "ordered/blobs/sha256" / _config_digest(tmp_path / "ordered",
                                                                           second)).read_bytes())
    assert config["rootfs"]["diff_ids"][-1] == new.diff_id


def _config_digest(layout: Path, result: object) -> str:
    manifest = json.loads((layout / "blobs/sha256" /
                           result.digest.partition(":")[2]).read_bytes())  # type: ignore[attr-defined]
    return str(manifest["config"]["digest"]).partition(":")[2]


def _layout(result: ConvertResult) -> str:
    return result.descriptor.annotations["dev.lazyfs.layout"]


@pytest.mark.parametrize("source", ["directory", "tar"])
def test_a_list_recorded_on_the_same_layout_replays(tmp_path: Path, source: str) -> None:
    if source == "tar":
        src = tmp_path / "layer.tar.gz"
        src.write_bytes(_layer().gzip())
    else:
        src = _tree(tmp_path / "tree")
    recorded = convert_layer(src, tmp_path / "recorded.blob", _options())
    assert recorded.layout is not None and len(recorded.layout) == 32
    assert _layout(recorded) == recorded.layout
    prefetch = _recording(recorded, _raw(tmp_path / "recorded.blob", tmp_path), READS,
                          recorded.layout)
    result = convert_layer(src, tmp_path / "ordered.blob", _options(startup_order=prefetch))
    _check_order(result, _raw(tmp_path / "ordered.blob", tmp_path), READS)
    assert result.layout is not None and _layout(result) == result.layout != recorded.layout


def test_a_list_recorded_on_another_layout_is_refused(tmp_path: Path) -> None:
    """A start recorded on the layer in start-up order: an image of the same size whose
    blocks are elsewhere. Replayed from the tree, they would map to the wrong files."""
    src = _tree(tmp_path / "tree")
    recorded = convert_layer(src, tmp_path / "recorded.blob", _options())
    recorded_raw = _raw(tmp_path / "recorded.blob", tmp_path)
    first = _recording(recorded, recorded_raw, READS, recorded.layout or "")
    ordered = convert_layer(src, tmp_path / "ordered.blob", _options(startup_order=first))
    ordered_raw = _raw(tmp_path / "ordered.blob", tmp_path)
    assert ordered_raw.stat().st_size == recorded_raw.stat().st_size
    reads = [("share/doc", 1), ("bin/tool", 3)]
    again = _recording(ordered, ordered_raw, reads, _layout(ordered))
    with pytest.raises(LayoutMismatchError) as refused:
        convert_layer(src, tmp_path / "x.blob",
                      _options(startup_order=again, startup_order_source="start.json"))
    message = str(refused.value)
    assert message.startswith("start.json: layer layer was recorded on an image laid out")
    assert f"(layout {ordered.layout})" in message and f"(layout {recorded.layout})" in message
    assert "Record the start again on a layer converted by this lazyfs" in message
    assert "pass the recorded layer itself" in message
    assert not (tmp_path / "x.blob").exists()
    # The recorded layer itself as the source: its block maps map the blocks exactly.
    result = convert_layer(tmp_path / "ordered.blob", tmp_path / "y.blob",
                           _options(startup_order=again))
    _check_order(result, _raw(tmp_path / "y.blob", tmp_path), reads)


def test_the_fingerprint_is_the_placement_and_the_writer_options(tmp_path: Path) -> None:
    from converter.erofs.dir_inodes import DirectorySource
    from converter.erofs.startup_order import startup_by_replay
    from converter.erofs.writer import ImageOptions, write_image

    src = _tree(tmp_path / "tree")
    plain = write_image(DirectorySource(src), tmp_path / "plain.erofs")
    again = write_image(DirectorySource(src), tmp_path / "again.erofs",
                        ImageOptions(uuid=b"u" * 16))
    indexed = write_image(DirectorySource(src), tmp_path / "indexed.erofs",
                          ImageOptions(chunk_indexes=True))
    assert plain.layout == again.layout
    assert indexed.layout != plain.layout and indexed.image_size == plain.image_size

    def recorded(result: ImageResult) -> PrefetchList:
        return PrefetchList((LayerPrefetch("sha512:" + "0" * 128, 2, (0,), "layer", (0,),
                                           BLOCK, result.image_size, result.layout),))

    with pytest.raises(LayoutMismatchError, match=r"list\.json: layer layer was recorded"):
        startup_by_replay(DirectorySource(src), ImageOptions(), recorded(indexed), "list.json")
    assert startup_by_replay(DirectorySource(src), ImageOptions(chunk_indexes=True),
                             recorded(indexed), "list.json") == []  # block 0: no file's
    assert startup_by_replay(DirectorySource(src), ImageOptions(), recorded(plain),
                             "list.json") == []
