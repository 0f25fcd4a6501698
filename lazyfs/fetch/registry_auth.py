"""Registry credentials and the authentication flows of the distribution spec, as an httpx.Auth.

A registry answers an unauthenticated request with 401 and a `WWW-Authenticate` challenge:
`Basic realm=...` (answer with user and password) or `Bearer realm=..,service=..,scope=..`
(get a token from the realm, with the user's basic credentials if any, then retry; with an
identity token, an OAuth2 refresh token, the token is asked for in a POST that carries it).
Tokens are cached per scope until they expire. A registry token is a bearer token given
ready-made: it is sent with every request, and nothing else is tried. Credentials and tokens
are only ever attached to requests for the registry's own origin (scheme, host and port), so
whoever sends requests with this auth (a range reader following a redirect to object storage,
say) cannot leak them elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lazyfs.errors import LazyfsError
from lazyfs.fetch.errors import FetchError
from lazyfs.format.reference import DOCKER_HUB, normalize_registry

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME_S = 60.0
OAUTH_CLIENT_ID = "lazyfs"
# Refresh a little early so a token does not expire between the check and its use.
_EXPIRY_MARGIN_S = 5.0
_MAX_CACHED_TOKENS = 64
_AUTH_PARAM = re.compile(r'([A-Za-z][\w-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
_REPOSITORY_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags)/")
_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")


class RegistryAuthError(FetchError):
    """Credentials were refused, or no token could be obtained from the token server."""

    def __init__(self, origin: str, reason: str, *, status: int | None = None) -> None:
        super().__init__(f"{origin}: {reason}")
        self.reason = reason
        self.status = status

    @property
    def transient(self) -> bool:
        """Whether another attempt may succeed (the token server was busy or failing)."""
        return self.status is not None and (self.status == 429 or self.status >= 500)


class DockerConfigError(LazyfsError, ValueError):
    """The Docker client configuration file cannot be read or has a malformed entry."""


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or personal access token) for one registry; or, as kubelet
    may pass a pod's pull secret, an `identity_token` (an OAuth2 refresh token, exchanged at
    the registry's token server) or a `registry_token` (a bearer token sent as it is), with
    no password. Secrets never show in a repr."""

    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)
    registry_token: str | None = field(default=None, repr=False)

    @property
    def who(self) -> str:
        """Whose credentials these are, for messages (never a secret)."""
        if self.registry_token:
            return "a registry token"
        if self.identity_token:
            return f"the identity token of user {self.username!r}" if self.username else (
                "an identity token")
        return f"user {self.username!r}"

    @property
    def has_password(self) -> bool:
        """Whether these answer a Basic challenge (and authenticate a token request so)."""
        return bool(self.username) and not (self.identity_token or self.registry_token)

    def basic_header(self) -> str:
        userpass = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(userpass).decode("ascii")


def docker_config_path() -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`."""
    directory = os.environ.get("DOCKER_CONFIG")
    return (Path(directory) if directory else Path.home() / ".docker") / "config.json"


def _config_key(key: str) -> str:
    """`https://host:port/v1/` -> `host:port`; Docker Hub aliases -> `docker.io`."""
    if key in _DOCKER_HUB_KEYS:
        return DOCKER_HUB
    host = key.split("://", 1)[-1].split("/", 1)[0].lower()
    return normalize_registry(host)


def load_docker_credentials(
    registry: str, config_path: str | os.PathLike[str] | None = None
) -> Credentials | None:
    """Return the credentials stored for `registry` by `docker login`, or None if there are none.

    Reads `auths[<registry>]` of the Docker config file (`auth`, base64 of `user:password`, or
    `username` and `password`). Credential helpers (`credsStore`, `credHelpers`) and identity
    tokens are not supported: such entries count as none. A missing file means no credentials.
    Raises DockerConfigError naming the file (and registry) for malformed content.
    """
    path = Path(config_path) if config_path is not None else docker_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise DockerConfigError(f"{path}: cannot read Docker config: {error}") from None
    try:
        config = json.loads(text)
    except ValueError as error:
        raise DockerConfigError(f"{path}: not valid JSON: {error}") from None
    auths = config.get("auths", {}) if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        raise DockerConfigError(f"{path}: 'auths' must be an object")
    wanted = _config_key(registry)
    for key, entry in auths.items():
        if _config_key(key) != wanted:
            continue
        if not isinstance(entry, dict):
            raise DockerConfigError(f"{path}: auths[{key!r}] must be an object")
        credentials = _entry_credentials(entry, f"{path}: auths[{key!r}]")
        if credentials is not None:
            return credentials
    if isinstance(config, dict) and (config.get("credsStore") or config.get("credHelpers")):
        log.debug("%s: credential helpers are not supported; %s gets none", path, registry)
    return None


def _entry_credentials(entry: dict[str, Any], where: str) -> Credentials | None:
    encoded = entry.get("auth")
    if encoded:
        if not isinstance(encoded, str):
            raise DockerConfigError(f"{where}.auth must be a string")
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise DockerConfigError(f"{where}.auth is not base64 of 'user:password'") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise DockerConfigError(f"{where}.auth does not decode to 'user:password'")
        return Credentials(username, password)
    name, secret = entry.get("username"), entry.get("password")
    if name and secret:
        if not isinstance(name, str) or not isinstance(secret, str):
            raise DockerConfigError(f"{where}: username and password must be strings")
        return Credentials(name, secret)
    return None


@dataclass(frozen=True)
class CredentialLookup:
    """Credentials looked up for every request, where they may come and go while a client
    lives (a pull secret kept in memory, `lazyfs.cri`): `lookup` returns the current ones,
    or None; `advice` is what to tell when the registry wants some and there are none."""

    lookup: Callable[[], Credentials | None]
    advice: str


@dataclass(frozen=True)
class Challenge:
    """One parsed `WWW-Authenticate` challenge; `scheme` is lower case."""

    scheme: str
    params: dict[str, str]

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(normalize_scope(scope) for scope in self.params.get("scope", "").split())


def parse_challenge(header: str) -> Challenge | None:
    """Parse `Bearer realm="..",service="..",scope=".."` (or Basic); None if unparseable."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {}
    for match in _AUTH_PARAM.finditer(rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
    return Challenge(scheme.lower(), params)


def normalize_scope(scope: str) -> str:
    """`repository:a:push,pull` -> `repository:a:pull,push`, so equal scopes compare equal."""
    resource, sep, actions = scope.rpartition(":")
    return f"{resource}:{','.join(sorted(set(actions.split(','))))}" if sep else scope


def request_scope(request: httpx.Request) -> str | None:
    """The token scope(s) a request needs, space-separated: pull for GET/HEAD on a repository,
    pull,push otherwise, plus pull on the source repository of a cross-repository mount."""
    match = _REPOSITORY_PATH.match(request.url.path)
    if match is None:
        return None
    actions = "pull" if request.method in ("GET", "HEAD") else "pull,push"
    scope = f"repository:{match.group('name')}:{actions}"
    source = request.url.params.get("from") if "mount" in request.url.params else None
    return f"{scope} repository:{source}:pull" if source else scope


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    default = 443 if url.scheme == "https" else 80
    return url.scheme, url.host, url.port or default


@dataclass
class _Token:
    value: str
    expires_at: float


_Step = Generator[tuple[httpx.Request, bool], httpx.Response, None]


class RegistryAuth(httpx.Auth):
    """httpx.Auth for one registry origin: anonymous, basic or bearer, as the registry asks.

    `origin` is the registry's base URL (`https://host[:port]`). `clock` (seconds, monotonic)
    decides token expiry. With `lookup`, its credentials, when it has some, stand in for
    `credentials`, asked anew for every request (tokens obtained with others are dropped),
    and a request the registry refuses without any fails with its advice. Safe to share
    between clients: a range reader may use the same instance as the registry client, and
    both profit from its token cache.
    """

    def __init__(
        self,
        origin: str,
        credentials: Credentials | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        lookup: CredentialLookup | None = None,
    ) -> None:
        self._origin_url = httpx.URL(origin)
        if self._origin_url.scheme not in ("http", "https") or not self._origin_url.host:
            raise ValueError(f"registry origin {origin!r}: expected http(s)://host[:port]")
        self._origin = _origin(self._origin_url)
        self.credentials = credentials
        self._fixed = credentials
        self._lookup = lookup
        self._clock = clock
        self._tokens: dict[str, _Token] = {}
        # Realm and service of the last Bearer challenge: lets an expired or missing token be
        # fetched before the request instead of after a 401.
        self._bearer: tuple[str, str | None] | None = None
        self._basic = False
        self.token_requests = 0

    @property
    def origin(self) -> str:
        return str(self._origin_url).rstrip("/")

    def is_origin(self, url: httpx.URL) -> bool:
        """Whether credentials may be sent to `url` (same scheme, host and port)."""
        return _origin(url) == self._origin

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self._flow(request)
        try:
            request, needs_body = next(flow)
            while True:
                response = yield request
                if needs_body:
                    response.read()
                request, needs_body = flow.send(response)
        except StopIteration:
            return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        # Only token responses are read here: a streamed blob body must stay unread.
        flow = self._flow(request)
        try:
            request, needs_body = next(flow)
            while True:
                response = yield request
                if needs_body:
                    await response.aread()
                request, needs_body = flow.send(response)
        except StopIteration:
            return

    def _flow(self, request: httpx.Request) -> _Step:
        """Yield (request, whether its response body is needed); receive the responses."""
        if not self.is_origin(request.url):
            yield request, False
            return
        self._look_up()
        if self.credentials is not None and self.credentials.registry_token:
            request.headers["Authorization"] = f"Bearer {self.credentials.registry_token}"
            yield request, False
            return
        scope = request_scope(request)
        fresh_scopes: tuple[str, ...] | None = None
        header = self._cached_header(scope)
        if header is None and self._bearer is not None and scope is not None:
            fresh_scopes = tuple(scope.split())
            token = yield from self._fetch_token(*self._bearer, fresh_scopes, scope)
            header = f"Bearer {token}"
        if header is not None:
            request.headers["Authorization"] = header
        response = yield request, False
        if (
            response.status_code != 401
            or not self.is_origin(response.url)  # a redirect target's challenge is not ours
            or not isinstance(request.stream, httpx.ByteStream)  # a stream cannot be resent
        ):
            return
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return
        if challenge.scheme == "basic":
            if self.credentials is None:
                self._refuse_without_credentials(request)
            if (self.credentials is None or not self.credentials.has_password
                    or header == self.credentials.basic_header()):
                return
            self._basic = True
            request.headers["Authorization"] = self.credentials.basic_header()
            yield request, False
        elif challenge.scheme == "bearer":
            realm = challenge.params.get("realm")
            if not realm:
                raise RegistryAuthError(self.origin, "Bearer challenge without a realm")
            scopes = challenge.scopes or (tuple(scope.split()) if scope else ())
            if fresh_scopes is not None and set(scopes) <= set(fresh_scopes):
                if self.credentials is None:
                    self._refuse_without_credentials(request)
                return  # a token obtained just now for this very scope was refused
            service = challenge.params.get("service")
            self._bearer = (realm, service)
            token = yield from self._fetch_token(realm, service, scopes, scope)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request, False

    def _look_up(self) -> None:
        """Take the credentials the lookup has now; forget what was obtained with others."""
        if self._lookup is None:
            return
        current = self._lookup.lookup() or self._fixed
        if current != self.credentials:
            self.credentials = current
            self._tokens.clear()
            self._basic = False

    def _refuse_without_credentials(self, request: httpx.Request) -> None:
        """With a lookup that has none, a refusal is that advice. Raises RegistryAuthError."""
        if self._lookup is not None:
            raise RegistryAuthError(
                self.origin, f"{request.url.path}: refused without credentials (HTTP 401): "
                f"{self._lookup.advice}", status=401)

    def _cached_header(self, scope: str | None) -> str | None:
        if self._basic and self.credentials is not None and self.credentials.has_password:
            return self.credentials.basic_header()
        token = self._tokens.get(scope or "")
        if token is None or self._clock() >= token.expires_at:
            return None
        return f"Bearer {token.value}"

    def _fetch_token(
        self, realm: str, service: str | None, scopes: Iterable[str], request_scope: str | None
    ) -> Generator[tuple[httpx.Request, bool], httpx.Response, str]:
        """Ask the token server; cache the token under its scopes and the request's scope."""
        scopes = tuple(scopes)
        realm_url = httpx.URL(realm)
        if realm_url.scheme not in ("http", "https"):
            raise RegistryAuthError(self.origin, f"token realm {realm!r} is not an http(s) URL")
        if realm_url.scheme == "http" and self._origin_url.scheme == "https":
            raise RegistryAuthError(
                self.origin,
                f"token realm {realm} is plain http for an https registry; "
                "refusing to send credentials",
            )
        self.token_requests += 1
        if self.credentials is not None and self.credentials.identity_token:
            token_request = _refresh_token_request(realm_url, service, scopes,
                                                   self.credentials.identity_token)
        else:
            params: list[tuple[str, str]] = [("service", service)] if service else []
            params += [("scope", scope) for scope in scopes]
            headers = {}
            if self.credentials is not None and self.credentials.has_password:
                params.append(("account", self.credentials.username))
                headers["Authorization"] = self.credentials.basic_header()
            url = realm_url.copy_merge_params(httpx.QueryParams(tuple(params)))
            token_request = httpx.Request("GET", url, headers=headers)
        response = yield token_request, True
        who = self.credentials.who if self.credentials else "anonymous access"
        where = f"token server {realm_url.copy_with(query=None)}"
        if response.status_code in (401, 403):
            advice = ("check the credentials" if self.credentials is not None
                      or self._lookup is None else self._lookup.advice)
            raise RegistryAuthError(
                self.origin,
                f"{where} refused {who} for {' '.join(scopes) or 'the registry'} "
                f"(HTTP {response.status_code}); {advice}",
                status=response.status_code,
            )
        if response.status_code != 200:
            raise RegistryAuthError(
                self.origin,
                f"{where} failed (HTTP {response.status_code})",
                status=response.status_code,
            )
        token, lifetime_s = _parse_token_response(response, self.origin, where)
        margin_s = min(_EXPIRY_MARGIN_S, lifetime_s / 10)
        entry = _Token(token, self._clock() + lifetime_s - margin_s)
        for key in {*scopes, request_scope or "", " ".join(scopes)}:
            self._tokens.pop(key, None)
            self._tokens[key] = entry
        while len(self._tokens) > _MAX_CACHED_TOKENS:
            self._tokens.pop(next(iter(self._tokens)))
        return token


def _refresh_token_request(realm: httpx.URL, service: str | None, scopes: tuple[str, ...],
                           refresh_token: str) -> httpx.Request:
    """The OAuth2 request that exchanges an identity token (a refresh token) for an access
    token, as the distribution spec's token servers take it: a form POSTed to the realm."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
            "client_id": OAUTH_CLIENT_ID, "scope": " ".join(scopes)}
    if service:
        form["service"] = service
    return httpx.Request("POST", realm, data=form)


def _parse_token_response(response: httpx.Response, origin: str, where: str) -> tuple[str, float]:
    """Return (token, lifetime in seconds) from a token server's JSON answer."""
    try:
        body = response.json()
    except ValueError:
        raise RegistryAuthError(origin, f"{where}: answer is not JSON") from None
    token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise RegistryAuthError(origin, f"{where}: answer has no 'token'")
    expires_in = body.get("expires_in")
    valid = isinstance(expires_in, int | float) and not isinstance(expires_in, bool)
    lifetime_s = float(expires_in) if valid and expires_in > 0 else DEFAULT_TOKEN_LIFETIME_S
    return token, lifetime_s
