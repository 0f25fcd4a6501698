"""The first requests of a mount, made while the command is still starting up.

`lazyfs mount URL` spends its first tenth of a second or more importing trio, pyfuse3 and
httpx before its daemon can ask the server for anything, and then opens the layer with a few
requests one after another: the descriptor beside the blob, the metadata range, the start of
the first frame (the EROFS superblock and the root directory) and the hash blocks over it.
None of those requests needs the imports, so a `HeadStart` thread makes them first, with the
standard library alone, and the round trips overlap the imports; the first frame, which
starts the blob, comes on a second connection at the same time. A descriptor in a local file
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

import http.client
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from lazyfs.errors import LazyfsError
from lazyfs.format.descriptor import (
    Descriptor,
    SeekableAnnotations,
    descriptor_locations,
    is_local,
    parse_descriptor,
)
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.format.layout import parse_metadata
from lazyfs.format.open_plan import chunk_hash_blocks, contiguous, metadata_pieces, metadata_ranges

log = logging.getLogger(__name__)

# Of the first frame: enough for the superblock and the first directories and inodes.
FIRST_FRAME_BYTES = 256 * 1024
MAX_DOCUMENT_BYTES = 1024 * 1024
SOCKET_TIMEOUT_S = 5.0
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)")


@dataclass
class PrimedAnswers:
    """Answers fetched before the daemon's reader existed. Each serves one request: a
    document (GET of a whole small resource; None for a 404) by URL, a range when it holds
    every byte asked for (or, for a stream, the first ones)."""

    documents: dict[str, bytes | None] = field(default_factory=dict)
    # start: (body, the blob size its Content-Range named)
    ranges: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    requests: int = 0
    bytes_fetched: int = 0

    def add_range(self, start: int, body: bytes, blob_size: int) -> None:
        self.ranges[start] = (body, blob_size)
        self.requests += 1
        self.bytes_fetched += len(body)

    def take_document(self, url: str) -> tuple[bool, bytes | None]:
        """(True, body) once for a URL fetched early, else (False, None)."""
        if url in self.documents:
            return True, self.documents.pop(url)
        return False, None

    def take_range(self, start: int, end: int, *,
                   whole: bool = True) -> tuple[bytes, int, int] | None:
        """Bytes `start..end` (inclusive), the blob size and the bytes the answer took to
        fetch, from the one primed answer that holds `start`; with `whole`, only if it holds
        `end` too. The answer is used up."""
        for first, (body, blob_size) in self.ranges.items():
            if first <= start < first + len(body) and (not whole or end < first + len(body)):
                del self.ranges[first]
                return body[start - first:end - first + 1], blob_size, len(body)
        return None


class EarlyStop(Exception):
    """The head start ends here (the daemon will do the rest); `late`: because the daemon no
    longer waits for it."""

    def __init__(self, reason: str, *, late: bool = False) -> None:
        super().__init__(reason)
        self.late = late


class EarlyRequests:
    """Threads making a command's first requests to one origin with the standard library,
    each on its own keep-alive connection; what they receive is kept until `finish`, and
    nothing after it. The ways to fetch a layer's first answers are here; subclasses say
    which layer (`HeadStart`: a blob URL; the registry one: an image's layers)."""

    def __init__(self, origin: str, *, headers: Mapping[str, str] | None = None,
                 verify_tls: bool | str = True, tree_window_bytes: int) -> None:
        self._parts = urlsplit(origin)
        self._headers = dict(headers or {})
        self._verify_tls = verify_tls
        self._tree_window_bytes = tree_window_bytes
        self._lock = threading.Lock()
        self._finished = False
        self._threads: list[threading.Thread] = []

    def _thread(self, work: Callable[[http.client.HTTPConnection], None], name: str) -> None:
        self._threads.append(threading.Thread(target=self._on_connection, args=(work,),
                                              name=f"lazyfs-{name}", daemon=True))

    def _start_threads(self) -> None:
        for thread in self._threads:
            thread.start()

    def _finish(self, wait_s: float) -> None:
        """Wait up to `wait_s` seconds for the threads; nothing is kept after this."""
        deadline = time.monotonic() + wait_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._finished = True

    def _on_connection(self, work: Callable[[http.client.HTTPConnection], None]) -> None:
        try:
            connection = _connect(self._parts, self._verify_tls)
            # Now, not at the first request: a thread that waits for another's answer first
            # has its handshake done by then.
            connection.connect()
        except (OSError, ValueError, LazyfsError, http.client.HTTPException) as exc:
            log.info("head start: no connection to %s (%s); the daemon asks itself",
                     self._parts.netloc, exc)
            return
        try:
            work(connection)
        except EarlyStop as exc:
            # "too late": the daemon went ahead without it, as it should.
            log.log(logging.DEBUG if exc.late else logging.INFO, "head start ends: %s", exc)
        except (OSError, http.client.HTTPException, LazyfsError, ValueError) as exc:
            log.info("head start ends: %s; the daemon asks itself", exc)
        except Exception:  # a head start only saves time: the mount goes on without it
            log.warning("head start: unexpected failure (the daemon asks itself)",
                        exc_info=True)
        finally:
            connection.close()

    def _keep(self, record: Callable[[], None]) -> None:
        """Record an answer, unless `finish` has passed (then this head start ends)."""
        with self._lock:
            if self._finished:
                raise EarlyStop("too late", late=True)
            record()

    def _send(self, connection: http.client.HTTPConnection, path: str,
              headers: Mapping[str, str] | None = None) -> http.client.HTTPResponse:
        connection.request("GET", path, headers={**self._headers, **(headers or {})})
        return connection.getresponse()

    def _get_range(self, connection: http.client.HTTPConnection, path: str,
                   answers: PrimedAnswers, start: int, end: int, size: int | None) -> bytes:
        """The blob's bytes `[start, end)`, kept in `answers`; the blob must be `size` bytes
        (unknown: then the answer may end early, where the blob does)."""
        response = self._send(connection, path, {
            "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        body = response.read(end - start + 1)
        found = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range", "").strip())
        if found is not None and size is None:
            size = int(found.group(3))
            end = min(end, size)
        if (response.status != 206 or found is None
                or response.getheader("Content-Encoding", "identity").lower() != "identity"
                or (int(found.group(1)), int(found.group(2))) != (start, end - 1)
                or int(found.group(3)) != size or len(body) != end - start):
            raise EarlyStop(f"bytes {start}-{end - 1}: HTTP {response.status}, not the range asked")
        self._keep(lambda: answers.add_range(start, body, size))
        return body

    def _first_frame(self, connection: http.client.HTTPConnection, path: str,
                     answers: PrimedAnswers) -> None:
        """The start of the first frame: data frames start at offset 0, so it needs no
        metadata to be located."""
        self._get_range(connection, path, answers, 0, FIRST_FRAME_BYTES, None)

    def _layer_metadata(self, connection: http.client.HTTPConnection, path: str,
                        answers: PrimedAnswers, annotations: SeekableAnnotations, size: int,
                        hash_blocks: bool) -> None:
        """What opening the layer reads (its metadata range), then with `hash_blocks` the
        hash blocks over its first chunk that the range did not hold."""
        fetched: dict[int, bytes] = {}
        for start, end in metadata_ranges(annotations, size, self._tree_window_bytes):
            stop = size if end is None else min(end, size)
            fetched[start] = self._get_range(connection, path, answers, start, stop, size)
        table, verity_head = metadata_pieces(fetched, annotations)
        metadata = parse_metadata(annotations, size, table, verity_head)
        if (not hash_blocks or metadata.table.chunk_count == 0
                or metadata.verity is None or verity_head is None):
            return
        # Hash blocks the metadata range held whole are verified from it; fetch the others.
        block = metadata.verity.superblock.hash_block_size
        window_end = len(verity_head) - SKIPPABLE_HEADER_SIZE
        missing = [offset for offset in chunk_hash_blocks(metadata, 0)
                   if offset + block > window_end]
        for run in contiguous(missing, block):
            start = metadata.verity_payload_offset + run[0]
            self._get_range(connection, path, answers, start, start + len(run) * block, size)


class HeadStart(EarlyRequests):
    """Fetch in a thread what opening the layer at `blob_url` asks for first (see the module
    docstring). `descriptor` is the descriptor URL the user gave (else the ones beside the
    blob are tried, as the daemon will), or `known` the descriptor read from the user's file
    (then nothing precedes the metadata); `headers` go with every request. With
    `descriptor_only` (a disk cache holds the layer) only the descriptor is fetched; else the
    metadata too, and with `first_frame` the start of the first frame and its hash blocks
    (the kernel mount reads them first)."""

    def __init__(self, blob_url: str, *, descriptor: str | None = None,
                 known: Descriptor | None = None,
                 headers: Mapping[str, str] | None = None, verify_tls: bool | str = True,
                 tree_window_bytes: int, first_frame: bool = True,
                 descriptor_only: bool = False) -> None:
        super().__init__(blob_url, headers=headers, verify_tls=verify_tls,
                         tree_window_bytes=tree_window_bytes)
        self._url = blob_url
        self._path = _path_of(self._parts)
        self._descriptor = descriptor
        self._known = known
        self._descriptor_only = descriptor_only and known is None
        self._first_frame_too = first_frame and not self._descriptor_only
        self._answers = PrimedAnswers()
        self._thread(self._open_layer, "head-start")
        if self._first_frame_too:
            # On a second connection while the first asks for the metadata.
            self._thread(lambda connection: self._first_frame(connection, self._path,
                                                              self._answers),
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

    def _open_layer(self, connection: http.client.HTTPConnection) -> None:
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
                             descriptor.size, hash_blocks=self._first_frame_too)

    def _get_document(self, connection: http.client.HTTPConnection, url: str) -> bytes | None:
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) != (self._parts.scheme, self._parts.netloc):
            raise EarlyStop(f"{url}: another origin")
        response = self._send(connection, _path_of(parts))
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


def _connect(parts: SplitResult, verify_tls: bool | str) -> http.client.HTTPConnection:
    host = parts.hostname or ""
    if parts.scheme == "https":
        from lazyfs.fetch.tls import tls_context

        context = tls_context(verify_tls)
        if isinstance(context, bool):
            raise ValueError("TLS without verification: left to the daemon")
        return http.client.HTTPSConnection(host, parts.port, timeout=SOCKET_TIMEOUT_S,
                                           context=context)
    return http.client.HTTPConnection(host, parts.port, timeout=SOCKET_TIMEOUT_S)


def _path_of(parts: SplitResult) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
