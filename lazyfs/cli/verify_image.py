"""`lazyfs verify IMAGE [--against SOURCE]`: a whole image checked end to end.

IMAGE and SOURCE are what `lazyfs convert` reads: a registry reference, an OCI layout
DIR[:TAG] or an image archive, with the same registry options. `lazyfs verify BLOB` (one
local layer blob) is `lazyfs.cli.verify`, which hands an argument that names an image over
here. The check is `lazyfs.audit.image_check`; this module parses, shows progress on a
terminal and prints: a line per thing checked, a line per problem, then OK or FAILED. Exit
status 0 only when everything holds, 1 when a problem was found, 2 when the images cannot be
read at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
from pathlib import Path

from lazyfs.cli import UserError, sigterm_as_interrupt
from lazyfs.cli.convert import ProgressLine, write_stdout

EPILOG = (
    "BLOB may be a whole image instead: a registry reference, an OCI layout DIR[:TAG] or an "
    "image archive. Then its index, manifests and configs are checked (one diff ID per layer, "
    "each the sha256 of the layer's raw EROFS image), every layer end to end and its files "
    "read; with --against SOURCE (an image too) also the platforms, media types, annotations "
    "and configs against the source's, each layer's files against the source layer's and "
    "each platform's root file system (whiteouts and opaque directories applied) against the "
    "source's. Problems name the platform, the layer and the path."
)
_REGISTRY_OPTIONS = ("creds", "insecure_registry", "mirror")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lazyfs verify` for images: the registry options of `lazyfs convert`."""
    parser.epilog = EPILOG
    group = parser.add_argument_group("whole images")
    group.add_argument("--creds", metavar="USER:PASS", help="registry credentials")
    group.add_argument("--insecure-registry", action="store_true",
                       help="plain HTTP to the registries")
    group.add_argument("--mirror", action="append", metavar="HOST",
                       help="a registry mirror to try first (repeatable)")


def is_image(args: argparse.Namespace) -> bool:
    """Whether the argument of `lazyfs verify` names a whole image rather than a blob: an OCI
    layout or image archive on disk, or (a path that does not exist, not `*.blob`) an image
    reference; the registry options name an image anyway, --descriptor a blob."""
    from converter.image.sources import is_image_on_disk, is_image_source
    from lazyfs.format.descriptor import BLOB_SUFFIX

    if args.descriptor is not None:
        return False
    src = str(args.blob)
    if any(getattr(args, name) for name in _REGISTRY_OPTIONS):
        return True
    if os.path.lexists(src):
        return is_image_on_disk(src)
    return not src.endswith(BLOB_SUFFIX) and is_image_source(src)


def run(args: argparse.Namespace) -> int:
    """Check the image; print the report; 0 when it holds, 1 otherwise."""
    import trio

    from converter.image.sources import open_image_source
    from lazyfs.audit.image_check import AuditOptions, AuditReport, audit_image
    from lazyfs.fetch.registry_options import RegistryOptions, parse_credentials

    if args.jobs < 0:
        raise UserError(f"--jobs {args.jobs}: must be >= 0")
    creds = None if args.creds is None else parse_credentials(args.creds, "--creds")
    registry = RegistryOptions(creds, args.insecure_registry, tuple(args.mirror or ()))
    image_name = str(args.blob)
    source_name = None if args.against is None else str(args.against)
    options = AuditOptions(threads=args.jobs, fsck_erofs=args.fsck_erofs)

    with tempfile.TemporaryDirectory(prefix="lazyfs-verify-") as work_dir, \
            ProgressLine() as line, sigterm_as_interrupt():
        lock = threading.Lock()

        def progress(what: str, done: int, total: int | None) -> None:
            with lock:  # layers are read on worker threads
                line.update(what, done, total)

        async def main() -> AuditReport:
            async with contextlib.AsyncExitStack() as stack:
                image = await stack.enter_async_context(open_image_source(image_name,
                                                                          registry))
                against = None
                if source_name is not None:
                    against = await stack.enter_async_context(
                        open_image_source(source_name, registry))
                return await audit_image(image, against, Path(work_dir), options, progress)

        report = trio.run(main)
    title = f"verify {image_name}" + (f" against {source_name}" if source_name else "")
    lines = [title, *(f"  {text}" for text in report.lines)]
    lines += [f"problem: {problem}" for problem in report.problems]
    count = len(report.problems)
    lines.append("OK" if report.ok else f"FAILED: {count} problem{'' if count == 1 else 's'}")
    write_stdout("\n".join(lines) + "\n")
    return 0 if report.ok else 1


__all__ = ["EPILOG", "add_arguments", "is_image", "run"]
