"""Which fsck.erofs runs, what it can decode, and what its answer means: a tool too old for
an image's compression is never taken for a fault of the image. Fake tools (scripts that
answer as erofs-utils 1.5 does) pin the rules; the real ones confirm them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from converter.errors import ConvertError
from converter.fsck import (
    ENV_FSCK_EROFS,
    FsckOutcome,
    FsckTool,
    check_erofs_image,
    find_fsck_erofs,
    local_prefix,
)

ZSTD_DETAIL = "this image uses zstd compression, which fsck.erofs 1.5 cannot decode"


def fake_tool(directory: Path, version_line: str, *, exit_status: int = 0,
              answer: str = "") -> Path:
    """A fsck.erofs that prints `version_line` for -V and otherwise `answer`, exiting so."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fsck.erofs"
    path.write_text(f"""#!/bin/sh
if [ "$1" = -V ]; then printf '%s\\n' "{version_line}"; exit 0; fi
echo "$@" >> "{directory}/calls"
printf '%s\\n' "{answer}" >&2
exit {exit_status}
""")
    path.chmod(0o755)
    return path


def raw_image(blob: Path, out: Path) -> Path:
    with open(blob, "rb") as f, open(out, "wb") as image:
        zstandard.ZstdDecompressor().copy_stream(f, image, read_size=1 << 20)
    return out


@pytest.fixture
def zstd_image(tmp_path: Path, vectors_dir: Path) -> Path:
    return raw_image(vectors_dir / "ctd-zstd-erofs.blob", tmp_path / "zstd.erofs")


def capable_fsck() -> FsckTool:
    """The erofs-utils tools/setup builds; skipped where it is not built, except in CI."""
    path = local_prefix() / "bin" / "fsck.erofs"
    if not os.access(path, os.X_OK):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is missing (CI=true: tools/setup builds it)")
        pytest.skip(f"{path} is missing: run tools/setup")
    return find_fsck_erofs(path)


def test_what_a_version_can_decode() -> None:
    old = FsckTool("/x", "1.5", None)
    assert [old.can_decode(a) for a in ("lz4", "lzma", "deflate", "zstd")] == [
        True, None, False, False]  # lzma: only when built with liblzma
    assert FsckTool("/x", "1.7.1", None).can_decode("deflate") is True
    assert FsckTool("/x", "1.7.1", None).can_decode("zstd") is False
    assert FsckTool("/x", None, None).can_decode("zstd") is None
    assert FsckTool("/x", "1.5", None).can_decode("algorithm 7") is None
    listed = FsckTool("/x", "1.8.6", frozenset({"lz4", "lz4hc", "libdeflate", "zstd"}))
    assert [listed.can_decode(a) for a in ("lz4", "lzma", "deflate", "zstd")] == [
        True, False, True, True]


def test_the_version_and_decompressors_it_prints(tmp_path: Path) -> None:
    old = find_fsck_erofs(fake_tool(tmp_path / "a", "fsck.erofs 1.5"))
    assert (old.version, old.decompressors, old.name) == ("1.5", None, "fsck.erofs 1.5")
    new = find_fsck_erofs(fake_tool(
        tmp_path / "b", "fsck.erofs (erofs-utils) 1.8.6\navailable decompressors: lz4, zstd"))
    assert (new.version, new.decompressors) == ("1.8.6", frozenset({"lz4", "zstd"}))


def test_which_fsck_is_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = fake_tool(tmp_path / "given", "fsck.erofs 1.8")
    from_env = fake_tool(tmp_path / "env", "fsck.erofs 1.7")
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    local = fake_tool(tmp_path / "venv" / "erofs-utils" / "bin", "fsck.erofs 1.9")
    monkeypatch.setenv(ENV_FSCK_EROFS, str(from_env))
    assert find_fsck_erofs(given).path == str(given)
    assert find_fsck_erofs().path == str(from_env)
    monkeypatch.delenv(ENV_FSCK_EROFS)
    assert find_fsck_erofs().path == str(local)
    local.unlink()
    monkeypatch.setenv("PATH", str(tmp_path / "given"))
    assert find_fsck_erofs().path == str(given)
    with pytest.raises(ConvertError, match=r"--fsck-erofs: .*/missing is not an executable"):
        find_fsck_erofs(tmp_path / "missing")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConvertError, match=r"fsck\.erofs not found: install erofs-utils"):
        find_fsck_erofs()


def test_a_tool_too_old_for_zstd_is_not_run(tmp_path: Path, zstd_image: Path) -> None:
    old = fake_tool(tmp_path / "old", "fsck.erofs 1.5")
    outcome = check_erofs_image(zstd_image, find_fsck_erofs(old))
    assert outcome.problem is None and not outcome.ran
    assert outcome.not_checked is not None and outcome.not_checked.startswith(ZSTD_DETAIL)
    assert "erofs-utils >= 1.8 can" in outcome.not_checked
    assert not (tmp_path / "old" / "calls").exists()
    built_without = fake_tool(tmp_path / "new", "fsck.erofs (erofs-utils) 1.8.6\n"
                                                "available decompressors: lz4, lzma")
    outcome = check_erofs_image(zstd_image, find_fsck_erofs(built_without))
    assert outcome.not_checked is not None and "built without zstd" in outcome.not_checked


def test_an_answer_that_it_cannot_decode(tmp_path: Path, zstd_image: Path) -> None:
    """A tool whose version leaves it open (none printed) is run; its refusal of an algorithm
    the superblock lists means it cannot check, and anything else is a problem."""
    refusing = fake_tool(tmp_path / "refusing", "fsck.erofs git", exit_status=1,
                         answer="<E> erofs: unknown compression format 3 for nid 4911")
    outcome = check_erofs_image(zstd_image, find_fsck_erofs(refusing))
    assert outcome.ran and outcome.problem is None
    assert outcome.not_checked is not None and "unknown compression format 3" in outcome.not_checked
    other = fake_tool(tmp_path / "other", "fsck.erofs git", exit_status=1,
                      answer="<E> erofs: unknown compression format 1 for nid 4911")
    outcome = check_erofs_image(zstd_image, find_fsck_erofs(other))
    assert outcome.not_checked is None  # lzma is not what this image uses: a real fault
    assert outcome.problem is not None and "exit status 1" in outcome.problem
    broken = fake_tool(tmp_path / "broken", "fsck.erofs 1.8", exit_status=1,
                       answer="<E> erofs: bad dirent")
    assert check_erofs_image(zstd_image, find_fsck_erofs(broken)).problem is not None


def test_the_installed_fsck_on_containerd_zstd_vector(zstd_image: Path) -> None:
    """Debian 12's fsck.erofs (1.5) stops on this valid image; it is not run on it."""
    found = shutil.which("fsck.erofs")
    if found is None:
        pytest.skip("fsck.erofs is not installed")
    tool = find_fsck_erofs(found)
    if tool.can_decode("zstd") is not False:
        pytest.skip(f"{tool.name} decodes zstd")
    direct = subprocess.run([found, "--extract", str(zstd_image)], capture_output=True,
                            text=True, check=False)
    assert direct.returncode != 0 and "unknown compression format 3" in direct.stderr
    outcome = check_erofs_image(zstd_image, tool)
    assert outcome.problem is None and outcome.not_checked is not None


def test_a_capable_fsck_checks_containerd_zstd_vector(tmp_path: Path, zstd_image: Path) -> None:
    tool = capable_fsck()
    assert tool.can_decode("zstd") is True
    assert check_erofs_image(zstd_image, tool) == FsckOutcome()
    outcome = check_erofs_image(zstd_image, tool, extract_to=tmp_path / "tree")
    assert outcome.problem is None and outcome.not_checked is None
    assert (tmp_path / "tree").is_dir()
    # A damaged image is still a problem for it: cut the file data off.
    damaged = tmp_path / "damaged.erofs"
    damaged.write_bytes(zstd_image.read_bytes()[: zstd_image.stat().st_size // 2])
    outcome = check_erofs_image(damaged, tool)
    assert outcome.problem is not None and outcome.not_checked is None


def test_not_an_erofs_image(tmp_path: Path) -> None:
    path = tmp_path / "zeros"
    path.write_bytes(bytes(8192))
    with pytest.raises(ConvertError, match="zeros: EROFS superblock: field magic"):
        check_erofs_image(path, FsckTool("/bin/false", "1.8", None))
