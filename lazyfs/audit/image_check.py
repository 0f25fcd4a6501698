"""A whole converted image checked end to end, alone or against the image it was made from
(`lazyfs verify IMAGE [--against SOURCE]`), as nydusify's `check` answers it for Nydus.

1. The documents (`documents`, `structure`): the index, every manifest and config read and
   checked against their digests; each config lists one diff ID per layer, each layer is
   seekable EROFS; against a source, the same platforms, media types, annotations and configs
   as the source has, but for what a conversion changes.
2. Every distinct layer of both images read whole (`layers`): each byte checked as its format
   allows, its diff ID computed and its tree read. Each config's `rootfs.diff_ids` must be
   its layers' (for seekable EROFS the sha256 of the raw EROFS image, as containerd's differ
   computes it; the source's the sha256 of its tars).
3. Against a source, for each platform: each layer's files against the source layer's in the
   same place (`converter.tree.compare_trees`), and the root file system all layers make
   (`merge`) against the source's.

Every problem is one line naming the platform, the layer (number and digest) and the path
where it has them; the report also says, a line each, what was checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from converter.errors import ConvertError
from converter.fsck import FsckTool, find_fsck_erofs
from converter.image.sources import ImageSource
from converter.tree import compare_trees
from lazyfs.audit.documents import ImageDocuments, load_documents
from lazyfs.audit.layers import LayerReading, Progress, read_layer
from lazyfs.audit.merge import LayerTree, merge_layers
from lazyfs.audit.structure import (
    PlatformPair,
    check_image,
    compare_images,
    layer_label,
    short_digest,
)
from lazyfs.exception_groups import first_error
from lazyfs.format.descriptor import Descriptor

MAX_DIFFERENCES = 20  # per comparison of two trees: the rest is counted
_T = TypeVar("_T")


@dataclass(frozen=True)
class AuditOptions:
    """`jobs` layers are read at once, each seekable one decoded on `threads` threads (0: one
    per core); `fsck_erofs` is the fsck.erofs to run (None: `converter.fsck` finds one)."""

    jobs: int = 2
    threads: int = 0
    fsck_erofs: str | None = None


@dataclass
class AuditReport:
    """What was checked, a line each, and every problem found (none: the image is sound)."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# Where a layer is used: (platform, layer number, layer count) for each use.
_Uses = dict[str, list[tuple[str, int, int]]]


def _uses(documents: ImageDocuments) -> tuple[_Uses, dict[str, Descriptor]]:
    uses: _Uses = {}
    layers: dict[str, Descriptor] = {}
    for image in documents.images:
        if image.manifest is None:
            continue
        total = len(image.manifest.layers)
        for number, layer in enumerate(image.manifest.layers, 1):
            uses.setdefault(layer.digest, []).append((image.name, number, total))
            layers.setdefault(layer.digest, layer)
    return uses, layers


def where(uses: Iterable[tuple[str, int, int]], digest: str) -> str:
    """`linux/amd64, linux/arm64: layer 1/2 (sha256:…)` for a layer used in those places."""
    places: dict[tuple[int, int], list[str]] = {}
    for name, number, total in uses:
        places.setdefault((number, total), []).append(name)
    parts = [f"{', '.join(names)}: layer {number}/{total}"
             for (number, total), names in places.items()]
    return "; ".join(parts) + f" ({short_digest(digest)})"


async def _read_all(source: ImageSource, layers: dict[str, Descriptor], work: Path,
                    options: AuditOptions, progress: Progress, prefix: str,
                    fsck: FsckTool | None) -> dict[str, LayerReading]:
    readings: dict[str, LayerReading] = {}
    tasks, threads = trio.CapacityLimiter(options.jobs), trio.CapacityLimiter(options.jobs)
    count = len(layers)

    async def one(number: int, digest: str) -> None:
        async with tasks:
            label = f"{prefix}layer {number}/{count} {short_digest(digest)}"
            readings[digest] = await read_layer(source, layers[digest], work / str(number),
                                                label, threads=options.threads,
                                                limiter=threads, progress=progress, fsck=fsck)

    work.mkdir()
    try:
        async with trio.open_nursery() as nursery:
            for number, digest in enumerate(layers, 1):
                nursery.start_soon(one, number, digest)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return readings


async def audit_image(image: ImageSource, against: ImageSource | None, work: Path,
                      options: AuditOptions | None = None,
                      progress: Progress | None = None) -> AuditReport:
    """Check `image` (and against `against`, the image it was converted from), using the empty
    private directory `work` for one layer at a time per job. Raises what reading either
    image's top document raises (the image cannot be checked at all); everything else found
    is a problem in the report."""
    options = options or AuditOptions()
    progress = progress or (lambda what, done, total: None)
    report = AuditReport()
    documents = await load_documents(image)
    source = await load_documents(against) if against is not None else None
    report.lines.append(_describe("image", documents))
    report.problems += check_image(documents)
    pairs: list[PlatformPair] = []
    if source is not None:
        report.lines.append(_describe("source", source))
        pairs, differences = compare_images(documents, source)
        report.problems += differences
    uses, layers = _uses(documents)
    try:
        fsck: FsckTool | None = find_fsck_erofs(options.fsck_erofs)
    except ConvertError as exc:
        fsck = None
        report.lines.append(f"fsck.erofs: not run: {exc}")
    readings = await _read_all(image, layers, work / "image", options, progress, "", fsck)
    for digest in layers:  # in the order the images use them
        reading, label = readings[digest], where(uses[digest], digest)
        if reading.summary:
            report.lines.append(f"{label}: {reading.summary}")
        report.problems += [f"{label}: {problem}" for problem in reading.problems]
    report.problems += _diff_ids(documents, readings, "")
    if source is None or against is None:
        return report
    source_uses, source_layers = _uses(source)
    source_readings = await _read_all(against, source_layers, work / "source", options,
                                      progress, "source ", fsck)
    for digest in source_layers:
        reading, label = source_readings[digest], where(source_uses[digest], digest)
        report.problems += [f"source {label}: {problem}" for problem in reading.problems]
    report.problems += _diff_ids(source, source_readings, "source ")
    for prefix, where_used, found in (("", uses, readings),
                                      ("source ", source_uses, source_readings)):
        report.problems += [f"{prefix}{where(where_used[digest], digest)}: its files cannot be "
                            f"compared: {reading.unread}"
                            for digest, reading in found.items() if reading.unread]
    count = len(source_readings)
    report.lines.append(f"source: {count} layer{'' if count == 1 else 's'} read")
    for pair in pairs:
        _compare_files(report, pair, readings, source_readings)
    return report


def _describe(what: str, documents: ImageDocuments) -> str:
    top = documents.top
    kind = "index" if documents.index is not None else "manifest"
    names = ", ".join(image.name for image in documents.images)
    aside = len(documents.set_aside)
    extra = f" ({aside} other manifest{'s' if aside != 1 else ''} set aside)" if aside else ""
    return (f"{what}: {documents.description}, {kind} {top.digest} ({top.media_type}); "
            f"{names}{extra}")


def _diff_ids(documents: ImageDocuments, readings: dict[str, LayerReading],
              prefix: str) -> list[str]:
    """A problem for each diff ID a config lists that is not its layer's."""
    problems = []
    for image in documents.images:
        diff_ids = image.diff_ids
        if image.manifest is None or diff_ids is None:
            continue
        layers = image.manifest.layers
        if len(diff_ids) != len(layers):
            continue  # said by check_image
        for number, (layer, listed) in enumerate(zip(layers, diff_ids, strict=True), 1):
            found = readings[layer.digest].diff_id
            if found is not None and found != listed:
                label = layer_label(number, len(layers), layer.digest)
                problems.append(f"{prefix}{image.name}: {label}: diff_id: the config lists "
                                f"{listed}, the layer unpacks to {found}")
    return problems


def _closest(candidates: Mapping[str, _T], differences_of: Callable[[_T], list[str]]
             ) -> tuple[str, list[str]]:
    """The name of the candidate with the fewest differences (the first of equals), and its
    differences."""
    best: tuple[str, list[str]] | None = None
    for name, candidate in candidates.items():
        differences = differences_of(candidate)
        if best is None or len(differences) < len(best[1]):
            best = (name, differences)
        if not differences:
            break
    assert best is not None, "no candidates"
    return best


def _layer_differences(tree: LayerTree, source: LayerTree) -> list[str]:
    return compare_trees(source.entries, tree.entries)


def _capped(differences: list[str]) -> list[str]:
    if len(differences) <= MAX_DIFFERENCES:
        return differences
    more = len(differences) - MAX_DIFFERENCES
    return [*differences[:MAX_DIFFERENCES], f"... and {more} more difference"
            + ("s" if more != 1 else "")]


def _compare_files(report: AuditReport, pair: PlatformPair, readings: dict[str, LayerReading],
                   source_readings: dict[str, LayerReading]) -> None:
    """Each layer's files against its source layer's, then the merged root file systems. A
    source tar layer stands for the tree of whichever converter's conventions the image's
    layer follows (the closest, when none)."""
    mine, theirs = pair.image, pair.source
    if mine.manifest is None or theirs.manifest is None:
        return
    layers, source_layers = mine.manifest.layers, theirs.manifest.layers
    trees = [readings[layer.digest].tree for layer in layers]
    sources = [source_readings[layer.digest].candidates() for layer in source_layers]
    layers_differ, chosen, unusual = False, [], set()
    if len(layers) == len(source_layers):
        for number, (layer, tree, candidates) in enumerate(zip(layers, trees, sources,
                                                               strict=True), 1):
            if tree is None or not candidates:
                continue  # why is a problem already
            name, differences = _closest(candidates, partial(_layer_differences, tree))
            chosen.append(candidates[name])
            if name != next(iter(candidates)):
                unusual.add(name)
            label = f"{pair.name}: {layer_label(number, len(layers), layer.digest)}"
            layers_differ = layers_differ or bool(differences)
            report.problems += [f"{label}: {line}" for line in _capped(differences)]
    image_trees = [tree for tree in trees if tree is not None]
    if len(image_trees) < len(trees) or not all(sources):
        report.lines.append(f"{pair.name}: root file system not compared: a layer could not "
                            "be read")
        return
    merged = merge_layers(image_trees)
    if len(chosen) == len(sources):
        options = {"": chosen}
    else:  # no layer to pair with: every convention for all of them, the closest counts
        names = list(dict.fromkeys(name for candidates in sources for name in candidates))
        options = {name: [c.get(name, next(iter(c.values()))) for c in sources]
                   for name in names}
    _, differences = _closest(
        options, lambda source_trees: compare_trees(merge_layers(source_trees), merged))
    report.problems += [f"{pair.name}: root file system: {line}"
                        for line in _capped(differences)]
    if not differences and not layers_differ:
        how = f" (the tars as {', '.join(sorted(unusual))} converts them)" if unusual else ""
        report.lines.append(f"{pair.name}: each layer holds its source layer's files{how}; "
                            f"the root file system the same {len(merged)} paths")


__all__ = ["MAX_DIFFERENCES", "AuditOptions", "AuditReport", "audit_image", "where"]
