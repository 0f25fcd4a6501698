"""How to reach registries: the knobs a user gives once for pulls, pushes and lazy mounts.

`RegistryOptions` makes a `RegistryClient` per registry; `parse_credentials` reads the
`USER:PASSWORD` of a `--creds` option. A `Keychain` holds credentials learned while running
(the pull secrets kubelet passes the CRI image service, `lazyfs.cri`), per repository.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry import RegistryClient
from lazyfs.fetch.registry_auth import CredentialLookup, Credentials, load_docker_credentials


class CredentialsError(LazyfsError):
    """Credentials given as text are not `USER:PASSWORD`."""


def parse_credentials(text: str, option: str = "--creds") -> Credentials:
    """`USER:PASSWORD` as an option gives it (the password may contain ':'). Raises
    CredentialsError naming `option`."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise CredentialsError(f"{option}: expected USER:PASSWORD")
    return Credentials(user, password)


class Keychain(Protocol):
    """Credentials learned at run time, by registry and repository (any thread), and what
    to do when a registry wants some the keychain does not have (`advice`)."""

    @property
    def advice(self) -> str: ...

    def credentials(self, registry: str, repository: str) -> Credentials | None: ...


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries. Without `credentials`, those of `docker login` are used, or
    of `credentials_file` (a Docker config.json) when given. `insecure`: plain HTTP to every
    registry and mirror named by host; else to those in `plain_http` (`host[:port]`) only.
    `timeout_s` bounds each phase of a request; `deadline_s`, when given, all that resolving
    an image asks a registry (index, manifest, config, tokens, mirrors), retries included."""

    credentials: Credentials | None = None
    insecure: bool = False
    mirrors: tuple[str, ...] = ()
    timeout_s: float = 30.0
    plain_http: tuple[str, ...] = ()
    credentials_file: str | None = None
    deadline_s: float | None = None
    # Asked first, at every request, by a client of one repository.
    keychain: Keychain | None = None

    def client(self, registry: str, *, mirrors: bool = True, repository: str | None = None
               ) -> RegistryClient:
        """A client for `registry` (use `async with`); with `mirrors=False` it talks to the
        registry alone (as a push must); with `repository`, the keychain's credentials for it
        come first, whenever it has some. Raises DockerConfigError for an unreadable Docker
        config, ValueError for a malformed registry or mirror name."""
        credentials = self.credentials or load_docker_credentials(registry,
                                                                  self.credentials_file)
        lookup = None
        if repository is not None and self.keychain is not None:
            lookup = CredentialLookup(
                functools.partial(self.keychain.credentials, registry, repository),
                self.keychain.advice)
        return RegistryClient(
            self.url_of(registry),
            credentials=credentials,
            insecure=self.allows_plain_http,
            mirrors=tuple(map(self.url_of, self.mirrors)) if mirrors else (),
            timeout=self.timeout_s,
            deadline_s=self.deadline_s,
            credential_lookup=lookup,
        )

    @property
    def allows_plain_http(self) -> bool:
        """The `insecure` argument of a RegistryClient for a name `url_of` gives."""
        return self.insecure or bool(self.plain_http)

    def url_of(self, name: str) -> str:
        """A registry or mirror name (`host[:port]` or a URL) as a RegistryClient given
        `allows_plain_http` takes it: with `plain_http` hosts, every host as a URL, http://
        for those, https:// for the others; else `name` itself."""
        if not self.plain_http or self.insecure or "://" in name:
            return name
        plain = name.lower() in (host.lower() for host in self.plain_http)
        return f"{'http' if plain else 'https'}://{name}"
