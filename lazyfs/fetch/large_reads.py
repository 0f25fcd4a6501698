"""httpx connections that read a response body in large pieces.

httpcore asks its socket for 64 KiB at a time, and each piece then travels through h11,
httpcore and httpx on the event loop before it reaches a frame's stream: in a bulk read over a
fast link that was a third of the daemon's main thread (a 2 GiB blob is 32,000 pieces). The
streams of this network backend ask for READ_BYTES whenever less is asked: the socket hands
over what it holds, up to that, so a body that arrives faster than it is taken comes in pieces
of most of a MiB (measured: 880 KB on average over loopback, against 64 KiB), and a slow one
as it arrives, as before. Everything else passes through to httpcore's own backend.
"""

from __future__ import annotations

import logging
import ssl
import typing

import httpcore
import httpx

log = logging.getLogger(__name__)

READ_BYTES = 1024 * 1024
# httpcore's type of socket options (its SOCKET_OPTION is not exported).
SocketOptions = typing.Iterable[
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]]


class LargeReadStream(httpcore.AsyncNetworkStream):
    """A connection's stream that reads up to READ_BYTES at a time."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max(max_bytes, READ_BYTES), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return LargeReadStream(await self._stream.start_tls(ssl_context, server_hostname,
                                                            timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class LargeReadBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend `inner`, its streams reading large pieces."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,
        local_address: str | None = None, socket_options: SocketOptions | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return LargeReadStream(await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: SocketOptions | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return LargeReadStream(await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def large_read_transport(verify: ssl.SSLContext | bool,
                         limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's own transport (HTTP/1.1), its connection pool on a LargeReadBackend. httpx
    takes no network backend, so the pool it made is given one; should a later httpx keep
    its pool elsewhere, the transport reads 64 KiB pieces as before (and a test says so)."""
    transport = httpx.AsyncHTTPTransport(verify=verify, http1=True, http2=False, limits=limits)
    pool = getattr(transport, "_pool", None)
    inner = getattr(pool, "_network_backend", None)
    if isinstance(pool, httpcore.AsyncConnectionPool) and inner is not None:
        pool._network_backend = LargeReadBackend(inner)
    else:
        log.debug("httpx keeps its connection pool elsewhere: bodies come in 64 KiB pieces")
    return transport
