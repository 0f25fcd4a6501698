"""Prefetch lists and their annotation: round trips, and every malformed input refused with
a message that says where and what."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.format.prefetch_list import (
    ANNOTATION_PREFETCH,
    MAX_ANNOTATION_BYTES,
    PREFETCH_MEDIA_TYPE,
    LayerPrefetch,
    PrefetchList,
    PrefetchListError,
    format_runs,
    parse_prefetch_annotation,
    parse_prefetch_list,
    parse_runs,
    serialize_prefetch_annotation,
    serialize_prefetch_list,
)

DIGEST = "sha512:" + "ab" * 64


@st.composite
def layer_lists(draw: st.DrawFn) -> LayerPrefetch:
    count = draw(st.integers(min_value=1, max_value=300))
    chunks = draw(st.permutations(range(count)))
    length = draw(st.integers(min_value=0, max_value=count))
    return LayerPrefetch(DIGEST[:-2] + draw(st.text("0123456789abcdef", min_size=2, max_size=2)),
                         count, tuple(chunks[:length]), draw(st.sampled_from(["", "layer"])))


@given(layer_lists())
def test_runs_round_trip_in_order(layer: LayerPrefetch) -> None:
    assert parse_runs(format_runs(layer.chunks), layer.chunk_count, "x") == layer.chunks


@given(st.lists(layer_lists(), max_size=4, unique_by=lambda layer: layer.chunk_digest))
def test_list_round_trips(layers: list[LayerPrefetch]) -> None:
    prefetch = PrefetchList(tuple(layers))
    assert parse_prefetch_list(serialize_prefetch_list(prefetch), "f") == prefetch


@given(layer_lists())
def test_annotation_round_trips(layer: LayerPrefetch) -> None:
    assert parse_prefetch_annotation(serialize_prefetch_annotation(layer), "l") == layer


@given(layer_lists(), st.data())
def test_block_records_round_trip_in_files_only(layer: LayerPrefetch, data: st.DataObject) -> None:
    image_size = data.draw(st.integers(min_value=1, max_value=300 * 4096))
    count = -(-image_size // 4096)
    blocks = tuple(data.draw(st.permutations(range(count)))[:data.draw(st.integers(0, count))])
    recorded = LayerPrefetch(layer.chunk_digest, layer.chunk_count, layer.chunks, layer.name,
                             blocks, 4096, image_size)
    assert recorded.block_count == count
    prefetch = PrefetchList((recorded,))
    assert parse_prefetch_list(serialize_prefetch_list(prefetch), "f") == prefetch
    assert parse_prefetch_annotation(serialize_prefetch_annotation(recorded), "l") == layer


@pytest.mark.parametrize(("fields", "message"), [
    ({"blocks": "0-2", "block_size": 4096}, "image_size: expected a positive integer"),
    ({"blocks": "0-2", "block_size": 1000, "image_size": 9000}, "block_size: expected a power"),
    ({"blocks": "0-3", "block_size": 4096, "image_size": 9000}, "blocks: run '0-3' is not within"),
    ({"blocks": "1,1", "block_size": 4096, "image_size": 9000}, "blocks: block 1 listed twice"),
    ({"blocks": [1], "block_size": 4096, "image_size": 9000}, "blocks: expected a string"),
    ({"blocks": "0-300000", "block_size": 4096, "image_size": 1 << 31},
     "blocks: more than 262144 listed"),
])
def test_bad_block_records(fields: dict[str, object], message: str) -> None:
    entry = {"chunk_digest": DIGEST, "chunk_count": 2, "chunks": "0", **fields}
    data = json.dumps({"mediaType": PREFETCH_MEDIA_TYPE, "layers": [entry]}).encode()
    with pytest.raises(PrefetchListError, match=message):
        parse_prefetch_list(data, "f")


def test_runs_fold_ascending_sequences_only() -> None:
    assert format_runs([0, 1, 2, 7, 5, 6]) == "0-2,7,5-6"
    assert format_runs([]) == ""


def test_for_digest_finds_the_layer_recorded() -> None:
    layer = LayerPrefetch(DIGEST, 4, (1, 2))
    prefetch = PrefetchList((layer,))
    assert prefetch.for_digest(DIGEST) == layer
    assert prefetch.for_digest("sha512:" + "cd" * 64) is None
    assert prefetch.for_digest(None) is None


@pytest.mark.parametrize(("text", "message"), [
    ("1,x", "'x' is not N or N-M"),
    ("3-1", "not within 0-9 in order"),
    ("8-10", "not within 0-9 in order"),
    ("1,2,1", "chunk 1 listed twice"),
    ("-1", "not N or N-M"),
])
def test_malformed_runs_are_refused(text: str, message: str) -> None:
    with pytest.raises(PrefetchListError, match=message):
        parse_runs(text, 10, "where")


def _list_json(**layer: object) -> bytes:
    entry = {"chunk_digest": DIGEST, "chunk_count": 4, "chunks": "0-1", **layer}
    return json.dumps({"mediaType": PREFETCH_MEDIA_TYPE, "layers": [entry]}).encode()


@pytest.mark.parametrize(("data", "message"), [
    (b"{", "f: not JSON"),
    (b'{"layers": []}', "not a prefetch list"),
    (json.dumps({"mediaType": PREFETCH_MEDIA_TYPE, "layers": {}}).encode(), "expected a list"),
    (_list_json(chunk_digest="sha256:00"), "chunk_digest: expected 'sha512:HEX'"),
    (_list_json(chunk_count=0), "chunk_count: expected a positive integer"),
    (_list_json(chunk_count=True), "chunk_count: expected a positive integer"),
    (_list_json(chunks=[0, 1]), "chunks: expected a string of runs"),
    (_list_json(chunks="0-4"), "layer 1: chunks: run '0-4' is not within 0-3"),
    (_list_json(name=3), "name: expected a string"),
    (json.dumps({"mediaType": PREFETCH_MEDIA_TYPE, "layers": [
        json.loads(_list_json())["layers"][0]] * 2}).encode(), "a layer is listed twice"),
])
def test_malformed_lists_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(PrefetchListError, match=message):
        parse_prefetch_list(data, "f")


def test_oversized_list_and_annotation_are_refused() -> None:
    with pytest.raises(PrefetchListError, match="at most"):
        parse_prefetch_list(b" " * (5 * 1024 * 1024), "f")
    with pytest.raises(PrefetchListError, match=ANNOTATION_PREFETCH):
        parse_prefetch_annotation(" " * (MAX_ANNOTATION_BYTES + 1), "layer 1")
    # Every other chunk of a huge layer: no runs to fold, too long for an annotation.
    huge = LayerPrefetch(DIGEST, 200_000, tuple(range(0, 200_000, 2)))
    with pytest.raises(PrefetchListError, match="an annotation takes at most"):
        serialize_prefetch_annotation(huge)


def test_annotation_errors_name_the_layer() -> None:
    with pytest.raises(PrefetchListError, match=f"layer 2: {ANNOTATION_PREFETCH}: not JSON"):
        parse_prefetch_annotation("{", "layer 2")


def test_a_layout_fingerprint_round_trips_with_the_blocks_in_files_only() -> None:
    recorded = LayerPrefetch(DIGEST, 4, (0, 1), "layer", (3, 0), 4096, 5 * 4096, "ab" * 16)
    data = serialize_prefetch_list(PrefetchList((recorded,)))
    assert json.loads(data)["layers"][0]["layout"] == "ab" * 16
    assert parse_prefetch_list(data, "f") == PrefetchList((recorded,))
    assert "layout" not in serialize_prefetch_annotation(recorded)


def test_a_list_without_a_layout_fingerprint_has_none() -> None:
    data = _list_json(blocks="1,0", block_size=4096, image_size=9000)
    layer = parse_prefetch_list(data, "f").layers[0]
    assert layer.blocks == (1, 0) and layer.layout == ""
    assert b"layout" not in serialize_prefetch_list(PrefetchList((layer,)))


@pytest.mark.parametrize("layout", [3, "x" * 129, "a\nb", "é"])
def test_a_malformed_layout_fingerprint_is_refused(layout: object) -> None:
    data = _list_json(blocks="1", block_size=4096, image_size=9000, layout=layout)
    with pytest.raises(PrefetchListError, match="layer 1: layout: expected a string"):
        parse_prefetch_list(data, "f")
