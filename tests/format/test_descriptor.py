"""The layer descriptor and its seekable EROFS annotations: round trips and every bad field."""

from __future__ import annotations

import contextlib
import json
from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_DIGEST,
    ANNOTATION_CHUNK_TABLE_OFFSET,
    ANNOTATION_ROOT_DIGEST,
    ANNOTATION_VERITY_OFFSET,
    MEDIA_TYPE_EROFS_ZSTD,
    Descriptor,
    DescriptorError,
    SeekableAnnotations,
    descriptor_from_dict,
    descriptor_path_candidates,
    descriptor_path_for,
    parse_annotations,
    parse_descriptor,
    serialize_descriptor,
)
from lazyfs.format.errors import FormatError

SHA256 = "sha256:" + "ab" * 32
SHA512 = "sha512:" + "cd" * 64


def hex_digests(prefix: str, size: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=size, max_size=size).map(lambda raw: f"{prefix}:{raw.hex()}")


offsets = st.integers(0, 2**64 - 1)
root_digests = st.one_of(hex_digests("sha512", 64), hex_digests("sha256", 32),
                         hex_digests("sha1", 20))


@st.composite
def seekable_annotations(draw: st.DrawFn) -> SeekableAnnotations:
    table_offset = draw(offsets)
    verity_offset = draw(st.none() | offsets.filter(lambda offset: offset != table_offset))
    root = draw(st.none() | root_digests) if verity_offset is not None else None
    return SeekableAnnotations(table_offset, draw(st.none() | hex_digests("sha512", 64)),
                               verity_offset, root)


descriptors = st.builds(
    Descriptor,
    media_type=st.text(max_size=40),
    digest=st.one_of(hex_digests("sha256", 32), hex_digests("sha512", 64)),
    size=st.integers(0, 2**63),
    annotations=st.dictionaries(st.text(max_size=30), st.text(max_size=30), max_size=6),
    urls=st.lists(st.text(max_size=30), max_size=3).map(tuple),
)


@settings(max_examples=100, deadline=None)
@given(descriptors)
def test_descriptor_round_trips(descriptor):
    assert parse_descriptor(serialize_descriptor(descriptor)) == descriptor
    assert parse_descriptor(serialize_descriptor(descriptor).encode()) == descriptor


@settings(max_examples=100, deadline=None)
@given(seekable_annotations(), st.dictionaries(st.text(max_size=20), st.text(max_size=20),
                                                 max_size=3))
def test_annotations_round_trip(annotations, unrelated):
    as_dict = {**unrelated, **annotations.to_annotations()}
    assert parse_annotations(as_dict) == annotations
    descriptor = Descriptor(MEDIA_TYPE_EROFS_ZSTD, SHA256, 10, annotations=as_dict)
    assert parse_descriptor(serialize_descriptor(descriptor)).seekable() == annotations


def test_metadata_offsets_give_the_data_end_in_either_order():
    table_first = SeekableAnnotations(1000, SHA512, 1200, "sha512:" + "00" * 64)
    verity_first = SeekableAnnotations(1200, SHA512, 1000, "sha512:" + "00" * 64)
    for seekable in (table_first, verity_first):
        assert seekable.metadata_offsets == (1000, 1200)
        assert seekable.data_end == 1000
        assert seekable.is_trusted
    assert SeekableAnnotations(50).data_end == 50
    assert not SeekableAnnotations(50).is_trusted
    assert SeekableAnnotations(50, SHA512).is_trusted
    assert not SeekableAnnotations(50, SHA512, 60).is_trusted


def test_a_containerd_descriptor_parses():
    text = json.dumps({
        "mediaType": MEDIA_TYPE_EROFS_ZSTD, "digest": SHA256, "size": 516757,
        "annotations": {
            ANNOTATION_VERITY_OFFSET: "496269",
            ANNOTATION_ROOT_DIGEST: "sha512:" + "46" * 64,
            ANNOTATION_CHUNK_DIGEST: SHA512.upper().replace("SHA512", "sha512"),
            ANNOTATION_CHUNK_TABLE_OFFSET: "495446",
        },
    })
    annotations = parse_descriptor(text, "layer.json").seekable("layer.json")
    assert annotations == SeekableAnnotations(495446, SHA512, 496269, "sha512:" + "46" * 64)


def _descriptor(**changes: object) -> dict[str, object]:
    obj: dict[str, object] = {"mediaType": MEDIA_TYPE_EROFS_ZSTD, "digest": SHA256, "size": 1,
                              "annotations": {ANNOTATION_CHUNK_TABLE_OFFSET: "0"}}
    for key, value in changes.items():
        if value is _MISSING:
            del obj[key]
        else:
            obj[key] = value
    return obj


_MISSING = object()


@pytest.mark.parametrize(("obj", "field"), [
    ([], "expected a JSON object, found list"),
    ("text", "expected a JSON object, found str"),
    (None, "expected a JSON object, found NoneType"),
    (_descriptor(mediaType=_MISSING), "mediaType"),
    (_descriptor(mediaType=5), "mediaType"),
    (_descriptor(digest=_MISSING), "digest"),
    (_descriptor(digest=5), "digest"),
    (_descriptor(digest="sha256:" + "ab" * 31), "digest"),
    (_descriptor(digest="sha256:" + "AB" * 32), "digest"),
    (_descriptor(digest="md5:" + "ab" * 16), "digest"),
    (_descriptor(digest="ab" * 32), "digest"),
    (_descriptor(digest=SHA256 + "\n"), "digest"),
    (_descriptor(size=_MISSING), "size"),
    (_descriptor(size=-1), "size"),
    (_descriptor(size="5"), "size"),
    (_descriptor(size=5.0), "size"),
    (_descriptor(size=True), "size"),
    (_descriptor(annotations=[]), "annotations"),
    (_descriptor(annotations="x"), "annotations"),
    (_descriptor(annotations=0), "annotations"),
    (_descriptor(annotations={"a": 1}), "annotations"),
    (_descriptor(annotations={ANNOTATION_CHUNK_TABLE_OFFSET: 0}), "annotations"),
    (_descriptor(urls="http://example.com/blob"), "urls"),
    (_descriptor(urls=[1]), "urls"),
    (_descriptor(urls=5), "urls"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_missing_or_ill_typed_fields_are_rejected_by_name(obj, field):
    with pytest.raises(DescriptorError, match=f"^layer.json: {field}"):
        descriptor_from_dict(obj, "layer.json")
    with pytest.raises(DescriptorError, match=f"^layer.json: {field}"):
        parse_descriptor(json.dumps(obj), "layer.json")


@pytest.mark.parametrize("text", [
    b"", b"{", b"\xff\xfe{}", "{\"size\": 1,}", "[" * 100_000, "{\"size\": " + "9" * 5000 + "}",
    b"{}\xff",
], ids=["empty", "unclosed", "bad-utf8", "trailing-comma", "deep", "huge-int", "trailing-byte"])
def test_text_that_is_not_json_is_a_descriptor_error(text):
    with pytest.raises(DescriptorError, match=r"^d\.json: not valid JSON"):
        parse_descriptor(text, "d.json")


CT, CD, VO, RD = (ANNOTATION_CHUNK_TABLE_OFFSET, ANNOTATION_CHUNK_DIGEST,
                  ANNOTATION_VERITY_OFFSET, ANNOTATION_ROOT_DIGEST)


@pytest.mark.parametrize(("annotations", "named"), [
    ({}, CT),
    ({CD: SHA512}, CT),
    ({CT: ""}, CT), ({CT: "-1"}, CT), ({CT: "+1"}, CT), ({CT: "1.5"}, CT), ({CT: " 12"}, CT),
    ({CT: "12 "}, CT), ({CT: "0x10"}, CT), ({CT: "²"}, CT), ({CT: "١٢"}, CT),
    ({CT: "9" * 5000}, CT), ({CT: str(2**64)}, CT), ({CT: 12}, CT),
    ({CT: "10", VO: "abc"}, VO), ({CT: "10", VO: 20}, VO), ({CT: "10", VO: "-20"}, VO),
    ({CT: "10", CD: "sha256:" + "00" * 32}, CD),
    ({CT: "10", CD: "sha512:" + "00" * 63}, CD),
    ({CT: "10", CD: "sha512:" + "zz" * 64}, CD),
    ({CT: "10", CD: "sha512:" + "00" * 64 + "\n"}, CD),
    ({CT: "10", CD: 5}, CD),
    ({CT: "10", VO: "20", RD: "sha512"}, RD),
    ({CT: "10", VO: "20", RD: "md5:" + "00" * 16}, RD),
    ({CT: "10", VO: "20", RD: "sha512:"}, RD),
    ({CT: "10", VO: "20", RD: ["sha512:00"]}, RD),
    ({CT: "10", RD: "sha512:" + "00" * 64}, VO),
    ({CT: "10", VO: "10"}, "both at offset 10"),
], ids=lambda value: None)
def test_bad_annotations_are_rejected_by_name(annotations, named):
    with pytest.raises(DescriptorError, match=r"^layer\.json: ") as caught:
        parse_annotations(annotations, "layer.json")
    assert named in str(caught.value)


def test_a_blob_without_annotations_is_not_seekable():
    with pytest.raises(DescriptorError, match="not a seekable EROFS layer"):
        descriptor_from_dict(_descriptor(annotations=_MISSING)).seekable()


def test_digests_are_normalised_to_lower_case():
    annotations = parse_annotations({CT: "1", CD: SHA512.upper(), VO: "2",
                                     RD: "SHA256:" + "AB" * 32})
    assert annotations.chunk_digest == SHA512
    assert annotations.root_digest == "sha256:" + "ab" * 32


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
descriptor_keys = st.sampled_from(["mediaType", "digest", "size", "annotations", "urls"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(descriptor_keys, json_values)))
def test_any_json_value_raises_only_descriptor_errors(obj):
    try:
        descriptor = descriptor_from_dict(obj)
    except DescriptorError:
        return
    with contextlib.suppress(DescriptorError):
        descriptor.seekable()


annotation_values = st.one_of(st.text(max_size=12), st.integers(0, 2**70).map(str),
                              root_digests, hex_digests("sha512", 64))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([CT, CD, VO, RD, "other"]), annotation_values))
def test_any_annotations_raise_only_descriptor_errors(annotations):
    with contextlib.suppress(DescriptorError):
        parse_annotations(annotations)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_garbage_text_raises_only_descriptor_errors(text):
    try:
        parse_descriptor(text)
    except DescriptorError as exc:
        assert isinstance(exc, FormatError)


@pytest.mark.parametrize(("blob", "candidates"), [
    ("x.blob", ["x.descriptor.json", "x.blob.descriptor.json"]),
    ("/srv/a.b.blob", ["/srv/a.b.descriptor.json", "/srv/a.b.blob.descriptor.json"]),
    ("https://h/v2/x.blob", ["https://h/v2/x.descriptor.json",
                             "https://h/v2/x.blob.descriptor.json"]),
    ("layer.erofs.zst", ["layer.erofs.zst.descriptor.json"]),
    ("dir/.blob", ["dir/.blob.descriptor.json"]),
    ("x.blob/y", ["x.blob/y.descriptor.json"]),
])
def test_descriptor_beside_a_blob(blob, candidates):
    assert descriptor_path_candidates(blob) == candidates
    assert descriptor_path_for(blob) == candidates[0]


name_parts = st.sampled_from(["x", ".", "blob", ".blob", "b", "lob"])


@given(st.lists(name_parts, min_size=1, max_size=5).map("".join)
       .filter(lambda n: n not in (".", "..")))
def test_descriptor_path_follows_pathlib_suffixes(name):
    blob = PurePosixPath("dir") / name
    if blob.suffix == ".blob":
        expected = blob.with_suffix(".descriptor.json")
    else:
        expected = blob.with_name(blob.name + ".descriptor.json")
    assert descriptor_path_for(str(blob)) == str(expected)
