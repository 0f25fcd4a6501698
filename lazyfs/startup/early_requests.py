"""The start-up's bare HTTP transport: a command's first requests to one origin, made with the
standard library in threads while the command still imports the rest (httpx, trio, pyfuse3).
The one module that speaks `http.client`; `head_start` (a layer URL) and
`registry_head_start` (an image in a registry) say what to ask for. Whatever goes wrong ends
the head start with one line at INFO (`-v`); only a bug is a warning, with its traceback."""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from urllib.parse import SplitResult, urlsplit

from lazyfs.errors import LazyfsError
from lazyfs.fetch.primed import PrimedAnswers
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.format.layout import parse_metadata
from lazyfs.format.open_plan import chunk_hash_blocks, contiguous, metadata_pieces, metadata_ranges

log = logging.getLogger("lazyfs.startup.head_start")

# Of the first frame: enough for the superblock and the first directories and inodes.
FIRST_FRAME_BYTES = 256 * 1024
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

    def _thread(self, work: Callable[[Connection], None], name: str) -> None:
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

    def _on_connection(self, work: Callable[[Connection], None]) -> None:
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

    def _send(self, connection: Connection, path: str,
              headers: Mapping[str, str] | None = None) -> http.client.HTTPResponse:
        connection.request("GET", path, headers={**self._headers, **(headers or {})})
        return connection.getresponse()

    def _get_range(self, connection: Connection, path: str,
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

    def _first_frame(self, connection: Connection, path: str,
                     answers: PrimedAnswers) -> None:
        """The start of the first frame: data frames start at offset 0, so it needs no
        metadata to be located."""
        self._get_range(connection, path, answers, 0, FIRST_FRAME_BYTES, None)

    def _layer_metadata(self, connection: Connection, path: str,
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
