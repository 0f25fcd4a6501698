"""A fault-injecting HTTP/1.1 range server on 127.0.0.1, for tests of what lazyfs does when
the network or the origin misbehaves.

It serves the files of a directory (GET, single `Range: bytes=A-B`, keep-alive) from a thread
of the test process, so a test switches faults while a `lazyfs mount` daemon reads from it:

    with FaultServer(directory) as server:
        server.add(Fault("status", times=10))            # the next 10 range requests get 503
        server.add(Fault("corrupt", at=offset, times=1))  # one response covering `offset`
        ...
        server.clear()

Faults apply to range requests of files whose name ends in `.blob` (descriptors are served
plainly). Each request takes the first fault that matches it (its range covers `at`, or any
range when `at` is None) and has uses left (`times`; None: every time). `etag_per_response`
gives every answer a new ETag and Last-Modified, as load-balanced origins with mtime-based
ETags do.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# What a fault does to a matching request.
KINDS = frozenset({
    "status",  # answer `status` (default 503) with a short body
    "corrupt",  # flip one bit of the byte at `at` in the body
    "reset",  # close the connection with a TCP reset before answering
    "short",  # promise the whole range, send half of it, close
    "stall",  # send nothing until the fault is cleared or the server stops
    "trickle",  # send the body at `rate_bytes_per_s`
    "ignore_range",  # answer 200 with the whole file
})
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


@dataclass
class Fault:
    kind: str
    at: int | None = None
    times: int | None = None
    status: int = 503
    rate_bytes_per_s: int = 2000
    name: str | None = None  # only for this file name (default: any .blob)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}")

    def matches(self, name: str, start: int, end: int) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.name is not None and name != self.name:
            return False
        return self.at is None or start <= self.at <= end


@dataclass
class Served:
    """One request as the server saw it: file, range, the fault it got (or None)."""

    name: str
    start: int
    end: int
    fault: str | None
    at: float = field(default_factory=time.monotonic)


class FaultServer:
    """The server; a context manager that starts it on a free port and stops it."""

    def __init__(self, root: Path, port: int = 0) -> None:
        self.root = root
        self.faults: list[Fault] = []
        self.served: list[Served] = []
        self.etag_per_response = False
        self.replacements: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._stopping = threading.Event()
        self._responses = 0
        self._connections: set[socket.socket] = set()
        handler = type("Handler", (_Handler,), {"owner": self})
        self._httpd = _Server(("127.0.0.1", port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving, as a server that dies: the port is closed, open connections are
        reset, stalled and trickling answers end at once."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault; stalled answers go on (and are served correctly)."""
        with self._lock:
            self.faults.clear()
        self._released.set()
        self._released = threading.Event()

    def swap(self, name: str, data: bytes | None) -> None:
        """Serve `data` as the file `name` from now on (None: the file again)."""
        with self._lock:
            if data is None:
                self.replacements.pop(name, None)
            else:
                self.replacements[name] = data

    def range_requests(self, fault: str | None = "any") -> list[Served]:
        """Range requests of .blob files served so far (with that fault; "any": all)."""
        with self._lock:
            return [s for s in self.served if fault == "any" or s.fault == fault]

    # -- for the handler -------------------------------------------------------------------

    def _take(self, name: str, start: int, end: int) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(name, start, end):
                    if fault.times is not None:
                        fault.times -= 1
                    self.served.append(Served(name, start, end, fault.kind))
                    return fault
            self.served.append(Served(name, start, end, None))
            return None

    def _content(self, name: str) -> bytes | None:
        with self._lock:
            replaced = self.replacements.get(name)
        if replaced is not None:
            return replaced
        path = self.root / name
        if "/" in name or not path.is_file():
            return None
        return path.read_bytes()

    def _validators(self, name: str, size: int) -> tuple[str, str]:
        """(ETag, Last-Modified) of a file: stable, or new at every answer."""
        mtime = os.stat(self.root / name).st_mtime if (self.root / name).exists() else 0.0
        if self.etag_per_response:
            with self._lock:
                self._responses += 1
                mtime += self._responses
        return f'"{int(mtime):x}-{size:x}"', formatdate(mtime, usegmt=True)

    def _wait_released(self, seconds: float | None = None) -> bool:
        """Block a handler until faults are cleared or the server stops (or `seconds`
        pass); True when released."""
        released = self._released
        deadline = None if seconds is None else time.monotonic() + seconds
        while not released.is_set() and not self._stopping.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            released.wait(0.05)
        return True


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (a reader giving up, a daemon stopping) are not news."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultServer

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.owner
        name = self.path.lstrip("/").partition("?")[0]
        data = owner._content(name)
        if data is None:
            self._plain(404, b"not found\n")
            return
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if match is None or not name.endswith(".blob"):
            self._plain(200, data, name)
            return
        start, end = int(match.group(1)), min(int(match.group(2)), len(data) - 1)
        if start >= len(data):
            self._plain(416, b"", extra={"Content-Range": f"bytes */{len(data)}"})
            return
        fault = owner._take(name, start, end)
        kind = fault.kind if fault is not None else None
        if fault is not None and kind == "stall":
            owner._wait_released()
            if owner._stopping.is_set():
                self._reset()
                return
            kind = None
        if fault is not None and kind == "status":
            self._plain(fault.status, b"injected fault\n")
            return
        if kind == "reset":
            self._reset()
            return
        if kind == "ignore_range":
            self._plain(200, data, name)
            return
        body = bytearray(data[start:end + 1])
        if fault is not None and kind == "corrupt" and fault.at is not None:
            body[fault.at - start] ^= 0x01
        etag, modified = owner._validators(name, len(data))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)
        self.end_headers()
        with contextlib.suppress(OSError):
            if kind == "short":
                self.wfile.write(bytes(body[:len(body) // 2]))
                self.wfile.flush()
                self._reset()
            elif kind == "trickle" and fault is not None:
                self._trickle(bytes(body), fault.rate_bytes_per_s)
            else:
                self.wfile.write(bytes(body))

    def _trickle(self, body: bytes, rate_bytes_per_s: int) -> None:
        step = max(1, rate_bytes_per_s // 10)
        for position in range(0, len(body), step):
            if self.owner._stopping.is_set():
                self._reset()
                return
            self.wfile.write(body[position:position + step])
            self.wfile.flush()
            time.sleep(0.1)

    def _plain(self, status: int, body: bytes, name: str | None = None,
               extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if name is not None:
            etag, modified = self.owner._validators(name, len(body))
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection: SO_LINGER 0 makes close() send a TCP reset."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
        self.close_connection = True
