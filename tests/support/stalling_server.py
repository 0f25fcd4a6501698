"""A range server for tests that can stall mid-answer: it serves a directory over HTTP/1.1
with byte ranges (206, Content-Range, an ETag, keep-alive), logs every request, and holds
an answer after a set number of body bytes until the test releases it, as a slow or stuck
link would. Runs in threads on 127.0.0.1, so synchronous tests can drive trio code against it.

    with StallingServer(directory) as server:
        gate = server.stall("/layer.blob", start=frame_offset, after_bytes=half)
        ...  # a reader gets `half` bytes of that range, then nothing
        gate.set()  # the rest follows

`stall_at` holds every answer that reaches a given byte, retries and resumed ranges
included, as a link that breaks at the same place each time would.
"""

from __future__ import annotations

import http.server
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

STALL_LIMIT_S = 30.0
_RANGE = re.compile(r"bytes=(\d+)-(\d+)$")


@dataclass
class _Stall:
    path: str
    start: int
    after_bytes: int
    gate: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)
    every: bool = False  # every answer covering byte `start`, not only the next one at it


class StallingServer:
    """Serves `root`; `requests` lists (path, first byte, last byte) of every range asked."""

    def __init__(self, root: Path, tls: ssl.SSLContext | None = None) -> None:
        """Serve `root`; with `tls` (a server context), over https."""
        self.root = Path(root)
        self.requests: list[tuple[str, int, int]] = []
        self._stalls: list[_Stall] = []
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def stall(self, path: str, start: int, after_bytes: int) -> threading.Event:
        """Hold the next answer to a range of `path` starting at `start` after `after_bytes`
        body bytes, until the returned event is set (or STALL_LIMIT_S passed)."""
        stall = _Stall(path, start, after_bytes)
        with self._lock:
            self._stalls.append(stall)
        return stall.gate

    def stall_at(self, path: str, offset: int) -> threading.Event:
        """Hold every answer to a range of `path` that covers byte `offset`, after the bytes
        before it, until the returned event is set (or STALL_LIMIT_S passed)."""
        stall = _Stall(path, offset, 0, every=True)
        with self._lock:
            self._stalls.append(stall)
        return stall.gate

    def wait_stalled(self, timeout_s: float = 10.0) -> bool:
        """Wait until every stall set so far has held an answer."""
        with self._lock:
            stalls = list(self._stalls)
        return all(stall.reached.wait(timeout_s) for stall in stalls)

    def release_all(self) -> None:
        with self._lock:
            for stall in self._stalls:
                stall.gate.set()

    def __enter__(self) -> StallingServer:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _take_stall(self, path: str, start: int, end: int) -> tuple[_Stall, int] | None:
        """The stall that holds an answer of bytes `start..end`, and after how many bytes."""
        with self._lock:
            for stall in self._stalls:
                if stall.path != path:
                    continue
                if stall.every:
                    if start <= stall.start <= end and not stall.gate.is_set():
                        stall.reached.set()
                        return stall, stall.start - start
                elif stall.start == start and not stall.reached.is_set():
                    stall.reached.set()
                    return stall, stall.after_bytes
        return None

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                target = server.root / path.lstrip("/")
                if not target.is_file() or ".." in path:
                    self._answer(404, b"not found\n")
                    return
                data = target.read_bytes()
                match = _RANGE.match(self.headers.get("Range", ""))
                if match is None:
                    server.requests.append((path, 0, len(data) - 1))
                    self._answer(200, data)
                    return
                start, end = int(match.group(1)), min(int(match.group(2)), len(data) - 1)
                server.requests.append((path, start, end))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{len(data)}"')
                self.end_headers()
                taken = server._take_stall(path, start, end)
                if taken is None:
                    self.wfile.write(body)
                    return
                stall, after_bytes = taken
                self.wfile.write(body[:after_bytes])
                self.wfile.flush()
                stall.gate.wait(STALL_LIMIT_S)
                self.wfile.write(body[after_bytes:])

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
