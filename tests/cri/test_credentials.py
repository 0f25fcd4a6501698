"""kubelet's pull secrets as the image service reads and keeps them: AuthConfig read as
containerd's CRI plugin reads it, kept per registry and repository, in memory only."""

from __future__ import annotations

import base64

import pytest

from lazyfs.cri.api import api_pb2 as cri
from lazyfs.cri.credentials import AuthConfigError, PullSecrets, credentials_of, registry_of
from lazyfs.fetch.registry_auth import Credentials

REGISTRY = "registry.example:5000"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(("auth", "expected"), [
    (cri.AuthConfig(), None),
    (cri.AuthConfig(username="u", password="p:w"), Credentials("u", "p:w")),
    (cri.AuthConfig(auth=b64("u:p:w")), Credentials("u", "p:w")),
    (cri.AuthConfig(auth=b64("u:pw\x00\x00")), Credentials("u", "pw")),
    (cri.AuthConfig(identity_token="id"), Credentials("", "", identity_token="id")),
    (cri.AuthConfig(registry_token="rt"), Credentials("", "", registry_token="rt")),
    # containerd's order: user and password, identity token, auth; then a registry token.
    (cri.AuthConfig(username="u", password="p", identity_token="id", auth=b64("a:b")),
     Credentials("u", "p")),
    (cri.AuthConfig(identity_token="id", auth=b64("a:b")),
     Credentials("", "", identity_token="id")),
    (cri.AuthConfig(auth=b64("a:b"), registry_token="rt"), Credentials("a", "b")),
    # For this registry, by any spelling; another registry's are not used.
    (cri.AuthConfig(username="u", password="p", server_address=f"https://{REGISTRY}/v1/"),
     Credentials("u", "p")),
    (cri.AuthConfig(username="u", password="p", server_address=REGISTRY.upper()),
     Credentials("u", "p")),
    (cri.AuthConfig(username="u", password="p", server_address="other.example"), None),
])
def test_auth_config_is_read_as_containerd_reads_it(auth: cri.AuthConfig,
                                                    expected: Credentials | None) -> None:
    assert credentials_of(auth, REGISTRY) == expected


def test_docker_hub_is_named_by_any_of_its_names() -> None:
    auth = cri.AuthConfig(username="u", password="p",
                          server_address="https://index.docker.io/v1/")
    assert registry_of(auth.server_address) == "docker.io"
    assert credentials_of(auth, "docker.io") == Credentials("u", "p")


@pytest.mark.parametrize("encoded", ["not base64!", b64("no colon"), b64(":nouser")])
def test_a_malformed_auth_is_refused_without_showing_it(encoded: str) -> None:
    with pytest.raises(AuthConfigError) as caught:
        credentials_of(cri.AuthConfig(auth=encoded), REGISTRY)
    assert encoded not in str(caught.value) and "colon" not in str(caught.value)


def test_secrets_are_kept_per_registry_and_repository() -> None:
    secrets = PullSecrets(max_repositories=2)
    first, second = Credentials("u", "one"), Credentials("u", "two")
    secrets.remember(REGISTRY, "team/app", first)
    assert secrets.credentials(REGISTRY, "team/app") == first
    assert secrets.credentials(REGISTRY, "team/other") is None
    assert secrets.credentials("other.example", "team/app") is None
    secrets.remember(REGISTRY, "team/app", second)  # the next pull's secret replaces it
    assert secrets.credentials(REGISTRY, "team/app") == second
    secrets.remember("index.docker.io", "library/busybox", first)
    assert secrets.credentials("docker.io", "library/busybox") == first
    secrets.remember(REGISTRY, "team/third", first)  # beyond the bound: the oldest goes
    assert secrets.credentials(REGISTRY, "team/app") is None
    assert len(secrets) == 2
    assert "one" not in repr(secrets) and "two" not in repr(secrets)
    assert "pull the image again" in secrets.advice
