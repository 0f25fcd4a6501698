"""TLS contexts shared by every connection of the process, their CA certificates loaded once,
in the background, and only when a connection needs them.

Loading a CA bundle costs tens of milliseconds of CPU, and an httpx client loads one when it
is made: a mount paid it once per layer and again per descriptor, also for plain-HTTP blobs
that never meet TLS. A context here starts loading in a thread when a client for an https
URL is made (the load overlaps the TCP handshake) and makes a handshake wait for it; one for
http origins loads only if a redirect leads to https. Until its CA certificates are loaded a
context trusts nothing, so a handshake that somehow came first would fail, never pass.
"""

from __future__ import annotations

import atexit
import os
import socket
import ssl
import threading
from functools import cache

# How long a process ending while CA certificates load waits for them (they take tens of ms).
LOAD_WAIT_AT_EXIT_S = 10.0


class LazyCAContext(ssl.SSLContext):
    """A verifying client context (as `ssl.create_default_context`) whose CA certificates
    load on first use, or in the background after `start_loading`."""

    _lock: threading.Lock
    _loader: threading.Thread | None
    _locations: tuple[str | None, str | None]
    _error: BaseException | None

    def _setup(self, cafile: str | None, capath: str | None) -> None:
        self._lock = threading.Lock()
        self._loader = None
        self._locations = (cafile, capath)
        self._error = None

    def start_loading(self) -> None:
        """Load the CA certificates in a thread now, so that a handshake soon finds them."""
        with self._lock:
            if self._loader is None:
                self._loader = threading.Thread(target=self._load, name="lazyfs-tls-ca",
                                                daemon=True)
                self._loader.start()
                # OpenSSL loads them without holding the interpreter: a process that ends
                # meanwhile (a command failing fast) must not free the context under it.
                atexit.register(self._loader.join, LOAD_WAIT_AT_EXIT_S)

    def _ensure_loaded(self) -> None:
        self.start_loading()
        assert self._loader is not None
        self._loader.join()
        if self._error is not None:
            raise ssl.SSLError(f"cannot load CA certificates: {self._error}")

    def _load(self) -> None:
        cafile, capath = self._locations
        try:
            if cafile is None and capath is None:
                self.load_default_certs()
            else:
                self.load_verify_locations(cafile=cafile, capath=capath)
        except (OSError, ssl.SSLError) as exc:
            self._error = exc

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        self._ensure_loaded()
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        self._ensure_loaded()
        return super().wrap_socket(sock, server_side, do_handshake_on_connect,
                                   suppress_ragged_eofs, server_hostname, session)


@cache
def tls_context(verify: bool | str) -> ssl.SSLContext | bool:
    """The process's context for `ReaderOptions.verify_tls`: False (no verification), True
    (httpx's choice of CAs: $SSL_CERT_FILE, $SSL_CERT_DIR, else certifi's bundle) or a CA
    bundle path."""
    if verify is False:
        return False
    cafile: str | None = None
    capath: str | None = None
    if isinstance(verify, str):
        cafile, capath = (None, verify) if os.path.isdir(verify) else (verify, None)
    elif os.environ.get("SSL_CERT_FILE"):
        cafile = os.environ["SSL_CERT_FILE"]
    elif os.environ.get("SSL_CERT_DIR"):
        capath = os.environ["SSL_CERT_DIR"]
    else:
        try:
            import certifi
        except ImportError:  # the system's CAs then
            pass
        else:
            cafile = certifi.where()
    context = LazyCAContext(ssl.PROTOCOL_TLS_CLIENT)
    context._setup(cafile, capath)
    return context
