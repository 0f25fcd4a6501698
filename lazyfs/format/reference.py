"""Image references: `[registry/]repository[:tag][@digest]`, as Docker and containerd read them.

The registry part is present only when the first `/`-separated component looks like a host
(contains `.` or `:`, is `localhost`, or has upper-case letters); otherwise the reference
names an image on Docker Hub, where one-component repositories live under `library/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from lazyfs.format.errors import FormatError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\]")
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


class InvalidReferenceError(FormatError, ValueError):
    """An image reference, or one of its parts, does not follow the reference grammar.
    Also a ValueError, like `json.JSONDecodeError`: bad text given for a value."""


def validate_digest(digest: str) -> str:
    """Return `digest` if it is `sha256:<64 hex>` or `sha512:<128 hex>` (lower case).

    Raises InvalidReferenceError naming what is wrong with it.
    """
    algorithm, sep, encoded = digest.partition(":")
    if not sep:
        raise InvalidReferenceError(f"digest {digest!r}: expected '<algorithm>:<hex>'")
    length = _DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        raise InvalidReferenceError(
            f"digest {digest!r}: unsupported algorithm {algorithm!r} (expected sha256 or sha512)"
        )
    if len(encoded) != length or not _HEX.fullmatch(encoded):
        raise InvalidReferenceError(
            f"digest {digest!r}: expected {length} lower-case hex digits after '{algorithm}:'"
        )
    return digest


def validate_tag(tag: str) -> str:
    """Return `tag` if it is 1-128 characters of `[A-Za-z0-9_.-]`, not starting with `.`/`-`."""
    if not _TAG.fullmatch(tag):
        raise InvalidReferenceError(
            f"tag {tag!r}: expected 1-128 characters of letters, digits, '_', '.', '-', "
            "not starting with '.' or '-'"
        )
    return tag


def is_digest_reference(reference: str) -> bool:
    """Whether a manifest reference is a digest (else a tag); raises if it is neither."""
    if ":" in reference:
        validate_digest(reference)
        return True
    validate_tag(reference)
    return False


def validate_repository(repository: str) -> str:
    """Return `repository` if every `/`-separated component is lower-case `[a-z0-9._-]`."""
    if not repository:
        raise InvalidReferenceError("repository name is empty")
    if len(repository) > MAX_NAME_LENGTH:
        raise InvalidReferenceError(
            f"repository {repository[:40]!r}...: longer than {MAX_NAME_LENGTH} characters"
        )
    for component in repository.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise InvalidReferenceError(
                f"repository {repository!r}: component {component!r} must be lower-case "
                "letters and digits, separated by '.', '_', '__' or '-'"
            )
    return repository


def validate_registry(registry: str) -> str:
    """Return `registry` (`host[:port]`, host a DNS name, IPv4 or `[IPv6]`) if well formed."""
    if _IPV6.match(registry):
        end = registry.index("]") + 1
        host, port = registry[:end], registry[end:]
        if port and not port.startswith(":"):
            raise InvalidReferenceError(f"registry {registry!r}: expected ':<port>' after ']'")
        port = port[1:]
        has_port = bool(registry[end:])
    else:
        host, has_colon, port = registry.partition(":")
        has_port = bool(has_colon)
        if not host or not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
            raise InvalidReferenceError(f"registry {registry!r}: {host!r} is not a valid host")
    if has_port and not (port.isdigit() and port.isascii() and 0 < int(port) < 65536):
        raise InvalidReferenceError(f"registry {registry!r}: port {port!r} is not 1-65535")
    return registry


def normalize_registry(registry: str) -> str:
    """Return the canonical name of a registry: Docker Hub aliases become `docker.io`."""
    return DOCKER_HUB if registry.lower() in _DOCKER_HUB_ALIASES else registry


def registry_api_host(registry: str) -> str:
    """Return the host (and port) that serves the registry API for `registry`."""
    return DOCKER_HUB_API_HOST if normalize_registry(registry) == DOCKER_HUB else registry


def _looks_like_registry(component: str) -> bool:
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.lower() != component
    )


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference. `tag` and `digest` are not both None."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        validate_registry(self.registry)
        validate_repository(self.repository)
        if self.tag is not None:
            validate_tag(self.tag)
        if self.digest is not None:
            validate_digest(self.digest)
        if self.tag is None and self.digest is None:
            raise InvalidReferenceError(f"{self.registry}/{self.repository}: no tag or digest")

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse `text`; see `parse_reference`."""
        return parse_reference(text)

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return self.digest if self.digest is not None else str(self.tag)

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> ImageReference:
        """Return this reference pinned to `digest` (the tag is kept, for display)."""
        return replace(self, digest=validate_digest(digest))

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageReference:
    """Parse an image reference such as `alpine`, `localhost:5000/a/b:1.0` or `x@sha256:...`.

    A reference without tag or digest gets the tag `latest`. Docker Hub names are completed:
    `alpine` is `docker.io/library/alpine:latest`. Raises InvalidReferenceError naming the
    part that is wrong.
    """
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError("empty image reference")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReferenceError(f"image reference {text!r} contains white space")
    try:
        return _parse(text)
    except InvalidReferenceError as error:
        raise InvalidReferenceError(f"invalid image reference {text!r}: {error}") from None


def _parse(text: str) -> ImageReference:
    remainder, at, digest = text.partition("@")
    if at:
        validate_digest(digest)
    first, slash, rest = remainder.partition("/")
    if slash and _looks_like_registry(first):
        registry, path = normalize_registry(validate_registry(first)), rest
    else:
        registry, path = DOCKER_HUB, remainder
    # A tag follows the last ':' only if no '/' comes after it (the port is already split off).
    repository, colon, tag = path.rpartition(":")
    if not colon or "/" in tag:
        repository, tag = path, ""
    elif not tag:
        raise InvalidReferenceError("empty tag after ':'")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    validate_repository(repository)
    if tag:
        validate_tag(tag)
    return ImageReference(
        registry=registry,
        repository=repository,
        tag=tag or (None if at else DEFAULT_TAG),
        digest=digest if at else None,
    )
