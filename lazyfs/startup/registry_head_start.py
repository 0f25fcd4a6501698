"""The first requests of a mount or a run of an image, made while the command starts up.

What `head_start.HeadStart` does for a layer URL, for an image in a registry that answers
anonymously: its manifest (through an index, the one for the platform), its config, and for
each seekable EROFS layer what opening and mounting it reads first (the metadata range and the
hash blocks over the first chunk on one connection, the config on another, the first frames
on a third: each connected at once, so that none waits for a handshake). Resolving
the image then takes the manifest and config from here (`PrimedClient`), checked against
their digests as the registry client checks its own answers; each layer's reader takes the
rest as its `PrimedAnswers`. A registry that asks for credentials, a redirect, anything
unexpected: the head start ends there, and the command asks for itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lazyfs.fetch.primed import PrimedAnswers
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_TABLE_OFFSET,
    SeekableAnnotations,
    parse_annotations,
)
from lazyfs.format.errors import OCIFormatError
from lazyfs.format.oci import (
    ACCEPTED_MANIFEST_TYPES,
    Index,
    detect_media_type,
    digest_of,
    parse_manifest,
    parse_manifest_or_index,
)
from lazyfs.format.platform import Platform
from lazyfs.format.reference import DOCKER_HUB, is_digest_reference
from lazyfs.startup.early_requests import SOCKET_TIMEOUT_S, Connection, EarlyRequests, EarlyStop

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from lazyfs.format.reference import ImageReference

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_LAYERS = 16


class ManifestSource(Protocol):
    """What resolving an image asks of a registry client."""

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        ...

    async def get_blob(self, repository: str, digest: str, *,
                       max_size_bytes: int = ...) -> bytes:
        ...


@dataclass
class PrimedRegistry:
    """A head start's answers for one repository: manifests by the reference asked for
    (body, Content-Type, Docker-Content-Digest), configs by digest, and each layer's first
    answers by its digest. Manifests and configs serve once. `started`: when the head start
    began asking (time.monotonic()), where the resolution's deadline counts from."""

    repository: str
    manifests: dict[str, tuple[bytes, str, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    layers: dict[str, PrimedAnswers] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


class PrimedClient:
    """`client`'s `get_manifest` and `get_blob`, answered first from `primed` when it holds
    the answer and the answer matches its digest (else, or when it does not, from `client`,
    whose own checks then speak)."""

    def __init__(self, client: ManifestSource, primed: PrimedRegistry) -> None:
        self._client = client
        self._primed = primed

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        found = (self._primed.manifests.pop(reference, None)
                 if repository == self._primed.repository else None)
        if found is not None:
            body, content_type, sent = found
            pinned = is_digest_reference(reference)
            algorithm = reference.partition(":")[0] if pinned else "sha256"
            digest = digest_of(body, algorithm)
            expected = reference if pinned else sent if sent.startswith("sha256:") else digest
            if digest == expected:
                try:
                    return body, detect_media_type(body, content_type or None), digest
                except OCIFormatError as exc:
                    log.info("head start: manifest %s:%s: %s; asked for again", repository,
                             reference, exc)
        return await self._client.get_manifest(repository, reference)

    async def get_blob(self, repository: str, digest: str, *,
                       max_size_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
        body = (self._primed.blobs.pop(digest, None)
                if repository == self._primed.repository else None)
        algorithm = digest.partition(":")[0]
        if (body is not None and len(body) <= max_size_bytes
                and algorithm in ("sha256", "sha512") and digest_of(body, algorithm) == digest):
            return body
        return await self._client.get_blob(repository, digest, max_size_bytes=max_size_bytes)


class RegistryHeadStart(EarlyRequests):
    """Fetch in threads what resolving and mounting the image `reference` asks for first
    (see the module docstring). `insecure` means plain HTTP, as for the registry client.
    Without `layers` (a disk cache holds them) only the manifests and the config; without
    `first_frames` no first frames and hash blocks (nothing mounts the layers). `kept(digest)`
    says whether the disk cache holds a manifest or config already: those are not fetched."""

    def __init__(self, reference: ImageReference, *, insecure: bool, platform: Platform,
                 tree_window_bytes: int, first_frames: bool = True,
                 layers: bool = True, kept: Callable[[str], bool] | None = None) -> None:
        scheme = "http" if insecure else "https"
        super().__init__(f"{scheme}://{reference.registry}/",
                         tree_window_bytes=tree_window_bytes)
        self._reference = reference
        self._platform = platform
        self._layers_too = layers  # else only the manifests and the config
        self._first_frames = first_frames and layers
        self._primed = PrimedRegistry(reference.repository)
        self._layers: list[tuple[str, PrimedAnswers]] = []
        self._layers_known = threading.Event()
        self._config: str | None = None
        self._kept = kept or (lambda digest: False)
        self._thread(self._resolve, "registry-head-start")
        self._thread(self._config_document, "registry-head-start-config")
        if self._first_frames:
            self._thread(self._frames, "registry-head-start-frames")

    @staticmethod
    def applies_to(reference: ImageReference, mirrors: bool) -> bool:
        """Docker Hub always asks for a token, and mirrors are tried first: no head start."""
        return reference.registry != DOCKER_HUB and not mirrors

    def start(self) -> RegistryHeadStart:
        self._start_threads()
        return self

    def finish(self, wait_s: float, deadline_s: float | None = None) -> PrimedRegistry:
        """The answers received within `wait_s` more seconds, and within `deadline_s` of the
        start; later ones are dropped."""
        if deadline_s is not None:
            wait_s = min(wait_s, max(0.0, self._primed.started + deadline_s - time.monotonic()))
        self._finish(wait_s)
        self._layers_known.set()
        return self._primed

    def _base(self) -> str:
        return f"/v2/{self._reference.repository}"

    def _resolve(self, connection: Connection) -> None:
        try:
            self._resolve_image(connection)
        finally:
            self._layers_known.set()  # whatever happened: the frames thread may stop waiting

    def _resolve_image(self, connection: Connection) -> None:
        wanted = self._reference.reference
        body, media_type = self._get_manifest(connection, wanted)
        top = parse_manifest_or_index(body, media_type)
        if isinstance(top, Index):
            entry = top.select(self._platform)
            if self._kept(entry.digest) and not self._layers_too:
                return  # resolving reads it from the disk cache, with the config
            body, media_type = self._get_manifest(connection, entry.digest)
            manifest = parse_manifest(body, media_type)
        else:
            manifest = top
        self._config = manifest.config.digest
        planned: list[tuple[str, PrimedAnswers, SeekableAnnotations, int]] = []
        for descriptor in manifest.layers if self._layers_too else []:
            if (ANNOTATION_CHUNK_TABLE_OFFSET not in descriptor.annotations
                    or descriptor.digest in self._primed.layers
                    or len(planned) == MAX_LAYERS):
                continue
            annotations = parse_annotations(dict(descriptor.annotations), descriptor.digest)
            answers = self._primed.layers[descriptor.digest] = PrimedAnswers()
            path = f"{self._base()}/blobs/{descriptor.digest}"
            planned.append((path, answers, annotations, descriptor.size))
            self._layers.append((path, answers))
        self._layers_known.set()
        for path, answers, annotations, size in planned:
            self._layer_metadata(connection, path, answers, annotations, size,
                                 hash_blocks=self._first_frames)

    def _config_document(self, connection: Connection) -> None:
        """The config, while the other connections ask for the layers' metadata and first
        frames."""
        if not self._layers_known.wait(SOCKET_TIMEOUT_S) or self._config is None:
            return
        config = self._config
        if not self._kept(config):
            body = self._get_document(connection, f"{self._base()}/blobs/{config}", {})[0]
            self._keep(lambda: self._primed.blobs.__setitem__(config, body))

    def _frames(self, connection: Connection) -> None:
        """The layers' first frames (the EROFS superblock and first directories)."""
        if not self._layers_known.wait(SOCKET_TIMEOUT_S):
            return
        for path, answers in list(self._layers):
            self._first_frame(connection, path, answers)

    def _get_manifest(self, connection: Connection,
                      reference: str) -> tuple[bytes, str]:
        body, content_type, sent = self._get_document(
            connection, f"{self._base()}/manifests/{reference}",
            {"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)})
        self._keep(lambda: self._primed.manifests.__setitem__(
            reference, (body, content_type, sent)))
        return body, detect_media_type(body, content_type or None)

    def _get_document(self, connection: Connection, path: str,
                      headers: dict[str, str]) -> tuple[bytes, str, str]:
        """(body, Content-Type without parameters, Docker-Content-Digest) of a 200."""
        response = self._send(connection, path, headers)
        body = response.read(MAX_DOCUMENT_BYTES + 1)
        if response.status != 200 or len(body) > MAX_DOCUMENT_BYTES:
            raise EarlyStop(f"{path}: HTTP {response.status}")
        content_type = response.getheader("Content-Type", "").partition(";")[0].strip()
        return body, content_type, response.getheader("Docker-Content-Digest", "")
