"""nginx for tests: `serve_directory(root)` skips the test where nginx is missing; the
`nginx_server` fixture is a factory that stops every server it started. A test module makes
the fixture its own by name:

    from tests.support import nginx
    nginx_server = nginx.nginx_server
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tools.nginx_server import NginxMissingError, NginxServer, free_port, nginx_binary
from tools.nginx_server import serve_directory as _serve_directory

__all__ = ["NginxServer", "free_port", "nginx_binary", "nginx_server", "serve_directory"]


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[NginxServer]:
    """Serve `root` on a free 127.0.0.1 port; skip the test when nginx is not installed."""
    try:
        context = _serve_directory(root)
        server = context.__enter__()
    except NginxMissingError as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        context.__exit__(None, None, None)


@pytest.fixture
def nginx_server() -> Iterator[Callable[[Path], NginxServer]]:
    """A factory: `nginx_server(root)` starts a server; all are stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(root: Path) -> NginxServer:
            return stack.enter_context(serve_directory(root))

        yield start
