"""Where a whole image comes from: an OCI layout directory, a `docker save` archive, a registry.

Each source hands out the top manifest or index, then manifests, configs and layer blobs by
descriptor, every one checked against its digest and size as it is read. What SRC is gets
decided by content: a directory holding `oci-layout`; a tar (plain, gzip or zstd) whose members
are those of `docker save` and include `manifest.json` or `oci-layout`; otherwise a string that
parses as an image reference. `PATH:NAME` picks one image of a layout or archive by its ref
name, image name or RepoTag.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import trio

from converter.errors import ConvertError, UnsupportedSourceError
from converter.image.oci_layout import (
    LAYOUT_FILE,
    MAX_JSON_BYTES,
    DirStore,
    FileStore,
    LayoutError,
    TarStore,
    blob_name,
    check_layout_marker,
    copy_verified,
    entry_names,
    is_layout_dir,
    read_blob,
    read_json,
    select_entry,
)
from converter.source import SourceKind, detect_source, open_tar_stream
from lazyfs.fetch.registry import RegistryClient, RegistryError
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.descriptor import Descriptor
from lazyfs.format.oci import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    Manifest,
    serialize_manifest,
    sha256_digest,
)
from lazyfs.format.reference import DOCKER_HUB, ImageReference, parse_reference, validate_tag

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
# What `docker save` (legacy and OCI form), podman and skopeo put at an archive's top.
_ARCHIVE_NAME = re.compile(
    r"manifest\.json|repositories|index\.json|oci-layout|blobs(/[a-z0-9]+(/[0-9a-f]+)?)?"
    r"|[0-9a-f]{64}(\.json|\.tar|/|/VERSION|/json|/layer\.tar)?"
)
_HEX_NAME = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json|\.tar)?")
_IO_THREADS = 4  # blobs copied (and hashed) at once from one layout or archive


@dataclass(frozen=True)
class RootImage:
    """The top of an image: a manifest or an index, with the tag it was found under."""

    data: bytes
    media_type: str
    digest: str
    tag: str | None


class ImageSource(ABC):
    """Read access to one image; every method checks what it returns against its digest."""

    description: str

    @abstractmethod
    async def root(self) -> RootImage: ...

    @abstractmethod
    async def read_blob(self, descriptor: Descriptor, what: str) -> bytes:
        """A manifest, index or config (small: held in memory)."""

    @abstractmethod
    async def fetch_blob(self, descriptor: Descriptor, dest: Path) -> None:
        """Stream a blob (a layer) to the new file `dest`."""

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> ImageSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _fetch_to_file(store: FileStore, name: str, descriptor: Descriptor, dest: Path) -> None:
    try:
        with store.open(name) as stream, open(dest, "xb") as out:
            copy_verified(stream, out, descriptor.digest, descriptor.size,
                          f"{store.description}: {name}")
    except BaseException as e:
        dest.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ConvertError(f"{dest}: cannot write: {e.strerror or e}") from None
        raise


class LayoutSource(ImageSource):
    """An OCI image layout, in a directory or inside a tar archive (newer `docker save`)."""

    def __init__(self, store: FileStore, name: str | None, cleanup: Path | None = None) -> None:
        self.store, self.name, self._cleanup = store, name, cleanup
        self._threads = trio.CapacityLimiter(_IO_THREADS)
        self.description = f"OCI layout {store.description}" + (f":{name}" if name else "")

    async def root(self) -> RootImage:
        def load() -> RootImage:
            check_layout_marker(self.store)
            entry = select_entry(self.store, self.name)
            data = read_blob(self.store, entry, "image manifest")
            names = entry_names(entry)
            tag = _tag_of(self.name or (names[0] if names else None))
            return RootImage(data, entry.media_type, entry.digest, tag)

        return await trio.to_thread.run_sync(load, limiter=self._threads)

    async def read_blob(self, descriptor: Descriptor, what: str) -> bytes:
        return await trio.to_thread.run_sync(read_blob, self.store, descriptor, what,
                                             limiter=self._threads)

    async def fetch_blob(self, descriptor: Descriptor, dest: Path) -> None:
        name = blob_name(descriptor.digest)
        await trio.to_thread.run_sync(_fetch_to_file, self.store, name, descriptor, dest,
                                      limiter=self._threads)

    async def aclose(self) -> None:
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)


class DockerArchiveSource(ImageSource):
    """A `docker save` archive in the older form: `manifest.json` lists, per image, a config
    file and uncompressed layer tars. The manifest handed out is made up from it; each layer is
    checked against the diff ID its config gives, the config against the digest its name
    carries."""

    def __init__(self, store: TarStore, name: str | None, cleanup: Path | None = None) -> None:
        self.store, self.name, self._cleanup = store, name, cleanup
        self._threads = trio.CapacityLimiter(_IO_THREADS)
        self.description = f"docker archive {store.description}" + (f":{name}" if name else "")
        self._paths: dict[str, str] = {}

    def _load(self) -> RootImage:
        where = f"{self.store.description}: manifest.json"
        entries = read_json(self.store, "manifest.json")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise LayoutError(f"{where}: expected a list of objects")
        tags = [t for e in entries for t in e.get("RepoTags") or [] if isinstance(t, str)]
        if self.name is not None:
            entries = [e for e in entries if any(
                self.name in (t, t.rpartition(":")[2]) for t in e.get("RepoTags") or [])]
        if len(entries) != 1:
            problem = "no image named " + repr(self.name) if self.name else \
                f"{len(entries)} images; name one as PATH:NAME"
            raise LayoutError(f"{where}: {problem} (available: {', '.join(tags) or 'none'})")
        entry = entries[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list) or \
                not all(isinstance(n, str) for n in layer_names):
            raise LayoutError(f"{where}: an entry needs 'Config' and a 'Layers' list")
        with self.store.open(config_name) as stream:
            config = stream.read(MAX_JSON_BYTES + 1)
        named, config_digest = _HEX_NAME.fullmatch(config_name), sha256_digest(config)
        if len(config) > MAX_JSON_BYTES:
            raise LayoutError(f"{self.store.description}: {config_name}: config too large")
        if named and config_digest != f"sha256:{named[1]}":
            raise LayoutError(f"{self.store.description}: {config_name}: content has digest "
                              f"{config_digest}, which its name does not match")
        diff_ids = _diff_ids(config, f"{self.store.description}: {config_name}")
        if len(diff_ids) != len(layer_names):
            raise LayoutError(f"{where}: {len(layer_names)} layers, but the config lists "
                              f"{len(diff_ids)} diff_ids")
        self._paths[config_digest] = config_name
        layers = []
        for layer_name, diff_id in zip(layer_names, diff_ids, strict=True):
            named = _HEX_NAME.fullmatch(layer_name)
            digest = f"sha256:{named[1]}" if named and layer_name.startswith("blobs/") \
                else diff_id
            self._paths[digest] = layer_name
            size = self.store.size(layer_name)
            layers.append(Descriptor(DOCKER_LAYER_TAR, digest, size))
        manifest = Manifest(Descriptor(DOCKER_CONFIG, config_digest, len(config)),
                            tuple(layers), media_type=DOCKER_MANIFEST)
        data = serialize_manifest(manifest)
        tag = _tag_of(self.name or next(iter(entry.get("RepoTags") or []), None))
        self._config = config
        return RootImage(data, DOCKER_MANIFEST, sha256_digest(data), tag)

    async def root(self) -> RootImage:
        return await trio.to_thread.run_sync(self._load, limiter=self._threads)

    async def read_blob(self, descriptor: Descriptor, what: str) -> bytes:
        if self._paths.get(descriptor.digest) is None or descriptor.media_type != DOCKER_CONFIG:
            raise LayoutError(f"{self.description}: {what} {descriptor.digest} is not in it")
        return self._config

    async def fetch_blob(self, descriptor: Descriptor, dest: Path) -> None:
        name = self._paths.get(descriptor.digest)
        if name is None:
            raise LayoutError(f"{self.description}: blob {descriptor.digest} is not in it")
        await trio.to_thread.run_sync(_fetch_to_file, self.store, name, descriptor, dest,
                                      limiter=self._threads)

    async def aclose(self) -> None:
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)


def _tag_of(name: str | None) -> str | None:
    """The tag in an image name (`busybox:1.36`, `docker.io/library/x:v1`, `v1`), if any."""
    if not name:
        return None
    tag = name.rpartition(":")[2] if ":" in name else name
    try:
        return validate_tag(tag)
    except ValueError:
        return None


def _diff_ids(config: bytes, where: str) -> list[str]:
    try:
        obj = json.loads(config)
    except (UnicodeDecodeError, ValueError) as e:
        raise LayoutError(f"{where}: image config is not valid JSON: {e}") from None
    rootfs = obj.get("rootfs") if isinstance(obj, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise LayoutError(f"{where}: image config has no rootfs.diff_ids list")
    return diff_ids


class RegistrySource(ImageSource):
    """An image in a registry, pulled through RegistryClient (mirrors first, digests checked)."""

    def __init__(self, reference: ImageReference, options: RegistryOptions,
                 hint: str = "") -> None:
        self.reference, self.options, self._hint = reference, options, hint
        self.description = f"image {reference}"
        self._client: RegistryClient | None = None

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = self.options.client(self.reference.registry)
        return self._client

    async def root(self) -> RootImage:
        ref = self.reference
        try:
            data, media_type, digest = await self.client.get_manifest(ref.repository,
                                                                      ref.reference)
        except RegistryError as e:
            if not self._hint:
                raise
            raise type(e)(f"{e}{self._hint}", status=e.status) from None
        if ref.digest is not None and digest != ref.digest:
            raise ConvertError(f"{ref}: manifest has digest {digest}, expected {ref.digest}")
        return RootImage(data, media_type, digest, ref.tag)

    async def read_blob(self, descriptor: Descriptor, what: str) -> bytes:
        repository = self.reference.repository
        if descriptor.media_type in MANIFEST_TYPES | INDEX_TYPES:
            data, _, _ = await self.client.get_manifest(repository, descriptor.digest)
        else:
            data = await self.client.get_blob(repository, descriptor.digest,
                                              max_size_bytes=max(descriptor.size, 1))
        if len(data) != descriptor.size:
            raise ConvertError(f"{self.description}: {what} {descriptor.digest}: {len(data)} "
                               f"bytes, the descriptor says {descriptor.size}")
        return data

    async def fetch_blob(self, descriptor: Descriptor, dest: Path) -> None:
        await self.client.download_blob(self.reference.repository, descriptor.digest, dest,
                                        size=descriptor.size)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


# --- telling what SRC is -----------------------------------------------------------------------


def _archive_members(path: Path, kind: SourceKind) -> set[str] | None:
    """The member names of a tar if every one is what image archives hold, else None. Stops
    at the first other name, so a layer tar costs only its first header."""
    names: set[str] = set()
    try:
        with open_tar_stream(path, kind) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                name = os.path.normpath(member.name.lstrip("/"))
                if not _ARCHIVE_NAME.fullmatch(name):
                    return None
                names.add(name)
    except (tarfile.TarError, OSError, EOFError, ValueError, ConvertError):
        return None  # not a readable archive: whoever reads it as a layer will say why
    return names


def classify_path(path: Path) -> str | None:
    """"layout", "archive" (a tar of an image), or None for anything else (e.g. a layer)."""
    if path.is_dir():
        return "layout" if is_layout_dir(path) else None
    try:
        kind = detect_source(path)
    except UnsupportedSourceError:
        return None
    if not kind.is_tar:
        return None
    names = _archive_members(path, kind)
    if names and ("manifest.json" in names or LAYOUT_FILE in names):
        return "archive"
    return None


def _split(src: str) -> tuple[Path, str | None, str] | None:
    """(path, name, kind) when `src` is an image on disk, as PATH or PATH:NAME."""
    candidates: list[tuple[str, str | None]] = [(src, None)] if os.path.lexists(src) else []
    candidates += [(src[:i], src[i + 1:] or None) for i, c in enumerate(src) if c == ":" and i]
    for head, name in candidates:
        if os.path.exists(head):
            kind = classify_path(Path(head))
            if kind is not None:
                return Path(head), name, kind
            if head == src:
                return None
    return None


def is_image_on_disk(src: str) -> bool:
    """Whether `src` is an OCI layout or image archive (PATH or PATH:NAME)."""
    return _split(src) is not None


def is_image_source(src: str) -> bool:
    """Whether `src` names a whole image (layout, image archive, or image reference) rather
    than one layer (a directory, a layer tar, an EROFS image)."""
    if _split(src) is not None:
        return True
    if os.path.lexists(src):
        return False
    try:
        parse_reference(src)
    except ValueError:
        return False
    return True


def open_image_source(src: str, registry: RegistryOptions | None = None) -> ImageSource:
    """The ImageSource for SRC (see the module docstring); nothing is read over the network
    yet. Raises ConvertError (LayoutError) when SRC is neither an image on disk nor a valid
    reference."""
    found = _split(src)
    if found is None:
        if os.path.lexists(src):
            raise UnsupportedSourceError(f"{src}: not an OCI layout directory or image archive")
        try:
            reference = parse_reference(src)
        except ValueError as e:
            raise ConvertError(f"{src}: no such file or directory, and not an image reference "
                               f"({e})") from None
        hint = ""
        if reference.registry == DOCKER_HUB and not src.startswith(DOCKER_HUB):
            hint = f" (and there is no file or directory named {src!r})"
        return RegistrySource(reference, registry or RegistryOptions(), hint)
    path, name, kind = found
    if kind == "layout":
        return LayoutSource(DirStore(path), name)
    return _open_archive(path, name)


def _open_archive(path: Path, name: str | None) -> ImageSource:
    cleanup: Path | None = None
    kind = detect_source(path)
    if kind is not SourceKind.TAR:
        # Random access needs the plain tar: decompress it once into private space.
        cleanup = Path(tempfile.mkdtemp(prefix="lazyfs-archive-"))
        plain = cleanup / "archive.tar"
        try:
            with open_tar_stream(path, kind) as stream, open(plain, "xb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
        except BaseException:
            shutil.rmtree(cleanup, ignore_errors=True)
            raise
        path_to_read = plain
    else:
        path_to_read = path
    try:
        store = TarStore(path_to_read)
        store.description = str(path)
        if store.exists(LAYOUT_FILE) and store.exists("index.json"):
            return LayoutSource(store, name, cleanup)
        return DockerArchiveSource(store, name, cleanup)
    except BaseException:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise


__all__ = [
    "DOCKER_LAYER_TAR",
    "DockerArchiveSource",
    "ImageSource",
    "LayoutSource",
    "RegistrySource",
    "RootImage",
    "classify_path",
    "is_image_on_disk",
    "is_image_source",
    "open_image_source",
]
