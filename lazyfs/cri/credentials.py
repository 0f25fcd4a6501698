"""kubelet's pull secrets: the `AuthConfig` of a CRI PullImage, kept for the lazy fetches of
that image's layers.

In memory only, never written to disk or to a log: messages name a registry, a repository and
at most a user name. Each secret is scoped to the registry host and the repository of the
image it came with, and a later pull of that repository with another replaces it; the
snapshotter asks for the credentials of a layer's repository whenever it opens the layer
(`RegistryOptions.keychain`). A restarted snapshotter has none: a layer that needs them fails
to mount, saying that its image needs credentials, until the next pull brings them.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections import OrderedDict

from lazyfs.cri.api import api_pb2 as cri
from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry_auth import Credentials
from lazyfs.format.reference import normalize_registry

# Repositories whose secrets are kept; the least recently pulled go first beyond that.
MAX_REPOSITORIES = 4096


class AuthConfigError(LazyfsError):
    """kubelet's AuthConfig cannot be used (its `auth` is not base64 of USER:PASSWORD)."""


def registry_of(address: str) -> str:
    """The registry an AuthConfig's `server_address` names, as references name it:
    `https://host:port/v1/` and `host:port` are `host:port`, Docker Hub's aliases
    `docker.io`."""
    host = address.split("://", 1)[-1].split("/", 1)[0].lower()
    return normalize_registry(host)


def credentials_of(auth: cri.AuthConfig, registry: str) -> Credentials | None:
    """What kubelet passed for a pull from `registry`, as containerd's CRI plugin reads it:
    user and password, else an identity token, else `auth` (base64 of USER:PASSWORD), else a
    registry token (which containerd 1.6 ignores); None for none, or for an AuthConfig whose
    `server_address` names another registry. Raises AuthConfigError (naming no secret)."""
    if auth.server_address and registry_of(auth.server_address) != normalize_registry(registry):
        return None
    if auth.username:
        return Credentials(auth.username, auth.password)
    if auth.identity_token:
        return Credentials("", "", identity_token=auth.identity_token)
    if auth.auth:
        try:
            decoded = base64.b64decode(auth.auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthConfigError("AuthConfig.auth is not base64 of USER:PASSWORD") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise AuthConfigError("AuthConfig.auth does not decode to USER:PASSWORD")
        return Credentials(username, password.strip("\x00"))
    if auth.registry_token:
        return Credentials("", "", registry_token=auth.registry_token)
    return None


class PullSecrets:
    """The pull secrets of this process, by (registry, repository); a `Keychain`. Called
    from gRPC threads (remember) and the trio thread (credentials)."""

    advice = ("the image needs credentials: pull the image again (a pull through the image "
              "service brings the pod's pull secret, kept in memory only)")

    def __init__(self, max_repositories: int = MAX_REPOSITORIES) -> None:
        self._max = max_repositories
        self._lock = threading.Lock()
        self._secrets: OrderedDict[tuple[str, str], Credentials] = OrderedDict()

    def remember(self, registry: str, repository: str, credentials: Credentials) -> None:
        """Keep `credentials` for the images of `repository` in `registry`, replacing what
        was kept for it."""
        key = (normalize_registry(registry), repository)
        with self._lock:
            self._secrets.pop(key, None)
            self._secrets[key] = credentials
            while len(self._secrets) > self._max:
                self._secrets.popitem(last=False)

    def credentials(self, registry: str, repository: str) -> Credentials | None:
        with self._lock:
            return self._secrets.get((normalize_registry(registry), repository))

    def __len__(self) -> int:
        with self._lock:
            return len(self._secrets)

    def __repr__(self) -> str:
        return f"PullSecrets({len(self)} repositories)"
