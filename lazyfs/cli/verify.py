"""`lazyfs verify BLOB`: every check there is, end to end; exit 0 only when all hold.

1. `lazyfs.eager.check`: descriptor digest and size, chunk table digest, every frame's SHA-512
   and decoded size, the whole dm-verity tree and every data block; all problems listed.
2. `veritysetup verify` on the hash payload and the padded image, when installed: an
   independent implementation confirms the tree and the root.
3. `fsck.erofs` decodes every file of the image: the one `--fsck-erofs` or $LAZYFS_FSCK_EROFS
   names, else the erofs-utils tools/setup builds, else PATH's (`converter.fsck`). One too old
   for the image's compression (Debian 12's 1.5 and zstd) is not a failure of the image: the
   step says what was not checked and why, and the other checks go on.
4. With `--against SRC` (a directory or a tar layer): the file tree inside the image is
   compared with the source (`converter.tree`). The image is mounted read-only when root can
   mount EROFS, which shows everything; otherwise it is extracted with `fsck.erofs --extract`,
   which in erofs-utils 1.5 restores neither xattrs nor hardlinks (and owners only for root),
   nor can any extraction on Linux keep the mode an image stores for a symlink, so those are
   not compared and the output says so. A tar layer is judged by the conventions of
   whichever converter made the image, `lazyfs convert` or containerd's `mkfs.erofs --tar
   --aufs` (`converter.tree.TAR_CONVENTIONS`: they differ only where the tar says nothing):
   the image passes when it holds the tree one of them makes of the tar, and otherwise the
   differences from the closest one are listed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs.cli import UserError, sigterm_as_interrupt, verify_image
from lazyfs.cli.convert import ProgressLine, blob_descriptor, write_stdout
from lazyfs.eager.check import BlobReport, check_blob

if TYPE_CHECKING:
    from converter.fsck import FsckTool
    from converter.tree import TreeEntry

_TOOL_TIMEOUT_SECONDS = 3600
_MOUNT_TIMEOUT_SECONDS = 60


class _Outcome:
    """Check results in order: a line per step, and every problem found."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.problems: list[str] = []
        self.unchecked: list[str] = []

    def skip(self, name: str, status: str) -> None:
        """A check that could not be made here: said, but not a problem."""
        self.step(name, status)
        self.unchecked.append(name)

    def step(self, name: str, status: str) -> None:
        self.lines.append(f"  {name:<12} {status}")

    def fail(self, name: str, problems: list[str], detail: str = "") -> None:
        self.step(name, f"FAILED ({_count(len(problems), 'problem')}{detail})")
        self.problems += [f"{name}: {problem}" for problem in problems]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check every byte of a blob (and optionally its files against the source)",
        description="Check a seekable EROFS blob end to end: descriptor, chunk table, every "
        "frame, the dm-verity tree and every data block (confirmed with veritysetup when "
        "installed), fsck.erofs on the image, and with --against the files in the image "
        "against a directory or tar layer. Prints each problem; exit status 0 only when "
        "everything holds, 1 otherwise.",
    )
    parser.add_argument("blob", type=Path, metavar="BLOB|IMAGE")
    parser.add_argument("--descriptor", type=Path, metavar="D",
                        help="the blob's OCI descriptor JSON (default: the one beside BLOB)")
    parser.add_argument("--against", type=Path, metavar="SRC",
                        help="a directory or tar layer the image must hold exactly")
    parser.add_argument("-j", "--jobs", type=int, default=0, metavar="N",
                        help="decoder threads (default: one per core)")
    parser.add_argument("--fsck-erofs", metavar="PATH",
                        help="the fsck.erofs to run (default: $LAZYFS_FSCK_EROFS, else the "
                        "erofs-utils tools/setup builds, else the one on PATH)")
    verify_image.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if verify_image.is_image(args):
        return verify_image.run(args)
    descriptor, descriptor_path = blob_descriptor(args.blob, args.descriptor)
    expected = _expected_trees(args.against) if args.against is not None else None
    tool = _fsck_tool(args.fsck_erofs)
    outcome = _Outcome()
    with tempfile.TemporaryDirectory(prefix="lazyfs-verify-") as work_dir:
        work = Path(work_dir)
        image = work / "image.erofs"
        try:
            with (open(image, "wb") as image_file, ProgressLine() as progress,
                  sigterm_as_interrupt()):
                report = check_blob(args.blob, descriptor, output=image_file, threads=args.jobs,
                                    progress=progress.blob_progress("verify"))
        except OSError as exc:
            raise UserError(f"{exc.filename or args.blob}: {exc.strerror or exc}") from None
        _report_blob(outcome, report, descriptor_path)
        if report.ok:
            _veritysetup(outcome, args.blob, report, image)
            if expected is None:
                _fsck(outcome, image, None, tool)
            else:
                _against(outcome, image, work, expected, args.against, tool)
        else:
            outcome.step("image", "not checked: the blob has problems")
    lines = [f"verify {args.blob}", *outcome.lines]
    lines += [f"problem: {problem}" for problem in outcome.problems]
    unchecked = f" (not checked: {', '.join(outcome.unchecked)})" if outcome.unchecked else ""
    lines.append(f"OK{unchecked}" if not outcome.problems else
                 f"FAILED: {_count(len(outcome.problems), 'problem')}{unchecked}")
    write_stdout("\n".join(lines) + "\n")
    return 0 if not outcome.problems else 1


def _expected_trees(src: Path) -> list[tuple[str | None, dict[str, TreeEntry]]]:
    """The trees the image may hold, read before the long checks so a bad SRC fails fast: a
    directory's (None, its tree), a tar layer's (converter, the tree it makes of the tar) for
    each converter's conventions."""
    from converter.source import SourceKind, detect_source, open_tar_stream
    from converter.tree import scan_directory, scan_tar_each

    kind = detect_source(src)
    if kind is SourceKind.DIRECTORY:
        return [(None, scan_directory(src))]
    if kind.is_tar:
        with open_tar_stream(src, kind) as stream:
            trees = scan_tar_each(stream)
        return [(convention.name, tree) for convention, tree in trees.items()]
    raise UserError(f"--against {src}: is a {kind.value} source; give a directory or a tar "
                    "layer")


def _report_blob(outcome: _Outcome, report: BlobReport, descriptor_path: Path | None) -> None:
    if report.authenticated:
        outcome.step("descriptor", f"{descriptor_path}")
    else:
        found = descriptor_path or "none"
        outcome.step("descriptor", f"{found}: metadata NOT AUTHENTICATED (checked for "
                                   "consistency only)")
    if not report.ok:
        outcome.fail("blob", report.problems)
        return
    metadata = report.metadata
    assert metadata is not None
    outcome.step("blob", f"{report.blob_size} bytes, {report.blob_digest}")
    frames = _count(report.chunks_checked, "frame")
    outcome.step("frames", f"{frames}: SHA-512 and decoded size ok; "
                           f"image {metadata.image_size} bytes, {report.image_digest}")
    if metadata.verity is None:
        outcome.step("dm-verity", "none in this blob")
    elif report.verity_checked:
        blocks = _count(metadata.verity.superblock.data_blocks, "data block")
        outcome.step("dm-verity", f"tree and {blocks} ok, root {report.root_digest}")
    else:
        outcome.step("dm-verity", "not checked: no root digest (a single data block and no "
                                  "descriptor)")


def _veritysetup(outcome: _Outcome, blob: Path, report: BlobReport, image: Path) -> None:
    """Confirm the tree with cryptsetup's implementation: hash payload and padded image."""
    metadata = report.metadata
    if metadata is None or metadata.verity is None or report.root_digest is None:
        return
    tool = shutil.which("veritysetup")
    if tool is None:
        outcome.step("veritysetup", "not installed: the tree was checked by lazyfs only")
        return
    hash_file = image.with_name("verity.hash")
    with open(blob, "rb") as f, open(hash_file, "wb") as out:
        out.write(os.pread(f.fileno(), metadata.verity_payload_size,
                           metadata.verity_payload_offset))
    # dm-verity hashes whole blocks: the data device is the image padded with zeros.
    os.truncate(image, metadata.verity.padded_data_size)
    try:
        root_hex = report.root_digest.partition(":")[2]
        result = _run([tool, "verify", os.fspath(image), os.fspath(hash_file), root_hex])
    finally:
        os.truncate(image, metadata.image_size)
        hash_file.unlink()
    if result.returncode == 0:
        outcome.step("veritysetup", "verify ok")
    else:
        outcome.fail("veritysetup", [f"verify failed (exit status {result.returncode}): "
                                     f"{_one_line(result)}"])


def _fsck_tool(explicit: str | None) -> FsckTool | str:
    """The fsck.erofs to run, or why there is none (a failure of the fsck step). Raises
    UserError when the one asked for (`--fsck-erofs`, $LAZYFS_FSCK_EROFS) cannot be run."""
    from converter.errors import ConvertError
    from converter.fsck import ENV_FSCK_EROFS, find_fsck_erofs

    try:
        return find_fsck_erofs(explicit)
    except ConvertError as exc:
        if explicit is not None or os.environ.get(ENV_FSCK_EROFS):
            raise UserError(str(exc)) from None
        return str(exc)


def _fsck(outcome: _Outcome, image: Path, extract_to: Path | None,
          tool: FsckTool | str) -> bool | None:
    """Run fsck.erofs on the image: True when every file decodes, False on a problem, None when
    this fsck.erofs cannot decode the image (said, not a problem)."""
    from converter.errors import ConvertError
    from converter.fsck import FsckOutcome, check_erofs_image

    if isinstance(tool, str):
        outcome.fail("fsck.erofs", [tool])
        return False
    try:
        checked = check_erofs_image(image, tool, extract_to=extract_to)
    except ConvertError as exc:
        checked = FsckOutcome(problem=str(exc))
    if checked.problem is not None:
        outcome.fail("fsck.erofs", [checked.problem])
        return False
    if checked.not_checked is not None:
        outcome.skip("fsck.erofs", f"{'not checked' if checked.ran else 'not run'}: "
                                   f"{checked.not_checked}")
        return None
    outcome.step("fsck.erofs", "every file decodes" + (" (extracted)" if extract_to else "")
                 + f" ({tool.name})")
    return True


def _can_mount_erofs() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return any(line.split()[-1:] == ["erofs"] for line in f)
    except OSError:
        return False


def _against(outcome: _Outcome, image: Path, work: Path,
             expected: list[tuple[str | None, dict[str, TreeEntry]]], src: Path,
             tool: FsckTool | str) -> None:
    """Compare the image's tree with the source's: from a read-only mount, else extracted."""
    from converter.tree import scan_directory

    if _can_mount_erofs():
        if _fsck(outcome, image, None, tool) is False:
            return
        mount_point = work / "mnt"
        mount_point.mkdir()
        mounted = _run(["mount", "-t", "erofs", "-o", "ro,loop,nodev,nosuid,noexec",
                        os.fspath(image), os.fspath(mount_point)], _MOUNT_TIMEOUT_SECONDS)
        if mounted.returncode == 0:
            try:
                actual = scan_directory(mount_point)
            finally:
                _unmount(mount_point)
            _compare(outcome, src, expected, actual, "mounted read-only", [])
            return
        outcome.step("mount", f"failed, comparing an extracted copy: {_one_line(mounted)}")
    extract_to = work / "tree"
    # Without root, fsck.erofs applies the umask to the modes it restores: make it neutral.
    previous_umask = os.umask(0)
    try:
        extracted = _fsck(outcome, image, extract_to, tool)
    finally:
        os.umask(previous_umask)
    if extracted is None:
        outcome.skip("against", "not checked: the image cannot be mounted here, and this "
                                "fsck.erofs cannot extract it (see fsck.erofs above)")
    if not extracted:
        return
    ignored = ["xattrs", "hardlinks"] + ([] if os.geteuid() == 0 else ["owner"])
    ignored.append("symlink_mode")  # an extracted symlink is 0777, whatever the image says
    actual = scan_directory(extract_to)
    _compare(outcome, src, expected, actual, "extracted by fsck.erofs", ignored)


def _compare(outcome: _Outcome, src: Path,
             expected: list[tuple[str | None, dict[str, TreeEntry]]],
             actual: dict[str, TreeEntry], how: str, ignored: list[str]) -> None:
    """Pass when the image holds one of the expected trees; otherwise list the differences
    from the closest (the first of those with fewest)."""
    from converter.tree import compare_trees

    compared = [(maker, compare_trees(tree, actual, ignore=ignored)) for maker, tree in expected]
    maker, differences = min(compared, key=lambda result: len(result[1]))
    if differences:
        detail = f" from the tree {maker} makes of the tar" if maker else ""
        if len(compared) > 1:
            detail += ", the closest"
        outcome.fail("against", differences, detail)
        return
    made = f", as {maker} makes it of the tar" if maker else ""
    note = ""
    if ignored:
        names = ", ".join(aspect.replace("_", " ") for aspect in ignored)
        note = f"; not compared: {names} (erofs-utils 1.5 extraction drops them)"
    outcome.step("against", f"{src}: the image holds the same tree{made} ({how}){note}")


def _unmount(mount_point: Path) -> None:
    result = _run(["umount", os.fspath(mount_point)], _MOUNT_TIMEOUT_SECONDS)
    if result.returncode != 0:
        _run(["umount", "-l", os.fspath(mount_point)], _MOUNT_TIMEOUT_SECONDS)


def _run(args: list[str], timeout: float = _TOOL_TIMEOUT_SECONDS) -> (
    subprocess.CompletedProcess[str]
):
    try:
        return subprocess.run(args, capture_output=True, text=True, errors="replace",
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, -1, "", f"timed out after {timeout} s")
    except OSError as exc:
        return subprocess.CompletedProcess(args, -1, "", f"cannot run {args[0]}: {exc}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stderr.strip() or result.stdout.strip() or "no output")
    return text.replace("\n", " | ")[-1000:]
