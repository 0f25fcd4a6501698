"""A registry endpoint that stalls, for tests of how long a command waits for an image: it
answers the API check (`GET /v2/`) and then, for a manifest (or the token a manifest
needs), either sends the headers of an answer and nothing more (`headers`), or says nothing
at all (`silent`). Threads on 127.0.0.1; stalled answers are held until the server stops.

    with StallingRegistry("headers") as registry:
        ...  # lazyfs mount {registry.host}/app:v1 ... --insecure-registry
        registry.requests  # the paths asked for, in order

With `token=True` every manifest answers 401 with a Bearer challenge whose realm is this
server's `/token`, and it is the token that stalls.
"""

from __future__ import annotations

import http.server
import threading
from types import TracebackType

MODES = ("headers", "silent")
STALL_LIMIT_S = 60.0
# What a stalled answer promises to send (and never does).
PROMISED_BYTES = 1234


class StallingRegistry:
    """The server; `host` is `127.0.0.1:PORT`."""

    def __init__(self, mode: str, *, token: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        self.token = token
        self.requests: list[str] = []
        self._released = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StallingRegistry:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                server.requests.append(path)
                if path == "/v2/":
                    self._answer(200, b"{}", {"Content-Type": "application/json"})
                elif "/manifests/" in path and server.token:
                    realm = f"http://{server.host}/token"
                    challenge = f'Bearer realm="{realm}",service="stalling"'
                    self._answer(401, b"", {"WWW-Authenticate": challenge})
                elif "/manifests/" in path or path == "/token":
                    self._stall()
                else:
                    self._answer(404, b"")

            def do_HEAD(self) -> None:
                self.do_GET()

            def _stall(self) -> None:
                if server.mode == "headers":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                    self.send_header("Content-Length", str(PROMISED_BYTES))
                    self.end_headers()
                    self.wfile.flush()
                server._released.wait(STALL_LIMIT_S)
                self.close_connection = True

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
