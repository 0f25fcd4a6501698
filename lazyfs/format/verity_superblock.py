"""The dm-verity superblock: 512 bytes at the start of the hash device (veritysetup format 1)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from lazyfs.format.errors import BadMagicError, FieldError, TruncatedError

SUPERBLOCK_SIZE = 512
VERITY_SIGNATURE = b"verity\x00\x00"
VERITY_VERSION = 1
MAX_SALT_SIZE = 256
HASH_TYPE_CHROMEOS = 0
HASH_TYPE_NORMAL = 1
# Block sizes veritysetup accepts: powers of two from 512 bytes up to 512 KiB.
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 512 * 1024
SUPPORTED_HASHES = ("sha256", "sha512", "sha1")

_LAYOUT = struct.Struct("<8sII16s32sIIQH6s256s168s")
assert _LAYOUT.size == SUPERBLOCK_SIZE
_WHAT = "dm-verity superblock"


@dataclass(frozen=True)
class VeritySuperblock:
    """Parameters of a verity hash tree; `uuid` is the 16 raw bytes."""

    hash_type: int
    uuid: bytes
    hash_name: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    salt: bytes

    @property
    def digest_size(self) -> int:
        return hashlib.new(self.hash_name).digest_size

    @property
    def uuid_text(self) -> str:
        import uuid  # for display only: not on a mount's path

        return str(uuid.UUID(bytes=self.uuid))


def _check_block_size(field: str, offset: int, size: int) -> None:
    if not (MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE) or size & (size - 1):
        raise FieldError(_WHAT, field, offset, "a power of two from 512 to 524288", size)


def validate_parameters(superblock: VeritySuperblock) -> None:
    """Check values a tree can be built or verified with. Raises FieldError (offsets of §4)."""
    if superblock.hash_type not in (HASH_TYPE_CHROMEOS, HASH_TYPE_NORMAL):
        raise FieldError(_WHAT, "hash type", 12, "0 or 1", superblock.hash_type)
    if superblock.hash_name not in SUPPORTED_HASHES:
        raise FieldError(_WHAT, "hash algorithm", 32, " or ".join(SUPPORTED_HASHES),
                         repr(superblock.hash_name))
    _check_block_size("data block size", 64, superblock.data_block_size)
    _check_block_size("hash block size", 68, superblock.hash_block_size)
    if len(superblock.salt) > MAX_SALT_SIZE:
        raise FieldError(_WHAT, "salt size", 80, f"<= {MAX_SALT_SIZE}", len(superblock.salt))
    if len(superblock.uuid) != 16:
        raise FieldError(_WHAT, "uuid", 16, "16 bytes", len(superblock.uuid))
    if superblock.digest_size * 2 > superblock.hash_block_size:
        raise FieldError(_WHAT, "hash block size", 68,
                         f"room for at least two {superblock.hash_name} digests",
                         superblock.hash_block_size)


def parse_verity_superblock(buf: bytes, offset: int = 0) -> VeritySuperblock:
    """Parse and validate the 512-byte superblock at the start of `buf`.

    `offset` is where `buf` sits in the blob, used in messages. Raises TruncatedError,
    BadMagicError or FieldError.
    """
    if len(buf) < SUPERBLOCK_SIZE:
        raise TruncatedError(_WHAT, offset, SUPERBLOCK_SIZE, len(buf))
    (signature, version, hash_type, raw_uuid, raw_name, data_block_size, hash_block_size,
     data_blocks, salt_size, _pad1, raw_salt, _pad2) = _LAYOUT.unpack_from(buf, 0)
    if signature != VERITY_SIGNATURE:
        raise BadMagicError(_WHAT, "signature", offset, repr(VERITY_SIGNATURE), repr(signature))
    if version != VERITY_VERSION:
        raise FieldError(_WHAT, "version", offset + 8, str(VERITY_VERSION), version)
    if salt_size > MAX_SALT_SIZE:
        raise FieldError(_WHAT, "salt size", offset + 80, f"<= {MAX_SALT_SIZE}", salt_size)
    name = raw_name.rstrip(b"\x00")
    try:
        hash_name = name.decode("ascii").lower()
    except UnicodeDecodeError:
        raise FieldError(_WHAT, "hash algorithm", offset + 32, "an ASCII name",
                         repr(name)) from None
    superblock = VeritySuperblock(
        hash_type=hash_type, uuid=raw_uuid, hash_name=hash_name,
        data_block_size=data_block_size, hash_block_size=hash_block_size,
        data_blocks=data_blocks, salt=bytes(raw_salt[:salt_size]),
    )
    try:
        validate_parameters(superblock)
    except FieldError as exc:
        raise FieldError(_WHAT, exc.field, offset + exc.offset, exc.expected, exc.found) from None
    return superblock


def serialize_verity_superblock(superblock: VeritySuperblock) -> bytes:
    validate_parameters(superblock)
    return _LAYOUT.pack(
        VERITY_SIGNATURE, VERITY_VERSION, superblock.hash_type, superblock.uuid,
        superblock.hash_name.encode("ascii"), superblock.data_block_size,
        superblock.hash_block_size, superblock.data_blocks, len(superblock.salt), b"",
        superblock.salt, b"",
    )


def root_digest_annotation(hash_name: str, root: bytes) -> str:
    """The `root_digest` annotation value, e.g. `sha512:<hex>`."""
    return f"{hash_name}:{root.hex()}"


def parse_root_digest(value: str) -> tuple[str, bytes]:
    """Split a `root_digest` annotation into (algorithm, raw digest). Raises FieldError.

    Only the algorithms a tree can use are accepted: hashlib.new() of an arbitrary name can
    raise other errors, or yield a zero-length digest (shake_*).
    """
    name, sep, hex_digest = value.partition(":")
    name = name.lower()
    hex_digest = hex_digest.lower()
    if (not sep or name not in SUPPORTED_HASHES
            or len(hex_digest) != 2 * hashlib.new(name).digest_size
            or not all(char in "0123456789abcdef" for char in hex_digest)):
        raise FieldError("root digest annotation", "value", 0,
                         f"<{' or '.join(SUPPORTED_HASHES)}>:<hex digest of its size>",
                         repr(value))
    return name, bytes.fromhex(hex_digest)
