"""Real registries for tests: Debian's docker-registry on 127.0.0.1, plus small servers around it.

- `Registry`: `docker-registry serve` with filesystem storage in a temp dir; anonymous, htpasswd
  (bcrypt, made with libcrypt) or token auth.
- `TokenServer`: issues the RS256 JWTs the registry's token auth verifies (signed with a fresh
  self-signed key through the `openssl` command; the registry trusts it via `rootcertbundle`).
- `RedirectingFrontEnd`: a proxy in front of a registry that answers blob GETs with a 307 to a
  "CDN" on another port, which serves the blob only for an unexpired, signed URL (else 403) and
  records the headers it receives.

All servers listen on 127.0.0.1 and free ports, and every context manager stops what it started.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import hmac
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BINARY = "/usr/bin/docker-registry"
STARTUP_TIMEOUT_S = 15.0
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)


def require_registry() -> str:
    """Return the docker-registry binary, or skip the test where it is not installed."""
    binary = REGISTRY_BINARY if os.access(REGISTRY_BINARY, os.X_OK) else None
    binary = binary or shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry is not installed (Debian package docker-registry)")
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash as htpasswd files hold them: libxcrypt's crypt(3), else `htpasswd -B`."""
    name = ctypes.util.find_library("crypt")
    if name is not None:
        lib = ctypes.CDLL(name)
        lib.crypt_gensalt.restype = ctypes.c_char_p
        lib.crypt_gensalt.argtypes = [
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        lib.crypt.restype = ctypes.c_char_p
        lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        salt = lib.crypt_gensalt(b"$2b$", 5, None, 0)
        hashed = lib.crypt(password.encode(), salt) if salt else None
        if hashed and hashed.startswith(b"$2b$"):
            return hashed.decode()
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        pytest.skip("no bcrypt: neither libcrypt with bcrypt nor htpasswd (apache2-utils)")
    out = subprocess.run(
        [htpasswd, "-nbB", "-C", "5", "user", password], check=True, capture_output=True, text=True
    ).stdout
    return out.strip().partition(":")[2]


def wait_for_http(host: str, port: int, proc: subprocess.Popen[bytes] | None, log: Path) -> None:
    """Wait until GET /v2/ gets any HTTP answer; raise with the log if the server died."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=1)
            conn.request("GET", "/v2/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no answer on {host}:{port} within {STARTUP_TIMEOUT_S} s: {log}")


@dataclass
class Registry:
    """One docker-registry process; `restart()` keeps port and storage, rereading the config."""

    root: Path
    auth: dict[str, Any] | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    def start(self) -> None:
        binary = require_registry()
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if self.auth:
            config["auth"] = self.auth
        config_path = self.root / "config.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for_http("127.0.0.1", self.port, self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def running_registry(root: Path, auth: dict[str, Any] | None = None) -> Iterator[Registry]:
    """Start a registry storing under `root`; stop it on exit. Retries once on a port clash."""
    root.mkdir(parents=True, exist_ok=True)
    registry = Registry(root, auth)
    try:
        registry.start()
    except RuntimeError:
        registry = Registry(root, auth)  # another process may have taken the free port
        registry.start()
    try:
        yield registry
    finally:
        registry.stop()


def htpasswd_auth(root: Path, users: dict[str, str]) -> dict[str, Any]:
    """Registry `auth:` config for basic auth with the given users."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "htpasswd"
    path.write_text("".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in users.items()))
    return {"htpasswd": {"realm": "lazyfs-test", "path": str(path)}}


# --- small HTTP servers in threads ------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = headers or {}
        for key, value in headers.items():
            self.send_header(key, value)
        if not any(key.lower() == "content-length" for key in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens for `users` (password check), or anonymous pull if allowed;
    also for the OAuth2 refresh tokens (identity tokens) in `refresh_tokens` (token ->
    account), POSTed as the distribution spec's OAuth2 form."""

    ISSUER = "lazyfs-test-issuer"
    SERVICE = "lazyfs-test-registry"

    def __init__(self, root: Path, users: dict[str, str], *, anonymous_pull: bool = False):
        self.root = root
        self.users = users
        self.anonymous_pull = anonymous_pull
        self.expires_in = 300
        self.requests: list[dict[str, Any]] = []
        self.refresh_tokens: dict[str, str] = {}
        self.bundle = root / "token-roots.pem"
        self._lock = threading.Lock()
        self._generation = 0
        self.rotate_key()
        self.url = ""

    def rotate_key(self) -> None:
        """Sign with a new key from now on; the bundle then trusts only the new one."""
        self._generation += 1
        key, cert = self.root / f"token-{self._generation}.key", self.root / "token.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=lazyfs test token issuer", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(cert), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        with self._lock:
            self._key, self._x5c = key, base64.b64encode(der).decode()
        shutil.copyfile(cert, self.bundle)

    def registry_auth(self) -> dict[str, Any]:
        return {
            "token": {
                "realm": f"{self.url}/token",
                "service": self.SERVICE,
                "issuer": self.ISSUER,
                "rootcertbundle": str(self.bundle),
            }
        }

    def issue(self, account: str | None, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = wanted if account is not None else [a for a in wanted if a == "pull"]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": self.ISSUER, "sub": account or "", "aud": self.SERVICE,
                  "exp": now + self.expires_in, "nbf": now - 1, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}  # fmt: skip
        with self._lock:
            key, x5c = self._key, self._x5c
        header = {"typ": "JWT", "alg": "RS256", "x5c": [x5c]}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{_b64url(signature)}"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                scopes = query.get("scope", [])
                account = None
                authorization = self.headers.get("Authorization", "")
                if authorization.startswith("Basic "):
                    user, _, pw = base64.b64decode(authorization[6:]).decode().partition(":")
                    if server.users.get(user) != pw:
                        server.requests.append({"scopes": scopes, "account": user, "ok": False})
                        return self.reply(401, b'{"details":"bad credentials"}')
                    account = user
                elif not server.anonymous_pull:
                    server.requests.append({"scopes": scopes, "account": None, "ok": False})
                    return self.reply(401, b'{"details":"authentication required"}')
                server.requests.append({"scopes": scopes, "account": account, "ok": True})
                token = server.issue(account, scopes)
                body = {"token": token, "access_token": token, "expires_in": server.expires_in}
                self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                scopes = form.get("scope", [""])[0].split()
                refresh = form.get("refresh_token", [""])[0]
                account = server.refresh_tokens.get(refresh)
                record = {"scopes": scopes, "account": account, "grant": form.get("grant_type"),
                          "client_id": form.get("client_id"), "ok": account is not None}
                server.requests.append(record)
                if form.get("grant_type") != ["refresh_token"] or account is None:
                    return self.reply(401, b'{"error":"invalid_grant"}')
                token = server.issue(account, scopes)
                body = {"access_token": token, "expires_in": server.expires_in}
                self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        return Handler


@contextlib.contextmanager
def token_registry(
    root: Path, users: dict[str, str], *, anonymous_pull: bool = False
) -> Iterator[tuple[Registry, TokenServer]]:
    """A registry with token auth and the token server it trusts."""
    root.mkdir(parents=True, exist_ok=True)
    tokens = TokenServer(root, users, anonymous_pull=anonymous_pull)
    with serving(tokens.handler()) as server:
        tokens.url = f"http://127.0.0.1:{server.server_address[1]}"
        with running_registry(root / "registry", tokens.registry_auth()) as registry:
            yield registry, tokens


# --- a front end that redirects blob downloads to a "CDN" -------------------------------------

_BLOB_GET = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


class RedirectingFrontEnd:
    """Proxies to `registry`; blob GETs (once the registry accepts the client's credentials)
    become 307 redirects to a CDN port serving HMAC-signed URLs valid for `ttl_s` seconds.

    The CDN reads blobs from the registry with `backend_credentials`. `clock_offset_s` moves
    the time both issuing and checking URLs see, and `expire_next` hands out URLs that have
    already expired, so tests can expire URLs without sleeping.
    """

    def __init__(self, registry: Registry, backend_credentials: tuple[str, str] | None = None):
        self.registry = registry
        self.backend_auth = (
            "Basic " + base64.b64encode(":".join(backend_credentials).encode()).decode()
            if backend_credentials
            else None
        )
        self.ttl_s = 60
        self.clock_offset_s = 0.0
        self.expire_next = 0  # this many upcoming redirects get already-expired URLs
        self.secret = secrets.token_bytes(16)
        self.redirects = 0
        self.cdn_requests: list[dict[str, Any]] = []
        self.url = self.cdn_url = ""

    def now(self) -> float:
        return time.time() + self.clock_offset_s

    def _sign(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def _backend(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.registry.port, timeout=30)
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response, data

    def proxy_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        front = self

        class Handler(_QuietHandler):
            def forward(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                match = _BLOB_GET.match(urllib.parse.urlsplit(self.path).path)
                if self.command == "GET" and match:
                    check = {k: v for k, v in headers.items() if k.lower() != "range"}
                    response, data = front._backend("HEAD", self.path, check)
                    if response.status == 200:
                        return self.redirect(match["repo"], match["digest"])
                else:
                    response, data = front._backend(self.command, self.path, headers, body)
                out = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS}
                if self.command != "HEAD":
                    out.pop("Content-Length", None)
                self.reply(response.status, data, out)

            def redirect(self, repo: str, digest: str) -> None:
                path = f"/cdn/{repo}/{digest}"
                expires = int(front.now()) + front.ttl_s
                if front.expire_next > 0:
                    front.expire_next -= 1
                    expires = int(front.now()) - 1
                query = urllib.parse.urlencode(
                    {"expires": expires, "sig": front._sign(path, expires)}
                )
                front.redirects += 1
                self.reply(307, b"", {"Location": f"{front.cdn_url}{path}?{query}"})

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        return Handler

    def cdn_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        front = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                record = {"path": url.path, "headers": dict(self.headers.items())}
                front.cdn_requests.append(record)
                expires = int(query.get("expires", "0"))
                if not hmac.compare_digest(query.get("sig", ""), front._sign(url.path, expires)):
                    record["status"] = 403
                    return self.reply(403, b"bad signature")
                if front.now() > expires:
                    record["status"] = 403
                    return self.reply(403, b"<Error><Code>AccessDenied</Code>Request has expired")
                backend_path = "/v2/" + url.path.removeprefix("/cdn/").replace(
                    "/sha256:", "/blobs/sha256:"
                )
                headers = {"Authorization": front.backend_auth} if front.backend_auth else {}
                if "Range" in self.headers:
                    headers["Range"] = self.headers["Range"]
                response, data = front._backend("GET", backend_path, headers)
                record["status"] = response.status
                out = {k: response.getheader(k) for k in ("Content-Range", "Content-Type", "ETag")}
                self.reply(response.status, data, {k: v for k, v in out.items() if v})

        return Handler


@contextlib.contextmanager
def redirecting_front_end(
    registry: Registry, backend_credentials: tuple[str, str] | None = None
) -> Iterator[RedirectingFrontEnd]:
    front = RedirectingFrontEnd(registry, backend_credentials)
    with serving(front.cdn_handler()) as cdn, serving(front.proxy_handler()) as proxy:
        front.cdn_url = f"http://127.0.0.1:{cdn.server_address[1]}"
        front.url = f"http://127.0.0.1:{proxy.server_address[1]}"
        yield front
