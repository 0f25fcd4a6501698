"""`lazyfs verify` and `lazyfs unpack`: containerd's vectors pass and unpack to their listing;
every kind of damage is reported, each problem on its own line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.mkfs import build_erofs
from tests.cli import assert_one_line_error, lazyfs_env, run_lazyfs
from tests.converter import mounted_erofs, rich_layer
from tests.layer.helpers import flip_byte

VECTORS = ("basic-noverity", "basic-verity-64k")


@pytest.fixture
def corrupted(tmp_path: Path, vectors_dir: Path) -> Path:
    """A copy of the verity vector with its descriptor, two frames damaged."""
    blob = tmp_path / "damaged.blob"
    shutil.copyfile(vectors_dir / "basic-verity-64k.blob", blob)
    shutil.copyfile(vectors_dir / "basic-verity-64k.descriptor.json",
                    tmp_path / "damaged.descriptor.json")
    blob.chmod(0o644)
    flip_byte(blob, 1000)  # chunk 0
    flip_byte(blob, 200_000)  # chunk 3
    return blob


@pytest.mark.parametrize("name", VECTORS)
def test_vectors_verify(vectors_dir: Path, name: str) -> None:
    result = run_lazyfs("verify", vectors_dir / f"{name}.blob")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "OK"
    assert f"  descriptor   {vectors_dir / name}.descriptor.json" in lines
    assert any(line.startswith("  fsck.erofs   every file decodes") for line in lines)
    descriptor = json.loads((vectors_dir / f"{name}.descriptor.json").read_text())
    if "dev.containerd.erofs.dmverity.offset" not in descriptor["annotations"]:
        assert "  dm-verity    none in this blob" in lines
    elif shutil.which("veritysetup"):
        assert "  veritysetup  verify ok" in lines


def _listing(root: Path) -> Iterator[dict[str, object]]:
    """Entries as the vectors' files.json lists them."""
    for directory, names, files in os.walk(root):
        for name in sorted(names + files):
            full = Path(directory) / name
            info = full.lstat()
            entry: dict[str, object] = {"path": str(full.relative_to(root)),
                                        "mode": oct(info.st_mode), "uid": info.st_uid,
                                        "gid": info.st_gid}
            if stat.S_ISREG(info.st_mode):
                entry["size"] = info.st_size
                entry["sha256"] = hashlib.sha256(full.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                entry["target"] = os.readlink(full)
            yield entry


@pytest.mark.root
@pytest.mark.parametrize("name", VECTORS)
def test_vectors_unpack_to_their_listing(tmp_path: Path, vectors_dir: Path, name: str) -> None:
    expected = json.loads((vectors_dir / f"{name}.files.json").read_text())
    raw = tmp_path / "image.erofs"
    result = run_lazyfs("unpack", vectors_dir / f"{name}.blob", "-o", raw)
    assert result.returncode == 0, result.stderr
    assert "every check passed (authenticated by" in result.stdout
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == expected["raw_erofs_sha256"]
    with mounted_erofs(raw, tmp_path / "mnt") as root:
        found = sorted(_listing(root), key=lambda entry: str(entry["path"]))
    assert found == sorted(expected["files"], key=lambda entry: entry["path"])


def test_damage_is_listed_problem_by_problem(corrupted: Path) -> None:
    result = run_lazyfs("verify", corrupted)
    assert result.returncode == 1
    assert result.stderr == ""
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert [p.split(":")[2].split("(")[0].strip() for p in problems[:2]] == ["chunk 0",
                                                                            "chunk 3"]
    assert "blob digest mismatch" in problems[2]
    assert len(problems) == 3
    assert result.stdout.splitlines()[-1] == "FAILED: 3 problems"
    assert "Traceback" not in result.stdout


def test_unpack_stops_at_damage_and_writes_nothing(tmp_path: Path, corrupted: Path) -> None:
    raw = tmp_path / "out.raw"
    assert_one_line_error(run_lazyfs("unpack", corrupted, "-o", raw), "chunk 0",
                          "SHA-512 mismatch")
    assert not raw.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.raw")] == []


def test_unpack_refuses_to_overwrite(tmp_path: Path, vectors_dir: Path) -> None:
    raw = tmp_path / "out.raw"
    raw.write_bytes(b"keep")
    assert_one_line_error(run_lazyfs("unpack", vectors_dir / "basic-noverity.blob", "-o", raw),
                          "exists")
    assert raw.read_bytes() == b"keep"
    forced = run_lazyfs("unpack", vectors_dir / "basic-noverity.blob", "-o", raw, "--force")
    assert forced.returncode == 0, forced.stderr


def test_without_descriptor(tmp_path: Path, vectors_dir: Path) -> None:
    blob = tmp_path / "lonely.blob"
    shutil.copyfile(vectors_dir / "basic-verity-64k.blob", blob)
    result = run_lazyfs("verify", blob)
    assert result.returncode == 0, result.stdout
    assert "NOT AUTHENTICATED" in result.stdout
    unpacked = run_lazyfs("unpack", blob, "-o", tmp_path / "raw")
    assert unpacked.returncode == 0
    assert "NOT AUTHENTICATED" in unpacked.stderr
    assert "(not authenticated)" in unpacked.stdout


def test_image_that_fsck_rejects(tmp_path: Path) -> None:
    """A blob that is sound as a blob, holding a truncated EROFS image."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(b"compressible " * 100_000)
    image = tmp_path / "image.erofs"
    build_erofs(src, image, compression="lz4hc")
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    blob = tmp_path / "layer.blob"
    assert run_lazyfs("convert", image, "-o", blob).returncode == 0
    result = run_lazyfs("verify", blob)
    assert result.returncode == 1
    assert "  fsck.erofs   FAILED (1 problem)" in result.stdout
    assert "problem: fsck.erofs: fsck.erofs of" in result.stdout


@pytest.mark.root
def test_against_a_different_tar_layer(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar.zst"
    layer.write_bytes(rich_layer().zstd())
    blob = tmp_path / "layer.blob"
    assert run_lazyfs("convert", layer, "-o", blob).returncode == 0
    assert run_lazyfs("verify", blob, "--against", layer).returncode == 0
    changed = rich_layer().file("etc/passwd", b"changed\n").dir("extra", mode=0o700)
    other = tmp_path / "other.tar"
    other.write_bytes(changed.tar())
    result = run_lazyfs("verify", blob, "--against", other)
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert problems == ["problem: against: etc/passwd: size: expected 8, found 26",
                        "problem: against: missing: extra (dir)"]


def test_against_needs_a_tree_source(tmp_path: Path, vectors_dir: Path) -> None:
    blob = vectors_dir / "basic-noverity.blob"
    assert_one_line_error(run_lazyfs("verify", blob, "--against", blob),
                          "give a directory or a tar layer")


@pytest.mark.root
def test_against_without_root_compares_an_extracted_copy(vectors_dir: Path) -> None:
    """Without root the image cannot be mounted: fsck.erofs extracts it, and what 1.5's
    extraction cannot restore is named instead of compared."""
    with tempfile.TemporaryDirectory(prefix="lazyfs-test-") as work_dir:
        work = Path(work_dir)
        work.chmod(0o755)
        src = work / "src"
        src.mkdir()
        (src / "shared").write_bytes(b"everyone may write this\n")
        (src / "shared").chmod(0o666)  # survives the umask of the extraction
        (src / "dir").mkdir()
        os.symlink("../shared", src / "dir" / "link")
        blob = work / "layer.blob"
        assert run_lazyfs("convert", src, "-o", blob).returncode == 0
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run(
            [*nobody, sys.executable, "-m", "lazyfs", "verify", str(blob), "--against", str(src)],
            capture_output=True, text=True, timeout=300, env=lazyfs_env(TMPDIR=work_dir),
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert ("(extracted by fsck.erofs); not compared: xattrs, hardlinks, owner"
                in result.stdout)
        (src / "shared").write_bytes(b"changed")
        result = subprocess.run(
            [*nobody, sys.executable, "-m", "lazyfs", "verify", str(blob), "--against", str(src)],
            capture_output=True, text=True, timeout=300, env=lazyfs_env(TMPDIR=work_dir),
            check=False,
        )
        assert result.returncode == 1
        assert "problem: against: shared: size: expected 7, found 24" in result.stdout
