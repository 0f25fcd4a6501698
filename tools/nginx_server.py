"""A throwaway nginx serving a directory on 127.0.0.1 with byte ranges, for the demo, the
benchmarks and the tests. `serve_directory(root)` is a context manager that stops it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

# $http_range and $status let tests see which ranges were asked and how they were answered.
CONF_TEMPLATE = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format ranges '$request_method $uri "$http_range" $status $body_bytes_sent';
    access_log {prefix}/access.log ranges;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


class NginxMissingError(RuntimeError):
    """No nginx executable was found."""


@dataclass
class NginxServer:
    """A running nginx: `url` ends with '/', files of the served root are below it."""

    url: str
    port: int
    access_log: Path
    error_log: Path
    process: subprocess.Popen[bytes]

    def access_lines(self) -> list[str]:
        """The access log so far, one request a line (method, uri, Range, status, bytes)."""
        if not self.access_log.exists():
            return []
        return self.access_log.read_text().splitlines()

    def stop(self) -> None:
        """Stop the server (idempotent); kill it if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def nginx_binary() -> str | None:
    """The nginx executable (usually not on a user's PATH: it lives in sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which("nginx", path=path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_listening(server: NginxServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"nginx exited with {server.process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nginx did not answer on port {server.port} within {START_TIMEOUT_S} s")


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[NginxServer]:
    """Serve `root` over HTTP on a free 127.0.0.1 port until the block exits.

    Raises NginxMissingError when nginx is not installed; retries on a port taken meanwhile.
    """
    binary = nginx_binary()
    if binary is None:
        raise NginxMissingError("nginx is not installed (Debian: apt-get install nginx-light)")
    with tempfile.TemporaryDirectory(prefix="lazyfs-nginx-") as prefix_dir:
        prefix = Path(prefix_dir)
        (prefix / "tmp").mkdir()
        conf = prefix / "nginx.conf"
        for _ in range(3):
            port = free_port()
            conf.write_text(
                CONF_TEMPLATE.format(prefix=prefix, port=port, root=Path(root).resolve())
            )
            process = subprocess.Popen(
                [binary, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            server = NginxServer(
                url=f"http://127.0.0.1:{port}/",
                port=port,
                access_log=prefix / "access.log",
                error_log=prefix / "error.log",
                process=process,
            )
            try:
                _wait_until_listening(server)
            except RuntimeError as exc:
                server.stop()
                errors = server.error_log.read_text() if server.error_log.exists() else ""
                if "Address already in use" in errors:
                    continue  # another process took the port between probe and bind
                raise RuntimeError(f"{exc}; error log:\n{errors}") from None
            try:
                yield server
            finally:
                server.stop()
            return
        raise RuntimeError("nginx could not bind a free port in 3 tries")
