"""OCI manifests, indexes, descriptors and platforms: canonical round trips, platform choice,
and parse errors that name the field, all in the FormatError family."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.errors import LazyfsError
from lazyfs.format import oci
from lazyfs.format.descriptor import Descriptor, DescriptorError, descriptor_from_dict
from lazyfs.format.errors import FormatError, OCIFormatError
from lazyfs.format.platform import Platform, parse_platform
from lazyfs.format.reference import InvalidReferenceError, parse_reference


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_oci_models_round_trip_and_select_platform() -> None:
    layer = Descriptor(oci.OCI_LAYER_GZIP, digest(b"x"), 1, annotations={"b": "2", "a": "1"})
    manifest = oci.Manifest(config=Descriptor(oci.OCI_CONFIG, digest(b"{}"), 2), layers=(layer,))
    body = oci.serialize_manifest(manifest)
    assert oci.parse_manifest(body) == manifest
    assert b'"annotations":{"a":"1","b":"2"}' in body and b" " not in body

    def entry(arch: str, variant: str | None = None) -> Descriptor:
        platform = Platform("linux", arch, variant)
        return Descriptor(oci.OCI_MANIFEST, digest(arch.encode()), 1, platform=platform)

    index = oci.Index(manifests=(entry("amd64"), entry("arm", "v6"), entry("arm64", "v8")))
    assert oci.parse_index(oci.serialize_index(index)) == index
    assert index.select(parse_platform("linux/x86_64")).digest == digest(b"amd64")
    assert index.select(parse_platform("linux/arm64")).digest == digest(b"arm64")
    with pytest.raises(oci.PlatformNotFoundError, match=r"linux/arm/v7 \(available: linux/amd64"):
        index.select(parse_platform("linux/arm"))


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"[]", "manifest: expected a JSON object"),
        (b"{", "manifest: not valid JSON"),
        (b'{"schemaVersion":1,"config":{},"layers":[]}', "schemaVersion: expected 2, found 1"),
        (b'{"schemaVersion":2,"layers":[]}', "missing field 'config'"),
        (
            b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:00","size":1},'
            b'"layers":[]}',
            "manifest.config: digest: expected sha256:<64 hex digits>",
        ),
        (
            b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:%s","size":true},'
            b'"layers":[]}' % (b"0" * 64),
            "manifest.config: size: expected a non-negative integer, found True",
        ),
        (
            b'{"schemaVersion":2,"mediaType":"%s","manifests":[]}' % oci.OCI_INDEX.encode(),
            "manifest.mediaType: expected one of",
        ),
    ],
)
def test_oci_parse_errors_name_the_field(body: bytes, complaint: str) -> None:
    with pytest.raises(OCIFormatError) as info:
        oci.parse_manifest(body)
    assert complaint in str(info.value)


def test_a_descriptor_with_platform_round_trips_in_spec_order() -> None:
    platform = Platform("linux", "arm64", "v8", "10.0", ("erofs",))
    descriptor = Descriptor(oci.OCI_MANIFEST, digest(b"m"), 3, urls=("http://h/b",),
                            annotations={"z": "1", "a": "2"}, platform=platform,
                            artifact_type="application/x")
    obj = descriptor.to_json_dict()
    assert list(obj) == ["mediaType", "digest", "size", "urls", "annotations", "platform",
                         "artifactType"]
    assert list(obj["annotations"]) == ["a", "z"]
    assert descriptor_from_dict(obj) == descriptor


@pytest.mark.parametrize(("platform", "named"), [
    ("linux/amd64", "platform: expected a JSON object"),
    ({"architecture": "amd64"}, "platform.os: expected a string"),
    ({"os": "linux", "architecture": 5}, "platform.architecture: expected a string"),
    ({"os": "linux", "architecture": "arm", "os.features": "erofs"}, "platform.os.features"),
])
def test_a_bad_platform_is_a_descriptor_error(platform: object, named: str) -> None:
    obj = {"mediaType": oci.OCI_MANIFEST, "digest": digest(b"m"), "size": 1,
           "platform": platform}
    with pytest.raises(DescriptorError, match=f"^index: {named}"):
        descriptor_from_dict(obj, "index")


def test_a_bad_layer_in_a_manifest_is_an_oci_format_error() -> None:
    body = (b'{"schemaVersion":2,"config":{"mediaType":"x","digest":"%s","size":1},'
            b'"layers":[{"mediaType":"x","digest":"%s","size":-1}]}'
            % (digest(b"c").encode(), digest(b"l").encode()))
    with pytest.raises(OCIFormatError, match=r"^manifest\.layers\[0\]: size"):
        oci.parse_manifest(body)


def test_every_parse_error_is_a_format_error_and_a_value_error() -> None:
    for error in (OCIFormatError, DescriptorError, InvalidReferenceError):
        assert issubclass(error, FormatError) and issubclass(error, ValueError)
    assert issubclass(oci.PlatformNotFoundError, LazyfsError)
    with pytest.raises(FormatError):
        parse_reference("UPPER/Case:tag")
    with pytest.raises(FormatError):
        parse_platform("linux")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_garbage_raises_only_oci_format_errors(data: bytes) -> None:
    with contextlib.suppress(OCIFormatError):
        oci.parse_manifest_or_index(data)
