"""`lazyfs verify --against TAR` judges a layer by the conventions of the converter that made
it: containerd's (`mkfs.erofs --tar --aufs`: a root without a `./` entry is 0777, symlinks
keep their header's mode, directories holding whiteouts carry an empty
`trusted.overlay.origin`) or lazyfs's. containerd's conversion of the `ctd-tar-whiteouts`
vector verifies clean against its tar; every real difference, made by editing a copy of the
tar, is still caught and named: the path and what differs."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli import lazyfs_env, run_lazyfs

VECTOR = "ctd-tar-whiteouts"
MKFS_MATCH = "the image holds the same tree, as mkfs.erofs --tar --aufs makes it of the tar"

Members = list[tuple[tarfile.TarInfo, bytes | None]]


def _members(tar_gz: Path) -> Members:
    with tarfile.open(tar_gz) as archive:
        return [(member, archive.extractfile(member).read() if member.isfile() else None)
                for member in archive]  # type: ignore[union-attr]


def _write(members: Members, out: Path) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
        for member, data in members:
            archive.addfile(member, io.BytesIO(data) if data is not None else None)
    return out


def _find(members: Members, name: str) -> int:
    return next(i for i, (member, _) in enumerate(members) if member.name == name)


def _edit(name: str, change: Callable[[tarfile.TarInfo, bytes | None], bytes | None]
          ) -> Callable[[Members], None]:
    """An edit of the member `name`: `change` alters its header and returns its new data."""
    def apply(members: Members) -> None:
        index = _find(members, name)
        member, data = members[index]
        data = change(member, data)
        if data is not None:
            member.size = len(data)
        members[index] = (member, data)
    return apply


def _drop(name: str) -> Callable[[Members], None]:
    def apply(members: Members) -> None:
        del members[_find(members, name)]
    return apply


def _add(member: tarfile.TarInfo, data: bytes | None = None, *, first: bool = False
         ) -> Callable[[Members], None]:
    def apply(members: Members) -> None:
        member.size = len(data) if data is not None else 0
        members.insert(0 if first else len(members), (member, data))
    return apply


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, 1_700_000_000
    return info


def _set(**attributes: object) -> Callable[[tarfile.TarInfo, bytes | None], bytes | None]:
    def change(member: tarfile.TarInfo, data: bytes | None) -> bytes | None:
        for key, value in attributes.items():
            setattr(member, key, value)
        return data
    return change


def _unlink_hardlink(members: Members) -> None:
    """bin/tool-link: a copy of bin/tool instead of a hardlink to it."""
    data = members[_find(members, "bin/tool")][1]
    member = members[_find(members, "bin/tool-link")][0]
    member.type, member.linkname, member.mode = tarfile.REGTYPE, "", 0o755
    member.size = len(data or b"")
    members[_find(members, "bin/tool-link")] = (member, data)


# Each edit of the tar, and every problem line verify must print for it.
MUTATIONS: dict[str, tuple[Callable[[Members], None], list[str]]] = {
    "a changed byte": (
        _edit("etc/app.conf", lambda m, d: b"X" + (d or b"")[1:]),
        ["etc/app.conf: content: expected sha256 "]),
    "a longer file": (
        _edit("fresh/real", lambda m, d: (d or b"") + b"more"),
        ["fresh/real: size: expected 9, found 5"]),
    "a mode": (
        _edit("bin/tool", _set(mode=0o750)),
        ["bin/tool: mode: expected 0750, found 0755",  # and its hardlink: the same inode
         "bin/tool-link: mode: expected 0750, found 0755"]),
    "a symlink's mode": (
        _edit("bin/sym", _set(mode=0o600)),
        ["bin/sym: mode: expected 0600, found 0644"]),
    "the root's mode": (
        _add(_info("./", tarfile.DIRTYPE, 0o700), first=True),
        [".: mode: expected 0700, found 0777"]),
    "an owner": (
        _edit("etc/app.conf", _set(uid=1000, gid=100)),
        ["etc/app.conf: owner: expected 1000:100, found 0:0"]),
    "an xattr's value": (
        _edit("data", _set(pax_headers={"SCHILY.xattr.user.note": "bye"})),
        ["data: xattr user.note: expected b'bye', found b'hello'"]),
    "an xattr more": (
        _edit("etc", _set(pax_headers={"SCHILY.xattr.user.extra": "1"})),
        ["etc: xattr user.extra: missing, expected b'1'"]),
    "an xattr less": (
        _edit("data", _set(pax_headers={})),
        ["data: xattr user.note: unexpected, found b'hello'"]),
    "a symlink's target": (
        _edit("bin/sym", _set(linkname="other")),
        ["bin/sym: symlink target: expected 'other', found 'tool'"]),
    "a hardlink": (
        _unlink_hardlink,
        ["bin/tool: hardlinks: expected no other links, found links with bin/tool-link",
         "bin/tool-link: hardlinks: expected no other links, found links with bin/tool"]),
    "a file the image lacks": (
        _add(_info("etc/new", tarfile.REGTYPE, 0o644), b"new\n"),
        ["missing: etc/new (file)"]),
    "a file the tar lacks": (
        _drop("etc/app.conf"),
        ["extra: etc/app.conf (file)"]),
    "a whiteout the tar lacks": (
        _drop("fresh/.wh.ghost"),
        ["extra: fresh/ghost (chardev)",
         "fresh: xattr trusted.overlay.origin: unexpected, found b''"]),
    "an opaque directory the tar lacks": (
        _drop("opq/.wh..wh..opq"),
        ["opq: xattr trusted.overlay.opaque: unexpected, found b'y'"]),
}


def _problems(stdout: str) -> list[str]:
    return [line.removeprefix("problem: against: ") for line in stdout.splitlines()
            if line.startswith("problem: ")]


@pytest.mark.root
def test_containerds_conversion_verifies_against_its_tar(vectors_dir: Path) -> None:
    result = run_lazyfs("verify", vectors_dir / f"{VECTOR}.blob", "--against",
                        vectors_dir / f"{VECTOR}.tar.gz")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{MKFS_MATCH} (mounted read-only)" in result.stdout
    assert result.stdout.splitlines()[-1] == "OK"


@pytest.mark.root
def test_lazyfs_conversion_of_the_same_tar_verifies_by_its_own_conventions(
    tmp_path: Path, vectors_dir: Path
) -> None:
    blob = tmp_path / "layer.blob"
    converted = run_lazyfs("convert", vectors_dir / f"{VECTOR}.tar.gz", "-o", blob)
    assert converted.returncode == 0, converted.stderr
    result = run_lazyfs("verify", blob, "--against", vectors_dir / f"{VECTOR}.tar.gz")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "as lazyfs convert makes it of the tar (mounted read-only)" in result.stdout


@pytest.mark.root
def test_a_rewritten_copy_of_the_tar_still_matches(tmp_path: Path, vectors_dir: Path) -> None:
    """The mutations below edit such a copy: only the edit makes a difference."""
    copy = _write(_members(vectors_dir / f"{VECTOR}.tar.gz"), tmp_path / "copy.tar")
    result = run_lazyfs("verify", vectors_dir / f"{VECTOR}.blob", "--against", copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert MKFS_MATCH in result.stdout


@pytest.mark.root
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_every_real_difference_is_caught_and_named(
    tmp_path: Path, vectors_dir: Path, mutation: str
) -> None:
    edit, expected = MUTATIONS[mutation]
    members = _members(vectors_dir / f"{VECTOR}.tar.gz")
    edit(members)
    edited = _write(members, tmp_path / "edited.tar")
    result = run_lazyfs("verify", vectors_dir / f"{VECTOR}.blob", "--against", edited)
    assert result.returncode == 1, result.stdout + result.stderr
    problems = _problems(result.stdout)
    assert len(problems) == len(expected), result.stdout
    for line, start in zip(sorted(problems), sorted(expected), strict=True):
        assert line.startswith(start), (line, start)
    assert "from the tree mkfs.erofs --tar --aufs makes of the tar, the closest" in result.stdout


@pytest.mark.root  # to create whiteouts and read the vector as nobody in a private directory
def test_an_extracted_copy_is_judged_by_the_same_conventions(vectors_dir: Path) -> None:
    """Without root the image is extracted by fsck.erofs: symlinks lose the mode the image
    stores for them, so symlink modes join what is not compared."""
    with tempfile.TemporaryDirectory(prefix="lazyfs-test-") as work_dir:
        work = Path(work_dir)
        work.chmod(0o755)
        for suffix in (".blob", ".descriptor.json", ".tar.gz"):
            shutil.copyfile(vectors_dir / f"{VECTOR}{suffix}", work / f"{VECTOR}{suffix}")
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run(
            [*nobody, sys.executable, "-m", "lazyfs", "verify", str(work / f"{VECTOR}.blob"),
             "--against", str(work / f"{VECTOR}.tar.gz")],
            capture_output=True, text=True, timeout=300, env=lazyfs_env(TMPDIR=work_dir),
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{MKFS_MATCH} (extracted by fsck.erofs)" in result.stdout
        assert "not compared: xattrs, hardlinks, owner, symlink mode" in result.stdout
