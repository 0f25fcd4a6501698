"""RegistryClient and RegistryAuth against Debian's docker-registry (real pushes and pulls, basic
and token auth, a redirecting CDN front end, mirrors) and against scripted faults."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from lazyfs.fetch import http
from lazyfs.fetch.registry import (
    DigestMismatchError,
    NotFoundError,
    RegistryClient,
    RegistryError,
    RegistryUnavailableError,
    UnauthorizedError,
)
from lazyfs.fetch.registry_auth import Credentials, RegistryAuth, RegistryAuthError
from lazyfs.format import oci
from lazyfs.format.descriptor import Descriptor
from lazyfs.format.platform import Platform, parse_platform
from tests.support.registry import (
    RedirectingFrontEnd,
    Registry,
    TokenServer,
    free_port,
    htpasswd_auth,
    redirecting_front_end,
    running_registry,
    token_registry,
)

USERS = {"alice": "wonderland"}
ALICE = ("alice", "wonderland")


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push_image(client: RegistryClient, repo: str, tag: str, layer: bytes) -> dict[str, Any]:
    """Push config, one EROFS layer and a manifest tagged `tag`; return what was pushed."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    await client.push_blob(repo, digest(config), config)
    await client.push_blob(repo, digest(layer), layer)
    manifest = oci.Manifest(
        config=Descriptor(oci.OCI_CONFIG, digest(config), len(config)),
        layers=(Descriptor(oci.EROFS_LAYER_ZSTD, digest(layer), len(layer)),),
    )
    body = oci.serialize_manifest(manifest)
    manifest_digest = await client.push_manifest(repo, tag, body, oci.OCI_MANIFEST)
    return {"config": config, "layer": layer, "body": body, "digest": manifest_digest}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as server:
        yield server


@pytest.fixture
def basic_registry(tmp_path: Path) -> Iterator[Registry]:
    auth = htpasswd_auth(tmp_path, USERS)
    with running_registry(tmp_path / "registry", auth) as server:
        yield server


@pytest.fixture
def tokens(tmp_path: Path) -> Iterator[tuple[Registry, TokenServer]]:
    with token_registry(tmp_path / "token", USERS) as pair:
        yield pair


@pytest.fixture
def front(basic_registry: Registry) -> Iterator[RedirectingFrontEnd]:
    with redirecting_front_end(basic_registry, ALICE) as server:
        yield server


# --- against the real registry ----------------------------------------------------------------


@pytest.mark.network
def test_push_and_pull_round_trip(registry: Registry, tmp_path: Path) -> None:
    layer = b"erofs layer bytes " * 5000  # large enough to be hashed off the event loop

    async def main() -> None:
        async with RegistryClient(registry.host, insecure=True) as client:
            pushed = await push_image(client, "team/app", "v1", layer)
            assert pushed["digest"] == digest(pushed["body"])
            assert not await client.push_blob("team/app", digest(layer), layer)  # already there

            body, media_type, got = await client.get_manifest("team/app", "v1")
            assert (body, media_type, got) == (pushed["body"], oci.OCI_MANIFEST, pushed["digest"])
            assert await client.get_manifest("team/app", got) == (body, media_type, got)
            manifest = oci.parse_manifest(body, media_type)
            assert manifest.layers[0].media_type == oci.EROFS_LAYER_ZSTD

            assert await client.get_blob("team/app", manifest.config.digest) == pushed["config"]
            dest = tmp_path / "layer"
            await client.download_blob("team/app", digest(layer), dest, size=len(layer))
            assert dest.read_bytes() == layer
            assert not (tmp_path / "layer.tmp").exists()
            assert await client.blob_exists("team/app", digest(layer))
            assert not await client.blob_exists("team/app", digest(b"nope"))

            index = oci.Index(
                manifests=(
                    Descriptor(
                        oci.OCI_MANIFEST,
                        got,
                        len(body),
                        platform=Platform("linux", "amd64"),
                    ),
                )
            )
            index_body = oci.serialize_index(index)
            index_digest = digest(index_body)
            assert await client.push_manifest("team/app", index_digest, index_body, oci.OCI_INDEX)
            fetched, kind, _ = await client.get_manifest("team/app", index_digest)
            assert kind == oci.OCI_INDEX
            assert oci.parse_index(fetched).select(parse_platform("linux/amd64")).digest == got

    run(main)


@pytest.mark.network
def test_push_blob_from_file_and_mount(registry: Registry, tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000
    path = tmp_path / "blob"
    path.write_bytes(data)

    async def main() -> None:
        async with RegistryClient(registry.host, insecure=True) as client:
            assert await client.push_blob("src", digest(data), path)
            assert await client.get_blob("src", digest(data)) == data
            assert not await client.push_blob("dst", digest(data), path, mount_from="src")
            assert await client.blob_exists("dst", digest(data))
            wrong = tmp_path / "wrong"
            wrong.write_bytes(b"not the data")
            with pytest.raises(RegistryError, match=r"HTTP 400; DIGEST_INVALID"):
                await client.push_blob("src", digest(b"other"), wrong)

    run(main)


@pytest.mark.network
def test_missing_manifest_and_blob_errors(registry: Registry, tmp_path: Path) -> None:
    async def main() -> None:
        async with RegistryClient(registry.host, insecure=True) as client:
            with pytest.raises(NotFoundError) as info:
                await client.get_manifest("foo", "missing")
            assert str(info.value) == (
                f"registry {registry.host}: manifest foo:missing not found (HTTP 404)"
            )
            with pytest.raises(NotFoundError, match=r"blob foo@sha256:[0-9a-f]+ not found"):
                await client.get_blob("foo", digest(b"x"))
            with pytest.raises(NotFoundError):
                await client.download_blob("foo", digest(b"x"), tmp_path / "x")
            assert list(tmp_path.iterdir()) == [tmp_path / "registry"]

    run(main)


@pytest.mark.network
def test_insecure_flag_required_for_plain_http(registry: Registry) -> None:
    async def main() -> None:
        async with RegistryClient(registry.host, retries=0) as client:
            with pytest.raises(RegistryError, match=r"TLS handshake .* insecure=True") as info:
                await client.get_manifest("foo", "latest")
            assert "127.0.0.1" in str(info.value)

    run(main)
    with pytest.raises(ValueError, match="plain HTTP needs insecure=True"):
        RegistryClient(registry.url)
    with pytest.raises(ValueError, match=r"mirror 'http://m:1'.*insecure=True"):
        RegistryClient(registry.host, mirrors=["http://m:1"])


@pytest.mark.network
def test_basic_auth(basic_registry: Registry) -> None:
    async def main() -> None:
        async with RegistryClient(basic_registry.host, insecure=True, credentials=ALICE) as client:
            pushed = await push_image(client, "app", "v1", b"layer")
            assert (await client.get_manifest("app", "v1"))[2] == pushed["digest"]
        async with RegistryClient(
            basic_registry.host, insecure=True, credentials=("alice", "wrong")
        ) as client:
            with pytest.raises(UnauthorizedError) as info:
                await client.get_manifest("app", "v1")
            message = str(info.value)
            assert message.startswith(f"registry {basic_registry.host}: manifest app:v1: ")
            assert "(HTTP 401; UNAUTHORIZED: authentication required)" in message
            assert "credentials of user 'alice' were refused" in message
            assert "wrong" not in message
        async with RegistryClient(basic_registry.host, insecure=True) as client:
            with pytest.raises(UnauthorizedError, match="no credentials given"):
                await client.get_manifest("app", "v1")

    run(main)


@pytest.mark.network
def test_bearer_token_flow(tokens: tuple[Registry, TokenServer]) -> None:
    registry, server = tokens

    async def main() -> None:
        async with RegistryClient(registry.host, insecure=True, credentials=ALICE) as client:
            pushed = await push_image(client, "team/app", "v1", b"layer")
            for _ in range(3):
                assert (await client.get_manifest("team/app", "v1"))[2] == pushed["digest"]
            # One token per scope, reused while valid.
            assert [r["scopes"] for r in server.requests] == [
                ["repository:team/app:pull"],
                ["repository:team/app:pull,push"],
            ]
            # A cross-repository mount needs a token for both repositories.
            assert not await client.push_blob(
                "other", digest(b"layer"), b"layer", mount_from="team/app"
            )
            assert await client.get_blob("other", digest(b"layer")) == b"layer"
            assert sorted(server.requests[3]["scopes"]) == [
                "repository:other:pull,push",
                "repository:team/app:pull",
            ]
        assert all(r["account"] == "alice" for r in server.requests)

        async with RegistryClient(
            registry.host, insecure=True, credentials=("alice", "wrong")
        ) as client:
            with pytest.raises(UnauthorizedError) as info:
                await client.get_manifest("team/app", "v1")
        assert str(info.value) == (
            f"registry {registry.host}: manifest team/app:v1: token server {server.url}/token "
            "refused user 'alice' for repository:team/app:pull (HTTP 401); check the credentials"
        )

    run(main)


@pytest.mark.network
def test_bearer_token_refreshed_when_expired(tokens: tuple[Registry, TokenServer]) -> None:
    registry, server = tokens
    server.expires_in = 120
    now = [1000.0]
    auth = RegistryAuth(registry.url, Credentials(*ALICE), clock=lambda: now[0])
    url = f"{registry.url}/v2/app/tags/list"

    async def main() -> None:
        async with httpx.AsyncClient(auth=auth) as client:
            assert (await client.get(url)).status_code == 404  # authorized: repository unknown
            assert (await client.get(url)).status_code == 404
            assert len(server.requests) == 1
            now[0] += 121
            assert (await client.get(url)).status_code == 404
            assert len(server.requests) == 2

    run(main)


@pytest.mark.network
def test_bearer_token_refreshed_when_registry_rejects_it(
    tokens: tuple[Registry, TokenServer],
) -> None:
    registry, server = tokens

    async def main() -> None:
        async with RegistryClient(registry.host, insecure=True, credentials=ALICE) as client:
            await push_image(client, "app", "v1", b"layer")
            await client.get_manifest("app", "v1")
            before = len(server.requests)
            # The issuer rotates its key; the registry now rejects the cached token.
            server.rotate_key()
            await trio.to_thread.run_sync(registry.restart)
            await client.get_manifest("app", "v1")
            assert len(server.requests) == before + 1

    run(main)


@pytest.mark.network
def test_redirected_blob_get_sends_no_authorization(
    front: RedirectingFrontEnd, tmp_path: Path
) -> None:
    host = front.url.removeprefix("http://")
    layer = b"0123456789" * 1000

    async def main() -> None:
        async with RegistryClient(host, insecure=True, credentials=ALICE) as client:
            await push_image(client, "app", "v1", layer)
            assert await client.get_blob("app", digest(layer)) == layer
            await client.download_blob("app", digest(layer), tmp_path / "blob")
            # The same auth, handed to another HTTP client reading a range.
            async with httpx.AsyncClient(auth=client.auth, follow_redirects=True) as other:
                url = client.blob_url("app", digest(layer))
                response = await other.get(url, headers={"Range": "bytes=10-19"})
                assert (response.status_code, response.content) == (206, layer[10:20])

    run(main)
    assert (tmp_path / "blob").read_bytes() == layer
    assert front.redirects == 3
    assert [r["status"] for r in front.cdn_requests] == [200, 200, 206]
    for request in front.cdn_requests:
        assert "authorization" not in {name.lower() for name in request["headers"]}


@pytest.mark.network
def test_expired_signed_url_is_resolved_again(front: RedirectingFrontEnd) -> None:
    host = front.url.removeprefix("http://")
    layer = b"layer" * 100

    async def main() -> None:
        async with RegistryClient(host, insecure=True, credentials=ALICE, backoff_s=0) as client:
            await push_image(client, "app", "v1", layer)
            front.expire_next = 2
            assert await client.get_blob("app", digest(layer)) == layer

    run(main)
    assert [r["status"] for r in front.cdn_requests] == [403, 403, 200]


@pytest.mark.network
def test_range_reader_with_registry_auth(front: RedirectingFrontEnd) -> None:
    host = front.url.removeprefix("http://")
    layer = bytes(range(256)) * 64

    async def main() -> None:
        async with RegistryClient(host, insecure=True, credentials=ALICE) as client:
            await push_image(client, "app", "v1", layer)
            url = client.blob_url("app", digest(layer))
            options = http.ReaderOptions(auth=client.auth, backoff_base_s=0)
            async with http.HttpRangeReader(url, options) as reader:
                assert await reader.read(100, 50) == layer[100:150]
                front.clock_offset_s += 3600  # the remembered signed URL expires
                assert await reader.read(1000, 10) == layer[1000:1010]

    run(main)
    assert 403 in [r["status"] for r in front.cdn_requests]
    for request in front.cdn_requests:
        assert "authorization" not in {name.lower() for name in request["headers"]}


@pytest.mark.network
def test_mirrors_tried_first_then_origin(registry: Registry, tmp_path: Path) -> None:
    down = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        with running_registry(tmp_path / "mirror") as mirror:
            async with RegistryClient(registry.host, insecure=True) as origin:
                pushed = await push_image(origin, "app", "v1", b"layer")
            async with RegistryClient(
                registry.host, insecure=True, mirrors=[down, mirror.host]
            ) as client:
                assert (await client.get_manifest("app", "v1"))[2] == pushed["digest"]
                assert await client.get_blob("app", digest(b"layer")) == b"layer"
                await client.download_blob("app", digest(b"layer"), tmp_path / "blob")
                assert (tmp_path / "blob").read_bytes() == b"layer"
            # A mirror that has the content serves it, even when the origin is down.
            async with RegistryClient(mirror.host, insecure=True) as mirror_client:
                await push_image(mirror_client, "app", "v1", b"layer")
            async with RegistryClient(down, insecure=True, mirrors=[mirror.host]) as client:
                assert (await client.get_manifest("app", "v1"))[2] == pushed["digest"]

    run(main)


# --- scripted faults (httpx.MockTransport) ----------------------------------------------------

ORIGIN = "registry.test"
BLOB = b"blob bytes"


def scripted(answers: list[Any], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler)


def run_mock(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_transient_faults_are_retried() -> None:
    seen: list[httpx.Request] = []
    answers = [
        httpx.Response(503),
        httpx.ConnectError("refused"),
        httpx.Response(429, headers={"Retry-After": "2"}),
        httpx.Response(200, content=BLOB),
    ]

    async def main() -> None:
        async with RegistryClient(ORIGIN, transport=scripted(answers, seen)) as client:
            assert await client.get_blob("app", digest(BLOB)) == BLOB

    run_mock(main)
    assert len(seen) == 4


def test_retries_are_bounded() -> None:
    seen: list[httpx.Request] = []

    async def main() -> None:
        transport = scripted([httpx.Response(500)], seen)
        async with RegistryClient(ORIGIN, transport=transport, retries=2) as client:
            with pytest.raises(RegistryUnavailableError) as info:
                await client.get_manifest("app", "v1")
        assert str(info.value) == (
            "registry registry.test: manifest app:v1: failed after 3 attempts; last: HTTP 500"
        )

    run_mock(main)
    assert len(seen) == 3


def test_digest_mismatch_detected() -> None:
    seen: list[httpx.Request] = []
    manifest = b'{"schemaVersion":2,"mediaType":"%s","manifests":[]}' % oci.OCI_INDEX.encode()
    wrong = digest(b"something else")

    async def main() -> None:
        transport = scripted([httpx.Response(200, content=manifest)], seen)
        async with RegistryClient(ORIGIN, transport=transport) as client:
            with pytest.raises(DigestMismatchError, match=f"content has digest {digest(manifest)}"):
                await client.get_manifest("app", wrong)
            with pytest.raises(DigestMismatchError, match=f"expected {wrong}"):
                await client.get_blob("app", wrong)
            # The registry's own claim for a tag must match too.
        transport = scripted(
            [httpx.Response(200, content=manifest, headers={"Docker-Content-Digest": wrong})], seen
        )
        async with RegistryClient(ORIGIN, transport=transport) as client:
            with pytest.raises(DigestMismatchError, match="manifest app:v1"):
                await client.get_manifest("app", "v1")
            _, media_type, got = await client.get_manifest("app", digest(manifest))
            assert (media_type, got) == (oci.OCI_INDEX, digest(manifest))

    run_mock(main)


def test_lying_mirror_falls_back_to_origin(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "mirror.test":
            return httpx.Response(200, content=b"tampered")
        return httpx.Response(200, content=BLOB)

    async def main() -> None:
        transport = httpx.MockTransport(handler)
        async with RegistryClient(ORIGIN, mirrors=["mirror.test"], transport=transport) as client:
            assert await client.get_blob("app", digest(BLOB)) == BLOB
            await client.download_blob("app", digest(BLOB), tmp_path / "b")
        assert (tmp_path / "b").read_bytes() == BLOB

    run_mock(main)


def test_download_of_wrong_size_leaves_nothing(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    async def main() -> None:
        transport = scripted([httpx.Response(200, content=BLOB)], seen)
        async with RegistryClient(ORIGIN, transport=transport) as client:
            with pytest.raises(RegistryError, match=f"got {len(BLOB)} bytes, expected 99"):
                await client.download_blob("app", digest(BLOB), tmp_path / "b", size=99)
            with pytest.raises(RegistryError, match="more than the 3 bytes expected"):
                await client.download_blob("app", digest(BLOB), tmp_path / "b", size=3)
            with pytest.raises(DigestMismatchError):
                await client.download_blob("app", digest(b"other"), tmp_path / "b")
        assert list(tmp_path.iterdir()) == []

    run_mock(main)


def test_oversized_manifest_refused() -> None:
    seen: list[httpx.Request] = []

    async def main() -> None:
        big = httpx.Response(200, content=b" " * (4 * 1024 * 1024 + 1))
        async with RegistryClient(ORIGIN, transport=scripted([big], seen)) as client:
            with pytest.raises(RegistryError, match="larger than 4194304 bytes"):
                await client.get_manifest("app", "v1")

    run_mock(main)


def test_credentials_only_for_the_registry_origin() -> None:
    seen: list[httpx.Request] = []
    challenge = 'Bearer realm="https://auth.test/token",service="reg",scope="repository:a:pull"'

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "auth.test":
            return httpx.Response(200, json={"token": "t0k"})
        if request.url.host == "cdn.test":
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        if request.headers.get("Authorization") != "Bearer t0k":
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(307, headers={"Location": "https://cdn.test/blob?sig=1"})

    auth = RegistryAuth(f"https://{ORIGIN}", Credentials(*ALICE))

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), auth=auth) as client:
            response = await client.get(f"https://{ORIGIN}/v2/a/blobs/sha256:00")
            assert response.status_code == 307
            response = await client.get(
                f"https://{ORIGIN}/v2/a/blobs/sha256:00", follow_redirects=True
            )
            assert response.status_code == 401
            assert (await client.get("https://cdn.test/blob")).status_code == 401
            assert (await client.get(f"http://{ORIGIN}/v2/a/blobs/x")).status_code == 401

    run_mock(main)
    by_host = {(r.url.scheme, r.url.host, r.headers.get("Authorization")) for r in seen}
    assert ("https", "auth.test", Credentials(*ALICE).basic_header()) in by_host
    assert ("https", "cdn.test", None) in by_host
    assert ("http", ORIGIN, None) in by_host
    assert {h for s, host, h in by_host if host == "cdn.test"} == {None}
    assert sum(r.url.host == "auth.test" for r in seen) == 1


def test_sync_client_basic_challenge() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers.get("Authorization") == Credentials(*ALICE).basic_header():
            return httpx.Response(200, text="ok")
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    auth = RegistryAuth(f"https://{ORIGIN}", Credentials(*ALICE))
    with httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as client:
        assert client.get(f"https://{ORIGIN}/v2/").text == "ok"
        assert client.get(f"https://{ORIGIN}/v2/a/manifests/v1").text == "ok"
    assert len(seen) == 3  # after the first challenge, basic credentials go along at once


def test_plain_http_realm_refused_for_https_registry() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="http://a.test/t"'})

    async def main() -> None:
        auth = RegistryAuth(f"https://{ORIGIN}", Credentials(*ALICE))
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), auth=auth) as client:
            with pytest.raises(RegistryAuthError, match="plain http for an https registry"):
                await client.get(f"https://{ORIGIN}/v2/a/manifests/v1")

    run_mock(main)


# --- docker config credentials ----------------------------------------------------------------


def test_load_docker_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lazyfs.fetch.registry_auth import DockerConfigError, load_docker_credentials

    config = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},  # hub:secret
            "localhost:5000": {"username": "u", "password": "p:w"},
            "https://ghcr.io": {"auth": "bWU6dG9rZW46d2l0aDpjb2xvbnM="},  # me:token:with:colons
            "bad.io": {"auth": "not base64!"},
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert load_docker_credentials("docker.io") == Credentials("hub", "secret")
    assert load_docker_credentials("localhost:5000") == Credentials("u", "p:w")
    assert load_docker_credentials("ghcr.io") == Credentials("me", "token:with:colons")
    assert load_docker_credentials("quay.io") is None
    with pytest.raises(DockerConfigError, match=r"config.json: auths\['bad.io'\].auth is not"):
        load_docker_credentials("bad.io")
    assert "secret" not in repr(Credentials("hub", "secret"))
    assert load_docker_credentials("docker.io", tmp_path / "absent.json") is None
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DockerConfigError, match=r"broken\.json: not valid JSON"):
        load_docker_credentials("docker.io", tmp_path / "broken.json")
