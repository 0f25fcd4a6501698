"""OCI image layout directories (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`): read and write.

Reading is shared by layouts on disk and layouts inside a tar archive (newer `docker save`):
both are a `FileStore`, a read-only map from relative paths to bytes. Every blob is checked
against its digest and size as it is copied out, so a corrupt layout is an error, never data.

Writing is crash safe: a blob appears under its digest only once complete and fsynced (written
to a temporary name in the same directory, then renamed), and `index.json` is replaced
atomically under an advisory lock, so concurrent writers to one layout do not lose each other's
tags. Fields of `index.json` this module does not know are kept as they are.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from converter.errors import ConvertError
from lazyfs.format.descriptor import Descriptor, descriptor_from_dict
from lazyfs.format.oci import OCI_INDEX, Index, serialize_index
from lazyfs.format.reference import InvalidReferenceError, validate_digest

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
BLOBS_DIR = "blobs"
LAYOUT_VERSION = "1.0.0"
REF_NAME = "org.opencontainers.image.ref.name"
# Set by containerd and docker on index.json entries: the full image name, e.g.
# docker.io/library/busybox:latest; accepted when selecting an image too.
IMAGE_NAME = "io.containerd.image.name"
MAX_JSON_BYTES = 4 << 20
_COPY_BYTES = 1 << 20


class LayoutError(ConvertError):
    """An OCI layout is missing, malformed, or cannot be written as asked."""


class FileStore(Protocol):
    """Read-only files by relative POSIX path: a directory or an archive."""

    description: str

    def open(self, name: str) -> BinaryIO:
        """Open a file; raise LayoutError naming it when it is missing."""
        ...

    def exists(self, name: str) -> bool: ...


class DirStore:
    """Files under a directory; names never leave it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def _path(self, name: str) -> Path:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise LayoutError(f"{self.description}: path {name!r} leaves the layout")
        return self.root.joinpath(*parts)

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise LayoutError(f"{self.description}: {name} is missing") from None
        except OSError as e:
            raise LayoutError(f"{self.description}: cannot read {name}: {e.strerror}") from None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()


class TarStore:
    """Regular files of an uncompressed tar archive, read in place (seek to the member's data).

    Each `open` uses its own file descriptor, so reads from several threads do not interfere.
    Symlinks and hardlinks between members (older `docker save` links duplicate layers) are
    followed inside the archive only.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(path, mode="r:") as archive:
                for member in archive:
                    self._members[posixpath.normpath(member.name.lstrip("/"))] = member
        except (tarfile.TarError, OSError) as e:
            raise LayoutError(f"{path}: not a readable tar archive: {e}") from None

    def names(self) -> list[str]:
        return list(self._members)

    def _resolve(self, name: str) -> tarfile.TarInfo:
        key = posixpath.normpath(name)
        for _ in range(16):
            member = self._members.get(key)
            if member is None:
                raise LayoutError(f"{self.description}: {name} is not in the archive")
            if member.isreg() and not member.issparse():
                return member
            if member.issym():
                key = posixpath.normpath(posixpath.join(posixpath.dirname(key), member.linkname))
            elif member.islnk():
                key = posixpath.normpath(member.linkname.lstrip("/"))
            else:
                raise LayoutError(f"{self.description}: {name} is not a regular file")
        raise LayoutError(f"{self.description}: {name}: too many levels of links")

    def open(self, name: str) -> BinaryIO:
        member = self._resolve(name)
        try:
            raw = open(self.path, "rb")  # noqa: SIM115 - owned by the returned section
        except OSError as e:
            raise LayoutError(f"{self.description}: cannot read: {e.strerror}") from None
        raw.seek(member.offset_data)
        return _Section(raw, member.size)  # type: ignore[return-value]

    def size(self, name: str) -> int:
        return self._resolve(name).size

    def exists(self, name: str) -> bool:
        try:
            self._resolve(name)
        except LayoutError:
            return False
        return True


class _Section:
    """The `size` bytes of an open file from its current position, as a closable stream."""

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self._raw, self._left = raw, size

    def read(self, size: int = -1) -> bytes:
        want = self._left if size < 0 else min(size, self._left)
        data = self._raw.read(want)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> _Section:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- reading -----------------------------------------------------------------------------------


def blob_name(digest: str) -> str:
    """`blobs/<algorithm>/<hex>` of a digest; raise LayoutError for a malformed digest."""
    try:
        validate_digest(digest)
    except InvalidReferenceError as e:
        raise LayoutError(str(e)) from None
    algorithm, _, encoded = digest.partition(":")
    return f"{BLOBS_DIR}/{algorithm}/{encoded}"


def copy_verified(
    stream: BinaryIO, out: BinaryIO | None, digest: str, size: int | None, what: str
) -> bytes | None:
    """Copy `stream` to `out` (or into memory when `out` is None, returned), checking that it
    is `size` bytes (if given) and hashes to `digest`. Raises LayoutError naming `what`."""
    algorithm = digest.partition(":")[0]
    hasher = hashlib.new(algorithm)
    kept: list[bytes] = []
    done = 0
    cap = size if size is not None else MAX_JSON_BYTES if out is None else None
    while piece := stream.read(_COPY_BYTES):
        done += len(piece)
        if cap is not None and done > cap:
            raise LayoutError(f"{what}: larger than the {cap} bytes expected")
        hasher.update(piece)
        if out is None:
            kept.append(piece)
        else:
            out.write(piece)
    if size is not None and done != size:
        raise LayoutError(f"{what}: {done} bytes, the descriptor says {size}")
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != digest:
        raise LayoutError(f"{what}: content has digest {actual}, expected {digest}")
    return b"".join(kept) if out is None else None


def read_blob(store: FileStore, descriptor: Descriptor, what: str) -> bytes:
    """A small blob (manifest, config) of a layout, checked against its descriptor."""
    if descriptor.size > MAX_JSON_BYTES:
        raise LayoutError(f"{what}: {descriptor.size} bytes, more than {MAX_JSON_BYTES}")
    name = blob_name(descriptor.digest)
    with store.open(name) as stream:
        data = copy_verified(stream, None, descriptor.digest, descriptor.size,
                             f"{store.description}: {what} ({name})")
    assert data is not None
    return data


def read_json(store: FileStore, name: str) -> Any:
    with store.open(name) as stream:
        data = stream.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise LayoutError(f"{store.description}: {name} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise LayoutError(f"{store.description}: {name} is not valid JSON: {e}") from None


def check_layout_marker(store: FileStore) -> None:
    """Raise LayoutError unless `oci-layout` declares a supported layout version."""
    marker = read_json(store, LAYOUT_FILE)
    version = marker.get("imageLayoutVersion") if isinstance(marker, dict) else None
    if not isinstance(version, str) or version.split(".")[0] != "1":
        raise LayoutError(f"{store.description}: {LAYOUT_FILE}: unsupported "
                          f"imageLayoutVersion {version!r} (expected 1.x)")


def index_entries(store: FileStore) -> list[Descriptor]:
    """The descriptors listed in the layout's `index.json`."""
    obj = read_json(store, INDEX_FILE)
    items = obj.get("manifests") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise LayoutError(f"{store.description}: {INDEX_FILE}: no 'manifests' list")
    try:
        return [descriptor_from_dict(item, f"{INDEX_FILE}.manifests[{i}]")
                for i, item in enumerate(items)]
    except ValueError as e:
        raise LayoutError(f"{store.description}: {e}") from None


def entry_names(descriptor: Descriptor) -> list[str]:
    """The names an index.json entry answers to: its ref name and full image name."""
    return [v for k in (REF_NAME, IMAGE_NAME) if (v := descriptor.annotations.get(k))]


def select_entry(store: FileStore, name: str | None) -> Descriptor:
    """The index.json entry named `name` (ref name, or full image name), or the only entry.

    Raises LayoutError listing the names available when there is no such entry or, without a
    name, when there are several.
    """
    entries = index_entries(store)
    available = sorted({n for e in entries for n in entry_names(e)})
    shown = ", ".join(available) or "no named images"
    if name is None:
        if len(entries) == 1:
            return entries[0]
        if not entries:
            raise LayoutError(f"{store.description}: the layout holds no image")
        raise LayoutError(f"{store.description}: holds {len(entries)} images; name one as "
                          f"PATH:NAME (available: {shown})")
    found = [e for e in entries if name in entry_names(e)]
    if not found:
        raise LayoutError(f"{store.description}: no image named {name!r} (available: {shown})")
    return found[0]


# --- writing -----------------------------------------------------------------------------------


def is_layout_dir(path: Path) -> bool:
    return (path / LAYOUT_FILE).is_file()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


class LayoutWriter:
    """Adds blobs and tagged images to an OCI layout directory."""

    def __init__(self, root: Path, made_dir: bool = False) -> None:
        self.root = root
        self.store = DirStore(root)
        self._made_dir = made_dir

    @classmethod
    def open_or_create(cls, root: Path) -> tuple[LayoutWriter, bool]:
        """Open the layout at `root`, or create it (also in an existing empty directory).

        Returns (writer, whether the layout is new). Raises LayoutError for a non-empty
        directory that is not a layout, or a file in the way.
        """
        created = made_dir = False
        try:
            if root.is_dir() and is_layout_dir(root):
                check_layout_marker(DirStore(root))
            elif root.is_dir() and any(root.iterdir()):
                raise LayoutError(f"{root}: exists, is not empty and is not an OCI layout; "
                                  "choose another directory")
            elif root.exists() and not root.is_dir():
                raise LayoutError(f"{root}: exists and is not a directory")
            else:
                created, made_dir = True, not root.exists()
                root.mkdir(parents=True, exist_ok=True)
                (root / BLOBS_DIR).mkdir(exist_ok=True)
                _write_atomic(root / INDEX_FILE, _dump({"schemaVersion": 2,
                                                        "mediaType": OCI_INDEX,
                                                        "manifests": []}))
                _write_atomic(root / LAYOUT_FILE,
                              _dump({"imageLayoutVersion": LAYOUT_VERSION}))
        except OSError as e:
            raise LayoutError(f"{root}: cannot create the OCI layout: {e.strerror}") from None
        return cls(root, made_dir), created

    def discard(self) -> None:
        """Remove a layout this writer created, and the directory if it made that too."""
        if self._made_dir:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for entry in list(self.root.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.root / blob_name(digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def add_blob_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store `data`; return (its sha256 digest, whether it was not there before)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.has_blob(digest, len(data)):
            return digest, False
        path = self.blob_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data)
        return digest, True

    def add_blob_file(self, source: Path, digest: str) -> bool:
        """Move the complete, already verified file `source` into place as blob `digest`
        (copied when on another filesystem). Returns whether the blob was new."""
        path = self.blob_path(digest)
        if self.has_blob(digest, source.stat().st_size):
            source.unlink()
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(source, 0o644)
        try:
            os.replace(source, path)
        except OSError:
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                shutil.copyfile(source, temp)
                with open(temp, "rb+") as out:
                    os.fsync(out.fileno())
                os.replace(temp, path)
            finally:
                temp.unlink(missing_ok=True)
            source.unlink()
        _fsync_dir(path.parent)
        return True

    def remove_blob(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def ref_taken(self, ref_name: str) -> bool:
        return any(ref_name in entry_names(e) for e in index_entries(self.store))

    def set_ref(self, descriptor: Descriptor, ref_name: str | None, *, replace: bool) -> None:
        """Add `descriptor` to index.json, named `ref_name` (moved from any entry that had it
        when `replace`, else LayoutError if taken). Other entries and fields are kept."""
        entry_json = json.loads(serialize_index(Index(manifests=(descriptor,))))["manifests"][0]
        if ref_name is not None:
            entry_json.setdefault("annotations", {})[REF_NAME] = ref_name
        with self._locked():
            obj = read_json(self.store, INDEX_FILE)
            if not isinstance(obj, dict) or not isinstance(obj.get("manifests"), list):
                raise LayoutError(f"{self.root}: {INDEX_FILE}: no 'manifests' list")
            kept = []
            for item in obj["manifests"]:
                names = item.get("annotations", {}) if isinstance(item, dict) else {}
                if ref_name is not None and isinstance(names, dict) and \
                        names.get(REF_NAME) == ref_name:
                    if not replace:
                        raise LayoutError(f"{self.root}: already has an image named "
                                          f"{ref_name!r} (overwrite to replace it)")
                    continue
                kept.append(item)
            obj["manifests"] = [*kept, entry_json]
            _write_atomic(self.root / INDEX_FILE, _dump(obj))


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = [
    "IMAGE_NAME",
    "REF_NAME",
    "DirStore",
    "FileStore",
    "LayoutError",
    "LayoutWriter",
    "TarStore",
    "blob_name",
    "check_layout_marker",
    "copy_verified",
    "entry_names",
    "index_entries",
    "is_layout_dir",
    "read_blob",
    "select_entry",
]
