"""Convert a whole image into one whose layers are seekable EROFS, into a layout and/or a registry.

Each distinct layer (by digest, across all platforms) is handled once: a tar layer (plain,
gzip, zstd; OCI or Docker media type) is streamed to a private temporary file and converted by
the layer pipeline; a raw EROFS layer is encoded as it is; a seekable EROFS layer is passed
through unchanged. Each result is written and/or pushed as soon as it is ready and its
temporary files removed, so disk use stays near `jobs` layers whatever the image size. No layer
descriptor of the new manifests carries `containerd.io/uncompressed`: containerd keeps that
digest as a content-store label, not in manifests.

The new config follows containerd's converter (core/images/converter/default.go and
core/images/converter/erofs): for every converted layer `rootfs.diff_ids` holds the sha256 of
the raw EROFS image, which is the layer's `containerd.io/uncompressed` digest that containerd's
GetDiffID reads; the legacy `config.Image` and `container_config.Image` ids are dropped once
diff_ids change. History is kept. Manifests are OCI image manifests; a multi-platform input
gives a new OCI index whose entries keep their platforms as the source wrote them.

Neither platforms nor config gain an "erofs" OS feature. containerd stamps one
(updateManifestPlatform) only on images with raw EROFS layers (`application/vnd.erofs.layer.v1`),
never for seekable ones (`+zstd`), which are all this converter writes; and containerd's
platform matcher (github.com/containerd/platforms) takes an index entry or config only when it
asks for every OS feature listed, which its default matcher does not: a stamped image would
not pull or run with a plain containerd.

With a start-up order (a list recorded by `lazyfs run --record`), a seekable layer the list
recorded (by its chunk table digest) is decoded and written anew, the blocks that start read
first, and a tar layer is written so when its conversion is the layer recorded; each carries
its new prefetch list (`converter.erofs.startup_order`).

Which images of the source are converted is decided (and checked) by `selection`; the
command line (`lazyfs convert SRC` for a whole image) is `lazyfs.cli.convert`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from converter.erofs.startup_order import NoStartupOrderError
from converter.errors import ConvertError, UnsupportedSourceError
from converter.image.oci_layout import LayoutWriter, index_entries
from converter.image.selection import TAR_TYPES, SourceImage, distinct_layers, select_images
from converter.image.sources import ImageSource
from converter.layer import ConvertOptions, convert_layer
from converter.source import SourceKind, detect_source
from lazyfs.exception_groups import first_error
from lazyfs.fetch.registry import RegistryClient
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format import oci
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_DIGEST,
    LABEL_UNCOMPRESSED,
    Descriptor,
    SeekableAnnotations,
)
from lazyfs.format.platform import Platform
from lazyfs.format.prefetch_list import (
    ANNOTATION_LAYOUT,
    ANNOTATION_PREFETCH,
    PrefetchList,
    PrefetchListError,
    serialize_prefetch_annotation,
)
from lazyfs.format.reference import ImageReference, parse_reference

Progress = Callable[[str], None]
"""Called with one line of progress for humans (per layer: phases, then the outcome)."""

# Annotations of a source layer that a new encoding makes wrong: a prefetch list names the
# chunk table it was recorded from; `containerd.io/uncompressed` (some tools put it in
# manifests) the digest of the old content.
_STALE_KEYS = frozenset(
    {*SeekableAnnotations(0, "", 0, "").to_annotations(), ANNOTATION_PREFETCH,
     LABEL_UNCOMPRESSED, ANNOTATION_LAYOUT})
_PHASES = {"extract": "extracting", "mkfs": "building the EROFS image", "encode": "encoding",
           "scan": "reading the entries", "write": "writing the EROFS image",
           "decode": "decoding the recorded layer"}


@dataclass(frozen=True)
class LayerOutcome:
    """One distinct source layer and what it became ("converted", "wrapped", "reordered" or
    "passed")."""

    source: Descriptor
    result: Descriptor
    action: str
    diff_id: str | None  # the new diff ID, None to keep the config's


@dataclass(frozen=True)
class ImageConvertResult:
    """The new image: its top manifest or index, and where it went."""

    digest: str
    media_type: str
    size: int
    manifests: tuple[Descriptor, ...]
    layers: tuple[LayerOutcome, ...]
    layout: Path | None = None
    tag: str | None = None
    pushed: str | None = None


@dataclass
class _Run:
    """What every step of one conversion shares."""

    source: ImageSource
    work: Path
    options: ConvertOptions
    report: Progress
    writer: LayoutWriter | None
    client: RegistryClient | None
    repository: str
    tasks: trio.CapacityLimiter  # layers in progress
    threads: trio.CapacityLimiter  # layer conversions running (CPU and disk heavy)
    total: int
    added: list[str] = field(default_factory=list)  # blobs new to the layout, undone on failure


def _stderr(line: str) -> None:
    print(f"lazyfs convert: {line}", file=sys.stderr, flush=True)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size / 1024:.1f} KiB"


async def convert_image(
    source: ImageSource,
    *,
    dest_layout: Path | None = None,
    push: str | None = None,
    layer_options: ConvertOptions | None = None,
    platform: Platform | None = None,
    jobs: int = 2,
    progress: Progress | None = None,
    dest_tag: str | None = None,
    overwrite: bool = False,
    push_registry: RegistryOptions | None = None,
    prefetch: PrefetchList | None = None,
    prefetch_source: str = "prefetch list",
) -> ImageConvertResult:
    """Convert `source` into `dest_layout` (an OCI layout, created if needed; the image is
    named `dest_tag`, else the source's tag) and/or push it to the tag `push`.

    Only images for `platform` are kept when it is given; `jobs` layers are converted at once.
    An existing layout receives the image only under a name it does not have yet, unless
    `overwrite`. `prefetch` (read from `prefetch_source`) goes into the annotations of the
    layers whose chunk digest it names. Raises ConvertError (RegistryError from the fetch
    layer) with a one-line message; on failure, nothing new is left in the layout.
    """
    if dest_layout is None and push is None:
        raise ConvertError("nothing to write: give an OCI layout directory or a push reference")
    if jobs < 1:
        raise ConvertError(f"jobs must be at least 1, got {jobs}")
    push_ref = parse_push_reference(push) if push is not None else None
    root = await source.root()
    tag = dest_tag or root.tag
    images, index = await select_images(source, root.data, root.media_type, platform)
    layers = distinct_layers(images)

    client = None
    if push_ref is not None:
        client = (push_registry or RegistryOptions()).client(push_ref.registry, mirrors=False)
    writer, fresh = None, False
    if dest_layout is not None:
        writer, fresh = await trio.to_thread.run_sync(LayoutWriter.open_or_create, dest_layout)
        if not fresh:
            await trio.to_thread.run_sync(_check_room, writer, tag, overwrite)
    run = _Run(source, Path(), layer_options or ConvertOptions(), progress or _stderr, writer,
               client, push_ref.repository if push_ref else "", trio.CapacityLimiter(jobs),
               trio.CapacityLimiter(jobs), len(layers))
    try:
        # Inside the layout, finished blobs are renamed into place rather than copied.
        run.work = Path(tempfile.mkdtemp(prefix=".lazyfs-convert-", dir=dest_layout))
        outcomes: dict[str, LayerOutcome] = {}
        try:
            async with trio.open_nursery() as nursery:
                for number, layer in enumerate(layers, 1):
                    nursery.start_soon(_layer_task, run, number, layer, outcomes)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        if prefetch is not None:
            _attach_prefetch(run, outcomes, prefetch, prefetch_source)
        startup = run.options.startup_order
        if startup is not None and not any(ANNOTATION_PREFETCH in outcome.result.annotations
                                           for outcome in outcomes.values()):
            raise ConvertError(f"{run.options.startup_order_source}: recorded for other layers "
                               "than this image's: record a run of this image (or of its "
                               "conversion by lazyfs's writer)")
        written = [await _write_image(run, image, outcomes) for image in images]
        push_tag = push_ref.tag if push_ref else None
        if index is None:
            top, top_data = written[0]
            top = replace(top, annotations={}, platform=None)
        else:
            for descriptor, data in written:
                await _publish_manifest(run, descriptor, data, None)
            top_data = oci.serialize_index(oci.Index(tuple(d for d, _ in written), oci.OCI_INDEX,
                                             index.annotations))
            top = Descriptor(oci.OCI_INDEX, oci.sha256_digest(top_data), len(top_data))
        await _publish_manifest(run, top, top_data, push_tag)
        if writer is not None:
            await trio.to_thread.run_sync(lambda: writer.set_ref(top, tag, replace=overwrite))
    except BaseException:
        if writer is not None:
            await trio.to_thread.run_sync(_undo, writer, fresh, run.added)
        raise
    finally:
        if run.work != Path():
            shutil.rmtree(run.work, ignore_errors=True)
        if client is not None:
            await client.aclose()
    run.report(f"image {top.digest} written" + (f" to {dest_layout}" if dest_layout else "")
               + (f", pushed to {push_ref}" if push_ref else ""))
    return ImageConvertResult(top.digest, top.media_type, top.size,
                              tuple(d for d, _ in written),
                              tuple(outcomes[d.digest] for d in layers), dest_layout, tag,
                              str(push_ref) if push_ref else None)


def parse_push_reference(push: str) -> ImageReference:
    """The tag reference to push to; ConvertError for anything else."""
    try:
        reference = parse_reference(push)
    except ValueError as e:
        raise ConvertError(f"push destination: {e}") from None
    if reference.digest is not None or reference.tag is None:
        raise ConvertError(f"push destination {push}: give a tag to push to, not a digest")
    return reference


def _check_room(writer: LayoutWriter, tag: str | None, overwrite: bool) -> None:
    """Refuse to add to an existing layout an image nobody could find (no name) or one that
    takes another's name, unless `overwrite`."""
    if overwrite:
        return
    if tag is None:
        if index_entries(writer.store):
            raise ConvertError(f"{writer.root}: is an OCI layout with images already; name "
                               "the new one (DIR:TAG) to add it")
    elif writer.ref_taken(tag):
        raise ConvertError(f"{writer.root}: already has an image named {tag!r} "
                           "(overwrite it, or name the new one DIR:TAG)")


def _undo(writer: LayoutWriter, fresh: bool, added: list[str]) -> None:
    """Take back what a failed conversion wrote: a layout it started, or the blobs it added."""
    if fresh:
        writer.discard()
        return
    for digest in added:
        writer.remove_blob(digest)


# --- layers ------------------------------------------------------------------------------------


async def _layer_task(run: _Run, number: int, layer: Descriptor,
                      outcomes: dict[str, LayerOutcome]) -> None:
    async with run.tasks:
        outcomes[layer.digest] = await _convert_layer(run, number, layer)


def _recorded_start(run: _Run, layer: Descriptor) -> PrefetchList | None:
    """The start-up order's entry for a seekable layer, if the list recorded it (by its
    chunk table digest) with its blocks."""
    startup = run.options.startup_order
    if startup is None:
        return None
    entry = startup.for_digest(layer.annotations.get(ANNOTATION_CHUNK_DIGEST))
    return PrefetchList((entry,)) if entry is not None and entry.blocks else None


async def _convert_layer(run: _Run, number: int, layer: Descriptor) -> LayerOutcome:
    name = f"layer {number}/{run.total} {layer.digest[:19]}"
    started = time.monotonic()
    recorded = _recorded_start(run, layer)
    if layer.media_type == oci.EROFS_LAYER_ZSTD and recorded is None:
        if not await _has_blob(run, layer):
            run.report(f"{name}: seekable EROFS already, copying ({_mib(layer.size)})")
            fetched = run.work / f"{number}.blob"
            await run.source.fetch_blob(layer, fetched)
            await _publish_file(run, name, fetched, layer)
        run.report(f"{name}: seekable EROFS already, passed through")
        return LayerOutcome(layer, _without_label(layer), "passed", None)

    fetched = run.work / f"{number}.src"
    run.report(f"{name}: fetching {layer.media_type.rpartition('.')[2]} ({_mib(layer.size)})")
    await run.source.fetch_blob(layer, fetched)
    try:
        kind = await trio.to_thread.run_sync(detect_source, fetched)
    except UnsupportedSourceError:
        raise ConvertError(f"{name}: media type {layer.media_type}, but the content is "
                           "neither a tar nor an EROFS image") from None
    wrap = layer.media_type == oci.EROFS_LAYER
    reorder = recorded is not None  # a seekable layer, written anew in start-up order
    expected = (SourceKind.SEEKABLE_EROFS if reorder else SourceKind.EROFS_IMAGE if wrap
                else None)
    if kind is not expected and (expected is not None or not kind.is_tar):
        raise ConvertError(f"{name}: media type {layer.media_type}, but the content is "
                           f"{kind.value}")
    blob = run.work / f"{number}.blob"
    phases: set[str] = set()

    def phase(what: str, done: int, total: int | None) -> None:
        if what not in phases:  # one line per phase; this runs in the worker thread
            phases.add(what)
            run.report(f"{name}: {_PHASES.get(what, what)}")

    options = run.options
    if wrap or reorder:  # mkfs options do not apply to an image that exists
        options = replace(options, erofs_compression=None, erofs_layout=None, mkfs_opts=(),
                          erofs_writer=None, startup_order=recorded)
    try:
        try:
            result = await trio.to_thread.run_sync(convert_layer, fetched, blob, options,
                                                   phase, limiter=run.threads)
        except NoStartupOrderError:  # a tar layer the list did not record: as usual
            run.report(f"{name}: not in the start-up order's list, converted as usual")
            result = await trio.to_thread.run_sync(
                convert_layer, fetched, blob, replace(options, startup_order=None), phase,
                limiter=run.threads)
    except ConvertError as e:
        raise type(e)(f"{name}: {e}") from None
    fetched.unlink()
    result.descriptor_path.unlink(missing_ok=True)
    encoded = result.encoded
    annotations = {k: v for k, v in layer.annotations.items() if k not in _STALE_KEYS}
    annotations.update(encoded.annotations.to_annotations())
    if result.layout:
        annotations[ANNOTATION_LAYOUT] = result.layout
    if result.prefetch is not None:
        annotations[ANNOTATION_PREFETCH] = serialize_prefetch_annotation(result.prefetch)
        run.report(f"{name}: start-up blocks first, prefetch list of "
                   f"{len(result.prefetch.chunks)} chunks attached")
    new = Descriptor(oci.EROFS_LAYER_ZSTD, encoded.blob_digest, encoded.blob_size,
                     annotations=annotations)
    await _publish_file(run, name, blob, new)
    action = "reordered" if reorder else "wrapped" if wrap else "converted"
    run.report(f"{name}: {action} to {new.digest[:19]} ({_mib(new.size)}) "
               f"in {time.monotonic() - started:.1f} s")
    return LayerOutcome(layer, new, action, encoded.image_digest)


def _without_label(layer: Descriptor) -> Descriptor:
    """A seekable layer as a manifest names it: containerd keeps the raw image's digest as the
    content-store label `containerd.io/uncompressed`, never as an annotation (older lazyfs
    conversions put it there; lazyfs reads such images as any other)."""
    if LABEL_UNCOMPRESSED not in layer.annotations:
        return layer
    return replace(layer, annotations={k: v for k, v in layer.annotations.items()
                                       if k != LABEL_UNCOMPRESSED})


def _attach_prefetch(run: _Run, outcomes: dict[str, LayerOutcome], prefetch: PrefetchList,
                     where: str) -> None:
    """Annotate each converted layer that `prefetch` has an entry for (by chunk digest) with
    it. Raises ConvertError when it fits no layer: it was recorded from another conversion."""
    attached = 0
    for digest, outcome in outcomes.items():
        result = outcome.result
        entry = prefetch.for_digest(result.annotations.get(ANNOTATION_CHUNK_DIGEST))
        if entry is None:
            continue
        try:
            value = serialize_prefetch_annotation(entry)
        except PrefetchListError as exc:
            raise ConvertError(f"{where}: {exc}") from None
        annotations = {**result.annotations, ANNOTATION_PREFETCH: value}
        outcomes[digest] = replace(outcome, result=replace(result, annotations=annotations))
        attached += 1
        run.report(f"layer {result.digest[:19]}: prefetch list of {len(entry.chunks)} chunks "
                   "attached")
    if not attached:
        raise ConvertError(
            f"{where}: recorded for other layers than those of the converted image (no chunk "
            "table digest matches); record it from a mount of this conversion, or convert the "
            "image that was recorded (its seekable layers pass through unchanged), or convert "
            "with --reproducible both times")


async def _has_blob(run: _Run, layer: Descriptor) -> bool:
    """Whether every destination has the blob already (then it need not be fetched)."""
    if run.writer is not None and not run.writer.has_blob(layer.digest, layer.size):
        return False
    return run.client is None or await run.client.blob_exists(run.repository, layer.digest)


async def _publish_file(run: _Run, name: str, path: Path, descriptor: Descriptor) -> None:
    """Push and/or store a finished blob file, then let go of it."""
    if run.client is not None and not await run.client.push_blob(run.repository,
                                                                 descriptor.digest, path):
        run.report(f"{name}: {descriptor.digest[:19]} is in {run.client.name} already")
    if run.writer is not None:
        writer = run.writer
        if await trio.to_thread.run_sync(writer.add_blob_file, path, descriptor.digest):
            run.added.append(descriptor.digest)
    else:
        path.unlink()


async def _publish_blob(run: _Run, data: bytes) -> str:
    digest = oci.sha256_digest(data)
    if run.client is not None:
        await run.client.push_blob(run.repository, digest, data)
    if run.writer is not None:
        _, new = await trio.to_thread.run_sync(run.writer.add_blob_bytes, data)
        if new:
            run.added.append(digest)
    return digest


async def _publish_manifest(run: _Run, descriptor: Descriptor, data: bytes,
                            tag: str | None) -> None:
    """Store a manifest or index as a blob, and push it by `tag`, else by digest."""
    if run.client is not None:
        await run.client.push_manifest(run.repository, tag or descriptor.digest, data,
                                       descriptor.media_type)
    if run.writer is not None:
        _, new = await trio.to_thread.run_sync(run.writer.add_blob_bytes, data)
        if new:
            run.added.append(descriptor.digest)


# --- configs and manifests ---------------------------------------------------------------------


def new_config(config: dict[str, Any], diff_ids: list[str]) -> dict[str, Any]:
    """The image config for the converted layers (see the module docstring), key order kept."""
    out = dict(config)
    rootfs = dict(out["rootfs"])
    if list(rootfs["diff_ids"]) != diff_ids:
        rootfs["diff_ids"] = diff_ids
        out["rootfs"] = rootfs
        for key in ("config", "container_config"):
            if isinstance(out.get(key), dict) and "Image" in out[key]:
                out[key] = {k: v for k, v in out[key].items() if k != "Image"}
    return out


async def _write_image(run: _Run, image: SourceImage,
                       outcomes: dict[str, LayerOutcome]) -> tuple[Descriptor, bytes]:
    """Write the config of one converted image; return its manifest's descriptor and bytes."""
    # containerd (core/images/converter/default.go: convertManifest, convertConfig) replaces
    # each old diff ID by GetDiffID of the converted layer, i.e. its `containerd.io/uncompressed`
    # label, which the seekable converter (core/images/converter/erofs/seekable.go) sets to the
    # sha256 of the raw EROFS image it encoded. Layers passed through keep their diff ID.
    old_ids = image.config["rootfs"]["diff_ids"]
    diff_ids = [outcomes[layer.digest].diff_id or old
                for layer, old in zip(image.manifest.layers, old_ids, strict=True)]
    config = json.dumps(new_config(image.config, diff_ids), separators=(",", ":"),
                        ensure_ascii=False).encode()
    config_digest = await _publish_blob(run, config)
    manifest = oci.Manifest(
        config=Descriptor(oci.OCI_CONFIG, config_digest, len(config)),
        layers=tuple(outcomes[layer.digest].result for layer in image.manifest.layers),
        media_type=oci.OCI_MANIFEST,
        annotations=image.manifest.annotations,
    )
    data = oci.serialize_manifest(manifest)
    entry = image.entry
    descriptor = Descriptor(oci.OCI_MANIFEST, oci.sha256_digest(data), len(data),
                            annotations=entry.annotations if entry else {},
                            platform=entry.platform if entry else None)
    return descriptor, data


__all__ = [
    "TAR_TYPES",
    "ImageConvertResult",
    "LayerOutcome",
    "Progress",
    "convert_image",
    "new_config",
    "parse_push_reference",
]
