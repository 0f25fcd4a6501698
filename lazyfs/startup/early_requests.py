"""The start-up's bare HTTP transport: a command's first requests to one origin, made with the
standard library in threads while the command still imports the rest (httpx, trio, pyfuse3).
The one module that speaks `http.client`; `head_start` (a layer URL) and
`registry_head_start` (an image in a registry) say what to ask for. Whatever goes wrong ends
the head start with one line at INFO (`-v`); only a bug is a warning, with its traceback.

A long answer (the rest of a layer's first frame) is read in pieces, and `finish` does not
wait for it: what has arrived is handed over as an answer, and the rest still arriving with
its connection (`ArrivingRest`), which the daemon reads on, forked or not, instead of asking
again for bytes already on their way."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from lazyfs.errors import LazyfsError
from lazyfs.fetch.primed import ArrivingRest, PrimedAnswers
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.format.layout import BlobMetadata, parse_metadata
from lazyfs.format.open_plan import chunk_hash_blocks, contiguous, metadata_pieces, metadata_ranges

log = logging.getLogger("lazyfs.startup.head_start")

# Of the first frame, asked for before its size is known: enough for the superblock and the
# first directories and inodes. The rest of the frame follows once the chunk table says where
# it ends (the daemon reads it whole before the first file: the kernel's mount and the first
# lookups need it, and the link is idle while the command imports).
FIRST_FRAME_BYTES = 256 * 1024
# A long answer is read in pieces of up to this much: what arrived before `finish` is kept.
PIECE_BYTES = 64 * 1024
# How long `finish` waits for a long answer's piece being read, to hand the rest over.
HAND_OVER_WAIT_S = 0.05
SOCKET_TIMEOUT_S = 5.0
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)")

# One keep-alive connection to the origin, as the subclasses' request steps receive it.
Connection = http.client.HTTPConnection


class EarlyStop(Exception):
    """The head start ends here (the daemon will do the rest); `late`: because the daemon no
    longer waits for it."""

    def __init__(self, reason: str, *, late: bool = False) -> None:
        super().__init__(reason)
        self.late = late


class FrameEnd:
    """Where a layer's first frame ends and the blob's size, told by the thread that reads
    the layer's metadata to the one that fetches the frame; None once nobody will tell."""

    def __init__(self) -> None:
        self._told = threading.Event()
        self._lock = threading.Lock()
        self._value: tuple[int, int] | None = None

    def tell(self, value: tuple[int, int] | None) -> None:
        """The first frame's end and the blob size (the first call only counts)."""
        with self._lock:
            if not self._told.is_set():
                self._value = value
                self._told.set()

    def wait(self) -> tuple[int, int] | None:
        self._told.wait()
        return self._value


@dataclass
class _Arriving:
    """A long range answer being read (`_get_range_in_pieces`)."""

    answers: PrimedAnswers
    start: int
    length: int
    blob_size: int
    connection: Connection
    response: http.client.HTTPResponse | None = None  # once its headers are checked
    received: bytearray = field(default_factory=bytearray)
    reading: bool = True  # the thread is on the connection (asking, or reading a piece)


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
        self._lock = threading.Condition()
        self._finished = False
        self._threads: list[threading.Thread] = []
        # Set when a thread's answers are all in, or when it goes on only with what the
        # daemon could do without (`_no_wait_from_here`): `finish` waits for these.
        self._waited_for: dict[threading.Thread, threading.Event] = {}
        self._arriving: list[_Arriving] = []  # long answers being read
        # The ids of their connections `finish` has taken over from their threads.
        self._taken: set[int] = set()
        self._frame_ends: list[FrameEnd] = []

    def _thread(self, work: Callable[[Connection], None], name: str,
                then: Callable[[], None] | None = None) -> None:
        """A thread running `work` on a connection of its own, then `then` (whatever
        happened, without a connection too)."""
        thread = threading.Thread(target=self._on_connection, args=(work, then),
                                  name=f"lazyfs-{name}", daemon=True)
        self._threads.append(thread)
        self._waited_for[thread] = threading.Event()

    def _start_threads(self) -> None:
        for thread in self._threads:
            thread.start()

    def _finish(self, wait_s: float) -> None:
        """Wait up to `wait_s` seconds for the threads; nothing is kept after this."""
        deadline = time.monotonic() + wait_s
        for thread in self._threads:
            self._waited_for[thread].wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._finished = True
            for arriving in self._arriving:
                self._hand_over(arriving)
            self._arriving.clear()
        for frame_end in self._frame_ends:
            frame_end.tell(None)  # a frame thread still waiting gives up

    def _on_connection(self, work: Callable[[Connection], None],
                       then: Callable[[], None] | None) -> None:
        try:
            self._on_own_connection(work)
        finally:
            if then is not None:
                then()
            self._no_wait_from_here()

    def _no_wait_from_here(self) -> None:
        """What this thread fetches from now on, `finish` does not wait for (it takes what
        has arrived of it)."""
        self._waited_for[threading.current_thread()].set()

    def _hand_over(self, arriving: _Arriving) -> None:
        """Hand a long answer still under way over (with the lock held, at `finish`): what
        has arrived as an answer, and the rest as it comes on its connection, once the
        piece being read is in (within `HAND_OVER_WAIT_S`; else the daemon's reader fetches
        the rest itself)."""
        self._lock.wait_for(lambda: not arriving.reading, HAND_OVER_WAIT_S)
        answers, received = arriving.answers, arriving.received
        if received:
            answers.add_range(arriving.start, bytes(received), arriving.blob_size)
        if arriving.reading:
            return  # the thread keeps its connection, and closes it
        connection, response = arriving.connection, arriving.response
        self._taken.add(id(connection))  # not the thread's to close any more
        left = arriving.length - len(received)
        if left <= 0 or response is None or response.isclosed():
            connection.close()
            return
        fd = response.fileno()

        def close() -> None:
            # Shut down first: a read blocked in another thread returns at once.
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            response.close()
            connection.close()

        answers.rests[arriving.start + len(received)] = ArrivingRest(
            read=response.read1, close=close, fd=fd, length=left, blob_size=arriving.blob_size)

    def _on_own_connection(self, work: Callable[[Connection], None]) -> None:
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
            with self._lock:  # one whose answer is still arriving is for `finish` to close
                kept = id(connection) in self._taken or any(
                    arriving.connection is connection for arriving in self._arriving)
            if not kept:
                connection.close()

    def _keep(self, record: Callable[[], None]) -> None:
        """Record an answer, unless `finish` has passed (then this head start ends)."""
        with self._lock:
            if self._finished:
                raise EarlyStop("too late", late=True)
            record()

    def _send(self, connection: Connection, path: str,
              headers: Mapping[str, str] | None = None) -> http.client.HTTPResponse:
        connection.request("GET", path, headers={**self._headers, **(headers or {})})
        return connection.getresponse()

    def _get_range(self, connection: Connection, path: str,
                   answers: PrimedAnswers, start: int, end: int, size: int | None) -> bytes:
        """The blob's bytes `[start, end)`, kept in `answers`; the blob must be `size` bytes
        (unknown: then the answer may end early, where the blob does)."""
        response = self._ask_range(connection, path, start, end)
        body = response.read(end - start + 1)
        end, known = _checked_range(response, start, end, size)
        if len(body) != end - start:
            raise EarlyStop(f"bytes {start}-{end - 1}: HTTP {response.status}, not the range asked")
        self._keep(lambda: answers.add_range(start, body, known))
        return body

    def _ask_range(self, connection: Connection, path: str, start: int,
                   end: int) -> http.client.HTTPResponse:
        """The response to a request for the blob's bytes `[start, end)` (its body unread)."""
        return self._send(connection, path, {
            "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})

    def _get_range_in_pieces(self, connection: Connection, path: str,
                             answers: PrimedAnswers, start: int, end: int, size: int) -> None:
        """As `_get_range` for a long range of a blob of `size` bytes, read piece by piece:
        when `finish` comes before its end, what has arrived is handed over as an answer,
        and the rest as it arrives (`_hand_over`)."""
        arriving = _Arriving(answers, start, end - start, size, connection)
        with self._lock:
            if self._finished:
                raise EarlyStop("too late", late=True)
            self._arriving.append(arriving)
        try:
            response = self._range_response(connection, path, start, end, size)
            with self._lock:
                arriving.response = response
            while self._read_piece(arriving, response):
                pass
        finally:
            with self._lock:  # a short answer too: what arrived is a prefix of the range
                arriving.reading = False
                self._lock.notify_all()
                if not self._finished:
                    self._arriving.remove(arriving)
                    if arriving.received:
                        answers.add_range(start, bytes(arriving.received), size)

    def _range_response(self, connection: Connection, path: str, start: int, end: int,
                        size: int) -> http.client.HTTPResponse:
        """The response to a request for the blob's bytes `[start, end)`, its headers
        checked (its body not read yet)."""
        response = self._ask_range(connection, path, start, end)
        _checked_range(response, start, end, size)
        return response

    def _read_piece(self, arriving: _Arriving, response: http.client.HTTPResponse) -> bool:
        """Read the next piece of `arriving`; returns whether there is more to read (not
        once `finish` has come: its rest is handed over)."""
        with self._lock:
            arriving.reading = False
            self._lock.notify_all()
            left = arriving.length - len(arriving.received)
            if self._finished or left <= 0:
                return False
            arriving.reading = True
        piece = response.read1(min(PIECE_BYTES, left))
        with self._lock:
            arriving.received += piece
        return bool(piece)

    def _first_frame(self, connection: Connection, path: str, answers: PrimedAnswers,
                     frame_end: FrameEnd | None = None) -> None:
        """The start of the first frame: data frames start at offset 0, so it needs no
        metadata to be located; then, with `frame_end`, the rest of the frame once the
        metadata says where it ends."""
        head = self._get_range(connection, path, answers, 0, FIRST_FRAME_BYTES, None)
        if frame_end is None:
            return
        self._no_wait_from_here()
        known = frame_end.wait()
        if known is not None and known[0] > len(head):
            end, size = known
            self._get_range_in_pieces(connection, path, answers, len(head), end, size)

    def _frame_end(self) -> FrameEnd:
        """A `FrameEnd` told None at `finish` at the latest."""
        frame_end = FrameEnd()
        self._frame_ends.append(frame_end)
        return frame_end

    def _layer_metadata(self, connection: Connection, path: str,
                        answers: PrimedAnswers, annotations: SeekableAnnotations, size: int,
                        hash_blocks: bool, frame_end: FrameEnd | None = None) -> None:
        """What opening the layer reads (its metadata range), then with `hash_blocks` the
        hash blocks over its first chunk that the range did not hold; `frame_end` is told
        where the first frame ends as soon as the metadata says."""
        fetched: dict[int, bytes] = {}
        for start, end in metadata_ranges(annotations, size, self._tree_window_bytes):
            stop = size if end is None else min(end, size)
            fetched[start] = self._get_range(connection, path, answers, start, stop, size)
        table, verity_head = metadata_pieces(fetched, annotations)
        metadata = parse_metadata(annotations, size, table, verity_head)
        if frame_end is not None:
            frame_end.tell(_first_frame_end(metadata, size))
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


def _checked_range(response: http.client.HTTPResponse, start: int, end: int,
                   size: int | None) -> tuple[int, int]:
    """(end, blob size) of a range answer to a request for `[start, end)` of a blob of `size`
    bytes (None: the answer names it, and the range may end early, where the blob does).
    Raises EarlyStop for any other answer."""
    found = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range", "").strip())
    if found is not None and size is None:
        size = int(found.group(3))
        end = min(end, size)
    if (response.status != 206 or found is None
            or response.getheader("Content-Encoding", "identity").lower() != "identity"
            or (int(found.group(1)), int(found.group(2))) != (start, end - 1)
            or int(found.group(3)) != size):
        raise EarlyStop(f"bytes {start}-{end - 1}: HTTP {response.status}, not the range asked")
    return end, size


def _first_frame_end(metadata: BlobMetadata, size: int) -> tuple[int, int] | None:
    """(where the first frame ends, the blob size); None for a layer without chunks."""
    if metadata.table.chunk_count == 0:
        return None
    return metadata.frame_range(0)[1], size


def _connect(parts: SplitResult, verify_tls: bool | str) -> Connection:
    host = parts.hostname or ""
    if parts.scheme == "https":
        from lazyfs.fetch.tls import tls_context

        context = tls_context(verify_tls)
        if isinstance(context, bool):
            raise ValueError("TLS without verification: left to the daemon")
        return http.client.HTTPSConnection(host, parts.port, timeout=SOCKET_TIMEOUT_S,
                                           context=context)
    return http.client.HTTPConnection(host, parts.port, timeout=SOCKET_TIMEOUT_S)


def path_of(parts: SplitResult) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
