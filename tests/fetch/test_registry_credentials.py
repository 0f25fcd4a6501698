"""The credentials a pod's pull secret may carry besides user and password (an identity
token, a registry token), and credentials looked up at every request (a keychain that learns
them while a client lives), against Debian's docker-registry with basic and token auth."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from lazyfs.fetch.registry import RegistryClient, UnauthorizedError
from lazyfs.fetch.registry_auth import (
    CredentialLookup,
    Credentials,
    RegistryAuth,
    RegistryAuthError,
)
from lazyfs.fetch.registry_options import RegistryOptions
from tests.support.registry import (
    Registry,
    TokenServer,
    htpasswd_auth,
    running_registry,
    token_registry,
)

pytestmark = pytest.mark.network

USERS = {"alice": "wonderland"}
ADVICE = "pull the image again"


@pytest.fixture
def basic_registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry", htpasswd_auth(tmp_path, USERS)) as server:
        yield server


@pytest.fixture
def tokens(tmp_path: Path) -> Iterator[tuple[Registry, TokenServer]]:
    with token_registry(tmp_path / "tokens", USERS) as pair:
        yield pair


def tags_url(registry: Registry, repository: str = "team/app") -> str:
    return f"{registry.url}/v2/{repository}/tags/list"


def get_status(auth: RegistryAuth, url: str) -> int:
    async def main() -> int:
        async with httpx.AsyncClient(auth=auth) as client:
            return (await client.get(url)).status_code

    return trio.run(main)


def test_credentials_show_no_secret() -> None:
    shown = repr([Credentials("alice", "s3cret-a"),
                  Credentials("", "", identity_token="s3cret-b"),
                  Credentials("", "", registry_token="s3cret-c")])
    assert "s3cret" not in shown and "alice" in shown


def test_a_keychain_is_asked_at_every_request(basic_registry: Registry) -> None:
    """A client made before the keychain knew the credentials uses them once it does: a
    lazily mounted layer reads again after the next pull brings its pull secret. Without
    them, the registry's refusal comes with the keychain's advice."""
    known: dict[str, Credentials] = {}
    auth = RegistryAuth(basic_registry.url, lookup=CredentialLookup(
        lambda: known.get("secret"), f"the image needs credentials: {ADVICE}"))
    with pytest.raises(RegistryAuthError, match=f"/v2/team/app/tags/list: refused without "
                       f"credentials \\(HTTP 401\\): the image needs credentials: {ADVICE}"):
        get_status(auth, tags_url(basic_registry))
    known["secret"] = Credentials("alice", "wonderland")
    assert get_status(auth, tags_url(basic_registry)) == 404  # authorized: no such repository
    known["secret"] = Credentials("alice", "rotated-away")
    assert get_status(auth, tags_url(basic_registry)) == 401  # the new secret is used


def test_fixed_credentials_stand_in_when_the_keychain_has_none(basic_registry: Registry
                                                               ) -> None:
    """`--creds` or docker login's credentials keep working beside a keychain."""
    auth = RegistryAuth(basic_registry.url, Credentials("alice", "wonderland"),
                        lookup=CredentialLookup(lambda: None, ADVICE))
    assert get_status(auth, tags_url(basic_registry)) == 404


def test_registry_options_ask_the_keychain_per_repository(basic_registry: Registry) -> None:
    class Keychain:
        advice = f"needs credentials: {ADVICE}"

        def credentials(self, registry: str, repository: str) -> Credentials | None:
            return Credentials(*next(iter(USERS.items()))) if repository == "team/app" else None

    options = RegistryOptions(insecure=True, keychain=Keychain())

    async def main() -> None:
        async with options.client(basic_registry.host, repository="team/app") as client:
            assert await client.blob_exists("team/app", "sha256:" + "0" * 64) is False
        async with options.client(basic_registry.host, repository="team/other") as client:
            with pytest.raises(UnauthorizedError, match=f"needs credentials: {ADVICE}"):
                await client.blob_exists("team/other", "sha256:" + "0" * 64)
        async with options.client(basic_registry.host) as client:  # no repository: no keychain
            with pytest.raises(UnauthorizedError, match="no credentials given"):
                await client.blob_exists("team/app", "sha256:" + "0" * 64)

    trio.run(main)


def test_an_identity_token_is_exchanged_for_access_tokens(
    tokens: tuple[Registry, TokenServer],
) -> None:
    registry, server = tokens
    identity = secrets.token_hex(16)
    server.refresh_tokens[identity] = "alice"

    async def main() -> None:
        credentials = Credentials("", "", identity_token=identity)
        async with RegistryClient(registry.host, insecure=True, credentials=credentials
                                  ) as client:
            assert await client.blob_exists("team/app", "sha256:" + "0" * 64) is False
        wrong = Credentials("", "", identity_token="not-" + identity)
        async with RegistryClient(registry.host, insecure=True, credentials=wrong) as client:
            with pytest.raises(UnauthorizedError) as caught:
                await client.blob_exists("team/app", "sha256:" + "0" * 64)
        assert "refused an identity token" in str(caught.value)
        assert identity not in str(caught.value)

    trio.run(main)
    granted, refused = server.requests
    assert (granted["grant"], granted["client_id"], granted["account"]) == (
        ["refresh_token"], ["lazyfs"], "alice")
    assert granted["scopes"] == ["repository:team/app:pull"]
    assert not refused["ok"]


def test_a_registry_token_is_sent_as_it_is(tokens: tuple[Registry, TokenServer]) -> None:
    registry, server = tokens
    token = server.issue("alice", ["repository:team/app:pull"])

    async def main() -> None:
        credentials = Credentials("", "", registry_token=token)
        async with RegistryClient(registry.host, insecure=True, credentials=credentials
                                  ) as client:
            assert await client.blob_exists("team/app", "sha256:" + "0" * 64) is False
            # Not the scope it was issued for: refused, and no token server asked.
            with pytest.raises(UnauthorizedError, match="credentials of a registry token"):
                await client.blob_exists("team/other", "sha256:" + "0" * 64)

    trio.run(main)
    assert server.requests == []
