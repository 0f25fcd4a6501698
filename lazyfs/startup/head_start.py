"""The first requests of a mount, made while the command is still starting up.

`lazyfs mount URL` spends its first tenth of a second or more importing trio, pyfuse3 and
httpx before its daemon can ask the server for anything, and then opens the layer with a few
requests one after another: the descriptor beside the blob, the metadata range, the first
frame (the EROFS superblock, the root directory, the first inodes) and the hash blocks over
it. None of those requests needs the imports, so a `HeadStart` thread makes them first, with
the standard library alone, and the round trips overlap the imports; the first frame, which
starts the blob, comes on a second connection at the same time: its start at once, its rest
as soon as the chunk table says where it ends (while the command imports, the link is idle;
after, the rest would share it with the first file's frame). A descriptor in a local file
(`--descriptor FILE`) is read at once (`read_descriptor_file`): the metadata range is then
the first request.

What it receives is kept as it came (`PrimedAnswers`), and the daemon's reader answers the
first request for each of those ranges from it instead of the network. Nothing is trusted for
having come early: the bytes pass every check a network answer passes (the blob size, the
descriptor's digests, the chunk table digest, frame hashes, dm-verity), and each primed answer
serves one request only, so a frame that fails its check is fetched again from the server.
Whatever goes wrong ends the head start, with one line at INFO (`-v`): the daemon then asks
for itself and reports what it finds. Only a bug (an exception nobody expects) is a warning,
with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from urllib.parse import urlsplit

from lazyfs.errors import LazyfsError
from lazyfs.fetch.primed import PrimedAnswers
from lazyfs.format.descriptor import Descriptor, descriptor_locations, is_local, parse_descriptor
from lazyfs.startup.early_requests import Connection, EarlyRequests, EarlyStop, path_of

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1024 * 1024


class HeadStart(EarlyRequests):
    """Fetch in a thread what opening the layer at `blob_url` asks for first (see the module
    docstring). `descriptor` is the descriptor URL the user gave (else the ones beside the
    blob are tried, as the daemon will), or `known` the descriptor read from the user's file
    (then nothing precedes the metadata); `headers` go with every request. With
    `descriptor_only` (a disk cache holds the layer) only the descriptor is fetched; else the
    metadata too, and with `first_frame` the first frame and its hash blocks (the kernel
    mount reads them first)."""

    def __init__(self, blob_url: str, *, descriptor: str | None = None,
                 known: Descriptor | None = None,
                 headers: Mapping[str, str] | None = None, verify_tls: bool | str = True,
                 tree_window_bytes: int, first_frame: bool = True,
                 descriptor_only: bool = False) -> None:
        super().__init__(blob_url, headers=headers, verify_tls=verify_tls,
                         tree_window_bytes=tree_window_bytes)
        self._url = blob_url
        self._path = path_of(self._parts)
        self._descriptor = descriptor
        self._known = known
        self._descriptor_only = descriptor_only and known is None
        self._first_frame_too = first_frame and not self._descriptor_only
        self._answers = PrimedAnswers()
        frame_end = self._frame_end() if self._first_frame_too else None
        self._layer_frame_end = frame_end
        self._thread(self._open_layer, "head-start",
                     then=None if frame_end is None else lambda: frame_end.tell(None))
        if frame_end is not None:
            # On a second connection while the first asks for the metadata.
            self._thread(lambda connection: self._first_frame(connection, self._path,
                                                              self._answers, frame_end),
                         "head-start-frame")

    @staticmethod
    def applies_to(blob_url: str, descriptor: str | None) -> bool:
        """Whether a head start can help: an http(s) blob URL without credentials in it, and
        a descriptor that is beside it, in a local file or at an http(s) URL of the same
        origin."""
        parts = urlsplit(blob_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
            return False
        if descriptor is None or is_local(descriptor):
            return True
        other = urlsplit(descriptor)
        return (other.scheme, other.netloc) == (parts.scheme, parts.netloc)

    def start(self) -> HeadStart:
        self._start_threads()
        return self

    def finish(self, wait_s: float) -> PrimedAnswers:
        """The answers received within `wait_s` more seconds; later ones are dropped."""
        self._finish(wait_s)
        return self._answers

    def _open_layer(self, connection: Connection) -> None:
        descriptor = self._known
        if descriptor is not None:
            annotations = descriptor.seekable()
        else:
            for location in descriptor_locations(self._url, self._descriptor):
                text = self._get_document(connection, location)
                if text is not None:
                    descriptor = parse_descriptor(text, location)
                    annotations = descriptor.seekable(location)
                    break
        if descriptor is None or self._descriptor_only:
            return
        self._layer_metadata(connection, self._path, self._answers, annotations,
                             descriptor.size, hash_blocks=self._first_frame_too,
                             frame_end=self._layer_frame_end)

    def _get_document(self, connection: Connection, url: str) -> bytes | None:
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) != (self._parts.scheme, self._parts.netloc):
            raise EarlyStop(f"{url}: another origin")
        response = self._send(connection, path_of(parts))
        body = response.read(MAX_DOCUMENT_BYTES + 1)
        if response.status == 404:
            self._keep_document(url, None, len(body))
            return None
        if response.status != 200 or len(body) > MAX_DOCUMENT_BYTES:
            raise EarlyStop(f"{url}: HTTP {response.status}")
        self._keep_document(url, body, len(body))
        return body

    def _keep_document(self, url: str, body: bytes | None, length: int) -> None:
        def record() -> None:
            self._answers.documents[url] = body
            self._answers.requests += 1
            self._answers.bytes_fetched += length

        self._keep(record)


def read_descriptor_file(location: str) -> Descriptor | None:
    """The descriptor in the local file `location` (a path or file:// URL), at once; None
    when it cannot be read or is no descriptor of a seekable layer (the daemon reads it again
    and says why)."""
    try:
        with open(location.removeprefix("file://"), "rb") as stream:
            text = stream.read(MAX_DOCUMENT_BYTES + 1)
        if len(text) > MAX_DOCUMENT_BYTES:
            return None
        descriptor = parse_descriptor(text, location)
        descriptor.seekable(location)
    except (OSError, LazyfsError) as exc:
        log.info("head start: no descriptor: %s", exc)
        return None
    return descriptor
