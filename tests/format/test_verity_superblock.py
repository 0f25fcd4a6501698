"""The dm-verity superblock: round trips, each field rejected, truncation and garbage."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.format.errors import BadMagicError, FieldError, FormatError, TruncatedError
from lazyfs.format.verity_superblock import (
    HASH_TYPE_CHROMEOS,
    HASH_TYPE_NORMAL,
    MAX_SALT_SIZE,
    SUPERBLOCK_SIZE,
    SUPPORTED_HASHES,
    VERITY_SIGNATURE,
    VeritySuperblock,
    parse_root_digest,
    parse_verity_superblock,
    root_digest_annotation,
    serialize_verity_superblock,
)
from tests.format import FIXED_UUID, flip, make_superblock

block_sizes = st.sampled_from([1 << bits for bits in range(9, 17)])  # 512 .. 65536

superblocks = st.builds(
    VeritySuperblock,
    hash_type=st.sampled_from([HASH_TYPE_CHROMEOS, HASH_TYPE_NORMAL]),
    uuid=st.binary(min_size=16, max_size=16),
    hash_name=st.sampled_from(SUPPORTED_HASHES),
    data_block_size=block_sizes,
    hash_block_size=block_sizes,
    data_blocks=st.one_of(st.integers(0, 1000), st.integers(0, 2**64 - 1)),
    salt=st.binary(max_size=MAX_SALT_SIZE),
)


@settings(max_examples=150, deadline=None)
@given(superblocks, st.binary(max_size=16), st.integers(0, 2**40))
def test_superblock_round_trips(superblock, trailing, offset):
    raw = serialize_verity_superblock(superblock)
    assert len(raw) == SUPERBLOCK_SIZE
    assert parse_verity_superblock(raw + trailing, offset) == superblock


def test_layout_matches_spec_section_4():
    superblock = make_superblock(10 * 4096, hash_name="sha256", salt=b"\x01\x02\x03")
    raw = serialize_verity_superblock(superblock)
    assert raw[0:8] == VERITY_SIGNATURE
    assert struct.unpack_from("<II", raw, 8) == (1, HASH_TYPE_NORMAL)
    assert raw[16:32] == FIXED_UUID.bytes
    assert raw[32:64] == b"sha256".ljust(32, b"\x00")
    assert struct.unpack_from("<IIQH", raw, 64) == (4096, 4096, 10, 3)
    assert raw[88:91] == b"\x01\x02\x03"
    assert not any(raw[82:88]) and not any(raw[91:])
    assert superblock.uuid_text == str(FIXED_UUID)
    assert superblock.digest_size == 32


@settings(max_examples=50, deadline=None)
@given(superblocks, st.data())
def test_any_truncation_raises_truncated(superblock, data):
    raw = serialize_verity_superblock(superblock)
    cut = data.draw(st.integers(0, SUPERBLOCK_SIZE - 1))
    with pytest.raises(TruncatedError, match=f"superblock at offset 99 is truncated: needs 512 "
                                             f"bytes, only {cut} present"):
        parse_verity_superblock(raw[:cut], 99)


VALID = serialize_verity_superblock(make_superblock(704512, salt=b"salty"))
AT = 4096 + 8


def _patched(fmt: str, at: int, *values: object) -> bytes:
    raw = bytearray(VALID)
    struct.pack_into(fmt, raw, at, *values)
    return bytes(raw)


@pytest.mark.parametrize(("raw", "error", "field", "offset"), [
    (_patched("8s", 0, b"verity\x00\x01"), BadMagicError, "signature", 0),
    (_patched("8s", 0, bytes(8)), BadMagicError, "signature", 0),
    (_patched("<I", 8, 2), FieldError, "version", 8),
    (_patched("<I", 8, 0), FieldError, "version", 8),
    (_patched("<I", 12, 2), FieldError, "hash type", 12),
    (_patched("32s", 32, b"md5"), FieldError, "hash algorithm", 32),
    (_patched("32s", 32, b"sha3-256"), FieldError, "hash algorithm", 32),
    (_patched("32s", 32, b""), FieldError, "hash algorithm", 32),
    (_patched("32s", 32, b"sha\xff512"), FieldError, "hash algorithm", 32),
    (_patched("32s", 32, b"sha512\x00junk"), FieldError, "hash algorithm", 32),
    (_patched("<I", 64, 0), FieldError, "data block size", 64),
    (_patched("<I", 64, 256), FieldError, "data block size", 64),
    (_patched("<I", 64, 4095), FieldError, "data block size", 64),
    (_patched("<I", 64, 1 << 20), FieldError, "data block size", 64),
    (_patched("<I", 68, 6144), FieldError, "hash block size", 68),
    (_patched("<I", 68, 0xFFFFFFFF), FieldError, "hash block size", 68),
    (_patched("<H", 80, 257), FieldError, "salt size", 80),
    (_patched("<H", 80, 0xFFFF), FieldError, "salt size", 80),
], ids=["signature", "no-signature", "version-2", "version-0", "hash-type-2", "md5", "sha3",
        "no-hash-name", "non-ascii-name", "name-with-junk", "data-bs-0", "data-bs-256",
        "data-bs-4095", "data-bs-1m", "hash-bs-6144", "hash-bs-max", "salt-257", "salt-max"])
def test_each_field_is_rejected_naming_it_and_its_offset(raw, error, field, offset):
    with pytest.raises(error) as caught:
        parse_verity_superblock(raw, AT)
    assert type(caught.value) is error
    assert caught.value.field == field
    assert caught.value.offset == AT + offset
    assert f"dm-verity superblock: field {field} at offset {AT + offset}:" in str(caught.value)


def test_an_uppercase_hash_name_is_read_as_the_algorithm():
    assert parse_verity_superblock(_patched("32s", 32, b"SHA512")).hash_name == "sha512"


@pytest.mark.parametrize("change", [
    {"hash_type": 2}, {"hash_name": "md5"}, {"data_block_size": 1000},
    {"hash_block_size": 256}, {"salt": bytes(257)}, {"uuid": bytes(15)},
], ids=lambda change: next(iter(change)))
def test_serializing_bad_parameters_raises_field_error(change):
    with pytest.raises(FieldError):
        serialize_verity_superblock(replace(make_superblock(4096), **change))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(min_size=500, max_size=600),
                 st.binary(min_size=504, max_size=600).map(VERITY_SIGNATURE.__add__)))
def test_garbage_raises_only_format_errors(garbage):
    try:
        superblock = parse_verity_superblock(garbage)
    except FormatError:
        return
    assert parse_verity_superblock(serialize_verity_superblock(superblock)) == superblock


def test_every_flipped_bit_raises_a_format_error_or_changes_the_superblock():
    original = parse_verity_superblock(VALID)
    for position in range(SUPERBLOCK_SIZE):
        for bit in range(8):
            try:
                parsed = parse_verity_superblock(flip(VALID, position, 1 << bit))
            except FormatError:
                continue
            # Padding and the unused tail of the salt field are ignored, as by veritysetup;
            # so is the case of the hash name.
            used = position < 82 or 88 <= position < 88 + len(original.salt)
            case_flip = 32 <= position < 64 and bit == 5 and chr(VALID[position]).isalpha()
            assert (parsed != original) == (used and not case_flip), (position, bit)


# --- the root digest annotation ----------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.sampled_from(SUPPORTED_HASHES), st.data())
def test_root_digest_round_trips(name, data):
    size = {"sha1": 20, "sha256": 32, "sha512": 64}[name]
    root = data.draw(st.binary(min_size=size, max_size=size))
    assert parse_root_digest(root_digest_annotation(name, root)) == (name, root)
    assert parse_root_digest(root_digest_annotation(name, root).upper()) == (name, root)


@pytest.mark.parametrize("value", [
    "", "sha512", "sha512:", ":" + "00" * 64, "sha512:" + "00" * 63, "sha512:" + "00" * 65,
    "sha512:" + "0" * 127, "sha512:" + "zz" * 64, "sha256: " + "00" * 31 + "0",
    "md5:" + "00" * 16, "shake_128:", "sha256\x00:" + "00" * 32, "sha256:" + "00" * 31 + " 00",
])
def test_bad_root_digests_raise_field_error(value):
    with pytest.raises(FieldError, match="root digest annotation"):
        parse_root_digest(value)
