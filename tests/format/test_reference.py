"""Image reference parsing: Docker Hub defaults, ports, tags, digests and clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.format.reference import (
    ImageReference,
    InvalidReferenceError,
    parse_reference,
    registry_api_host,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
        ("bitnami/redis", "docker.io", "bitnami/redis", "latest", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/library/alpine:1", "docker.io", "library/alpine", "1", None),
        ("localhost:5000/x", "localhost:5000", "x", "latest", None),
        ("localhost/x:y", "localhost", "x", "y", None),
        ("127.0.0.1:5000/a/b/c:v1.2_3-rc", "127.0.0.1:5000", "a/b/c", "v1.2_3-rc", None),
        ("ghcr.io/o/app@" + D, "ghcr.io", "o/app", None, D),
        ("ghcr.io/o/app:1.0@" + D, "ghcr.io", "o/app", "1.0", D),
        ("alpine@" + D, "docker.io", "library/alpine", None, D),
        ("[::1]:5000/img:t", "[::1]:5000", "img", "t", None),
        ("Registry.Example/a__b/c-d.e", "Registry.Example", "a__b/c-d.e", "latest", None),
    ],
)
def test_parse(text: str, registry: str, repository: str, tag: str | None, digest: str | None):
    ref = parse_reference(text)
    assert ref == ImageReference(registry, repository, tag, digest)
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty image reference"),
        ("Alpine", "component 'Alpine' must be lower-case"),
        ("alpine:", "empty tag"),
        ("alpine:-x", "tag '-x'"),
        ("alpine:" + "t" * 129, "tag 't"),
        ("alpine@sha256:abc", "expected 64 lower-case hex digits"),
        ("alpine@sha256:" + "AB" * 32, "expected 64 lower-case hex digits"),
        ("alpine@md5:" + "ab" * 16, "unsupported algorithm 'md5'"),
        ("alpine@" + "ab" * 32, "expected '<algorithm>:<hex>'"),
        ("localhost:99999/x", "port '99999' is not 1-65535"),
        ("localhost:http/x", "port 'http'"),
        ("bad_host.io/x", "'bad_host.io' is not a valid host"),
        ("a//b", "component ''"),
        ("a/b/", "component ''"),
        ("a b", "white space"),
        ("ghcr.io/", "repository name is empty"),
        ("x/" + "a" * 260, "longer than 255"),
    ],
)
def test_invalid(text: str, complaint: str):
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference(text)
    assert complaint in str(info.value)
    assert isinstance(info.value, ValueError)


def test_str_and_helpers():
    ref = parse_reference("localhost:5000/team/app:1.0")
    assert str(ref) == "localhost:5000/team/app:1.0"
    assert ref.reference == "1.0"
    pinned = ref.with_digest(D)
    assert str(pinned) == f"localhost:5000/team/app:1.0@{D}"
    assert pinned.reference == D
    assert registry_api_host(ref.registry) == "localhost:5000"
    assert registry_api_host(parse_reference("alpine").registry) == "registry-1.docker.io"
    assert registry_api_host("index.docker.io") == "registry-1.docker.io"
    with pytest.raises(InvalidReferenceError, match="digest 'sha256:1'"):
        ref.with_digest("sha256:1")


def test_dataclass_is_validated_and_frozen():
    with pytest.raises(InvalidReferenceError, match="no tag or digest"):
        ImageReference("ghcr.io", "a", None, None)
    with pytest.raises(InvalidReferenceError, match="component 'A'"):
        ImageReference("ghcr.io", "A", "t")
    ref = ImageReference("ghcr.io", "a", "t")
    with pytest.raises(AttributeError):
        ref.tag = "u"  # type: ignore[misc]


_component = st.from_regex(r"[a-z0-9]{1,5}(?:[._-][a-z0-9]{1,5}){0,2}", fullmatch=True)
_references = st.builds(
    ImageReference,
    registry=st.sampled_from(["ghcr.io", "localhost:5000", "127.0.0.1:8080", "docker.io"]),
    repository=st.lists(_component, min_size=2, max_size=4).map("/".join),
    tag=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    digest=st.one_of(st.none(), st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)),
)


@given(_references)
def test_str_round_trips(ref: ImageReference):
    assert parse_reference(str(ref)) == ref
