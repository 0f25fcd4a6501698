"""`lazyfs inspect` on containerd's vectors, with and without their descriptors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, run_lazyfs

VECTORS = ("basic-noverity", "basic-verity-64k")


def _json(*args: str | Path) -> dict[str, object]:
    result = run_lazyfs("inspect", *args, "--json")
    assert result.returncode == 0, result.stderr
    info: dict[str, object] = json.loads(result.stdout)
    return info


@pytest.mark.parametrize("name", VECTORS)
def test_vectors_with_descriptor(vectors_dir: Path, name: str) -> None:
    blob = vectors_dir / f"{name}.blob"
    descriptor = json.loads((vectors_dir / f"{name}.descriptor.json").read_text())
    annotations = descriptor["annotations"]
    files = json.loads((vectors_dir / f"{name}.files.json").read_text())
    info = _json(blob)
    assert info["authenticated"] is True
    assert info["descriptor"] == str(vectors_dir / f"{name}.descriptor.json")
    assert info["blob_size"] == descriptor["size"]
    assert info["image_size"] == files["raw_erofs_size"]
    assert info["chunk_digest"] == annotations["dev.containerd.erofs.zstd.chunk_digest"]
    table_offset = int(annotations["dev.containerd.erofs.zstd.chunk_table_offset"])
    layout = info["layout"]
    assert isinstance(layout, list)
    assert layout[0] == {"what": "data frames", "offset": 0, "size": table_offset,
                         "frames": info["chunk_count"]}
    assert layout[1]["offset"] == table_offset
    # The regions tile the blob.
    assert sum(region["size"] for region in layout) == descriptor["size"]
    frames = info["frames"]
    assert isinstance(frames, list) and len(frames) == info["chunk_count"]
    sizes = [frame["size"] for frame in frames]
    assert info["compressed_frame_size"] == {"min": min(sizes), "max": max(sizes),
                                             "avg": round(sum(sizes) / len(sizes))}
    verity = info["verity"]
    if "dev.containerd.erofs.dmverity.offset" in annotations:
        assert info["metadata_order"] == ["chunk table", "dm-verity"]
        assert isinstance(verity, dict)
        assert verity["root_digest"] == annotations["dev.containerd.erofs.dmverity.root_digest"]
        assert verity["root_source"] == "descriptor"
        assert (verity["hash"], verity["hash_type"], verity["salt"]) == ("sha512", 1, "")
        assert verity["data_blocks"] == -(-files["raw_erofs_size"] // 4096)
        assert [level["blocks"] for level in verity["levels"]] == [3, 1]
    else:
        assert info["metadata_order"] == ["chunk table"]
        assert verity is None


def test_without_descriptor_is_marked_unauthenticated(tmp_path: Path, vectors_dir: Path) -> None:
    blob = tmp_path / "copy.blob"
    shutil.copyfile(vectors_dir / "basic-verity-64k.blob", blob)
    with_descriptor = _json(vectors_dir / "basic-verity-64k.blob")
    info = _json(blob)
    assert info["authenticated"] is False and info["descriptor"] is None
    for key in ("layout", "chunk_digest", "chunk_count", "frames"):
        assert info[key] == with_descriptor[key], key
    verity, expected = info["verity"], with_descriptor["verity"]
    assert isinstance(verity, dict) and isinstance(expected, dict)
    assert verity["root_digest"] == expected["root_digest"]
    assert verity["root_source"] == "computed, not authenticated"
    text = run_lazyfs("inspect", blob)
    assert text.returncode == 0
    assert "NOT AUTHENTICATED" in text.stdout
    assert "computed, not authenticated" in text.stdout
    explicit = _json(blob, "--descriptor", vectors_dir / "basic-verity-64k.descriptor.json")
    assert explicit["authenticated"] is True


def test_text_output(vectors_dir: Path) -> None:
    result = run_lazyfs("inspect", vectors_dir / "basic-verity-64k.blob", "--chunks")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("blob ")
    assert any(line.startswith("metadata      chunk table, then dm-verity") for line in lines)
    assert any("11 chunks of 64.0 KiB" in line for line in lines)
    assert any(line.split()[:4] == ["10", "473545", "21901", "49152"] for line in lines)


def test_bad_input_is_one_line(tmp_path: Path, vectors_dir: Path) -> None:
    assert_one_line_error(run_lazyfs("inspect", tmp_path / "missing"), "missing")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 5000)
    assert_one_line_error(run_lazyfs("inspect", junk), "not a seekable EROFS blob")
    other = vectors_dir / "basic-noverity.descriptor.json"
    assert_one_line_error(
        run_lazyfs("inspect", vectors_dir / "basic-verity-64k.blob", "--descriptor", other),
        "the descriptor is for another blob")
    descriptor = json.loads((vectors_dir / "basic-verity-64k.descriptor.json").read_text())
    descriptor["annotations"]["dev.containerd.erofs.zstd.chunk_digest"] = "sha512:" + "0" * 128
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(descriptor))
    assert_one_line_error(
        run_lazyfs("inspect", vectors_dir / "basic-verity-64k.blob", "--descriptor", forged),
        "chunk table digest mismatch")
    forged.write_text("{not json")
    assert_one_line_error(
        run_lazyfs("inspect", vectors_dir / "basic-verity-64k.blob", "--descriptor", forged),
        "not valid JSON")
