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
