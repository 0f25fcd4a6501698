"""Registry options as a user gives them: USER:PASSWORD text and a client per registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from lazyfs.errors import LazyfsError
from lazyfs.fetch.registry_auth import Credentials, DockerConfigError
from lazyfs.fetch.registry_options import CredentialsError, RegistryOptions, parse_credentials


@pytest.mark.parametrize(("text", "expected"), [
    ("alice:wonderland", Credentials("alice", "wonderland")),
    ("alice:token:with:colons", Credentials("alice", "token:with:colons")),
    ("alice:", Credentials("alice", "")),
])
def test_credentials_split_at_the_first_colon(text: str, expected: Credentials) -> None:
    assert parse_credentials(text) == expected


@pytest.mark.parametrize("text", ["alice", ":secret", ""])
def test_credentials_without_user_or_colon_name_the_option(text: str) -> None:
    with pytest.raises(CredentialsError, match=r"^--push-creds: expected USER:PASSWORD$"):
        parse_credentials(text, "--push-creds")
    assert issubclass(CredentialsError, LazyfsError)


def test_options_are_frozen() -> None:
    options = RegistryOptions(insecure=True, mirrors=("mirror.test",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.insecure = False  # type: ignore[misc]


def test_a_broken_docker_config_is_a_user_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with pytest.raises(DockerConfigError, match=r"config\.json: not valid JSON") as caught:
        RegistryOptions().client("registry.test")
    assert isinstance(caught.value, LazyfsError)
    # Given credentials, the Docker config is not read at all.
    client = RegistryOptions(Credentials("alice", "x")).client("registry.test", mirrors=False)
    assert client.name == "registry.test"
    trio.run(client.aclose)


def test_a_malformed_mirror_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'bad host' is not a valid host"):
        RegistryOptions(Credentials("a", "b"), mirrors=("bad host",)).client("registry.test")


def test_plain_http_hosts_get_http_and_every_other_host_https() -> None:
    options = RegistryOptions(mirrors=("mirror.test:5000", "cdn.test"),
                              plain_http=("Mirror.test:5000", "registry.test"))
    assert options.allows_plain_http
    assert options.url_of("registry.test") == "http://registry.test"
    assert options.url_of("mirror.test:5000") == "http://mirror.test:5000"
    assert options.url_of("cdn.test") == "https://cdn.test"
    assert options.url_of("https://given.test") == "https://given.test"
    digest = "sha256:" + "0" * 64
    for registry, scheme in (("registry.test", "http"), ("other.test", "https")):
        client = options.client(registry)
        assert client.blob_url("app", digest).startswith(f"{scheme}://{registry}/v2/app/")
        trio.run(client.aclose)
    # Without plain_http hosts names pass as they are, and --insecure-registry means all.
    assert RegistryOptions().url_of("registry.test") == "registry.test"
    insecure = RegistryOptions(insecure=True, plain_http=("registry.test",))
    assert insecure.url_of("other.test") == "other.test" and insecure.allows_plain_http


def test_a_credentials_file_is_read_instead_of_docker_logins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "absent"))
    path = tmp_path / "auth.json"
    path.write_text('{"auths": {"registry.test": {"username": "bob", "password": "pw"}}}')
    client = RegistryOptions(credentials_file=str(path)).client("registry.test")
    assert client.auth.credentials == Credentials("bob", "pw")
    trio.run(client.aclose)
    client = RegistryOptions().client("registry.test")
    assert client.auth.credentials is None
    trio.run(client.aclose)
