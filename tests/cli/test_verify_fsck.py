"""`lazyfs verify` of images a fsck.erofs may be too old for: containerd's zstd vector is
valid, so a tool that cannot decode zstd (Debian 12's erofs-utils 1.5) turns no check into a
failure: the output says what was not checked and why, every other check still runs, and the
exit status is 0. With the erofs-utils tools/setup builds, the vector is checked in full."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from converter.fsck import ENV_FSCK_EROFS, local_prefix
from tests.cli import assert_one_line_error, lazyfs_env, run_lazyfs
from tests.converter.test_fsck import capable_fsck, fake_tool

NOT_RUN = ("  fsck.erofs   not run: this image uses zstd compression, which fsck.erofs 1.5 "
           "cannot decode; erofs-utils >= 1.8 can")


def _lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def test_zstd_vector_with_a_fsck_too_old_for_it(tmp_path: Path, vectors_dir: Path) -> None:
    old = fake_tool(tmp_path / "old", "fsck.erofs 1.5")
    blob = vectors_dir / "ctd-zstd-erofs.blob"
    for result in (run_lazyfs("verify", blob, "--fsck-erofs", old),
                   run_lazyfs("verify", blob, **{ENV_FSCK_EROFS: str(old)})):
        lines = _lines(result)
        assert any(line.startswith(NOT_RUN) for line in lines), lines
        assert lines[-1] == "OK (not checked: fsck.erofs)"
        # Every other check ran.
        assert any(line.startswith("  frames       1 frame: SHA-512 and decoded size ok")
                   for line in lines)
        assert any(line.startswith("  dm-verity    tree and 799 data blocks ok") for line in lines)
    assert not (tmp_path / "old" / "calls").exists()


def test_zstd_vector_with_debian_12s_fsck(vectors_dir: Path) -> None:
    path = Path("/usr/bin/fsck.erofs")  # where Debian's erofs-utils puts it
    if not path.exists():
        pytest.skip(f"{path} is not installed")
    version = subprocess.run([path, "-V"], capture_output=True, text=True, check=False).stdout
    if version.split() != ["fsck.erofs", "1.5"]:
        pytest.skip(f"not Debian 12's fsck.erofs 1.5: {version.strip()!r}")
    lines = _lines(run_lazyfs("verify", vectors_dir / "ctd-zstd-erofs.blob", "--fsck-erofs",
                              path))
    assert any(line.startswith(NOT_RUN) for line in lines), lines
    assert lines[-1] == "OK (not checked: fsck.erofs)"


def test_zstd_vector_fully_checked_with_the_fsck_setup_builds(vectors_dir: Path) -> None:
    tool = capable_fsck()
    env = {k: v for k, v in lazyfs_env().items() if k != ENV_FSCK_EROFS}
    result = subprocess.run([sys.executable, "-m", "lazyfs", "verify",
                             str(vectors_dir / "ctd-zstd-erofs.blob")],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    lines = _lines(result)
    assert f"  fsck.erofs   every file decodes ({tool.name})" in lines
    assert lines[-1] == "OK"


def test_a_fsck_that_cannot_be_run_is_a_user_error(tmp_path: Path, vectors_dir: Path) -> None:
    blob = vectors_dir / "basic-noverity.blob"
    assert_one_line_error(run_lazyfs("verify", blob, "--fsck-erofs", tmp_path / "nope"),
                          "--fsck-erofs", "is not an executable file")
    assert_one_line_error(run_lazyfs("verify", blob, **{ENV_FSCK_EROFS: str(tmp_path)}),
                          f"${ENV_FSCK_EROFS}")


def _zstd_layer(directory: Path) -> tuple[Path, Path]:
    """A directory, and the seekable blob of its zstd-compressed EROFS image."""
    mkfs = local_prefix() / "bin" / "mkfs.erofs"
    capable_fsck()  # built together
    src = directory / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "data").write_bytes(b"compressible " * 50_000)
    (src / "etc" / "data").chmod(0o644)
    image = directory / "image.erofs"
    subprocess.run([mkfs, "--quiet", "-zzstd", "-C65536", image, src], check=True,
                   capture_output=True)
    blob = directory / "layer.blob"
    assert run_lazyfs("convert", image, "-o", blob).returncode == 0
    return src, blob


@pytest.mark.root
def test_against_still_compares_the_mounted_tree(tmp_path: Path) -> None:
    src, blob = _zstd_layer(tmp_path)
    old = fake_tool(tmp_path / "old", "fsck.erofs 1.5")
    lines = _lines(run_lazyfs("verify", blob, "--against", src, "--fsck-erofs", old))
    assert any(line.startswith(NOT_RUN) for line in lines), lines
    assert any(line.startswith("  against") and "mounted read-only" in line for line in lines)
    assert lines[-1] == "OK (not checked: fsck.erofs)"


@pytest.mark.root
def test_against_without_a_mount_or_a_capable_fsck() -> None:
    """Without root the image cannot be mounted, and an old fsck.erofs cannot extract it: the
    comparison is said to be not made, not failed."""
    with tempfile.TemporaryDirectory(prefix="lazyfs-test-") as work_dir:
        work = Path(work_dir)
        work.chmod(0o755)
        src, blob = _zstd_layer(work)
        old = fake_tool(work / "old", "fsck.erofs 1.5")
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run(
            [*nobody, sys.executable, "-m", "lazyfs", "verify", str(blob), "--against",
             str(src), "--fsck-erofs", str(old)],
            capture_output=True, text=True, timeout=300, env=lazyfs_env(TMPDIR=work_dir),
            check=False)
    lines = _lines(result)
    assert any(line.startswith(NOT_RUN) for line in lines), lines
    assert ("  against      not checked: the image cannot be mounted here, and this fsck.erofs "
            "cannot extract it (see fsck.erofs above)") in lines
    assert lines[-1] == "OK (not checked: fsck.erofs, against)"
