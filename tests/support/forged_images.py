"""Converted images in a local docker-registry with one forged frame, for the integrity tests
of image mounts and `lazyfs run`.

The image is busybox plus a layer holding random bytes (`data/noise.bin`, stored in raw zstd
blocks). The forgery is written into the registry's own storage, so the registry serves it
for the authentic digest, as a compromised mirror would; with `table`, a manifest whose layer
annotations authenticate the forged chunk table is pushed under another tag (the dm-verity
root stays authentic). `forged_image` restores the storage afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from lazyfs.format.descriptor import parse_annotations
from tests.support import registry_images
from tests.support.forge import Forgery, forge_annotations, forge_blob, image_offset_of
from tests.support.images import _Tar, base_layer, skopeo_push, write_oci_image
from tests.support.registry import Registry
from tests.support.registry_images import convert_push

CHUNK = 64 * 1024
NOISE = random.Random(19).randbytes(4 * CHUNK)
AFTER = b"".join(b"line %d of a compressible file\n" % i for i in range(4000))
TARGET_IN_FILE = 2 * CHUNK + 999
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json")


def noise_layer() -> bytes:
    tar = _Tar().dir("etc").file("etc/hostname", b"noisy\n")
    tar.dir("data").file("data/noise.bin", NOISE).file("data/after.txt", AFTER)
    return tar.bytes()


@dataclass(frozen=True)
class ForgedImage:
    """What to mount, the forgery in it, and the digest of the layer that carries it."""

    reference: str
    forgery: Forgery
    layer_digest: str


def publish_noise_image(work: Path, registry: Registry, verity: bool) -> str:
    """Push busybox + the noise layer and convert it (64 KiB chunks); return the reference."""
    repository = "test/noise" if verity else "test/noise-noverity"
    image = write_oci_image(work / repository.replace("/", "-"), "v1",
                            [base_layer(), noise_layer()])
    skopeo_push(image.layout, "v1", registry.host, f"{repository}:v1")
    converted = f"{registry.host}/{repository}:v1-erofs"
    convert_push(f"{registry.host}/{repository}:v1", converted, "--chunk-size", "64K",
                 *([] if verity else ["--no-verity"]))
    return converted


def _request(registry: Registry, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def blob_file(registry: Registry, digest: str) -> Path:
    """Where docker-registry's filesystem storage keeps the blob `digest`."""
    hex_digest = digest.partition(":")[2]
    return (registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
            / hex_digest[:2] / hex_digest / "data")


@contextlib.contextmanager
def forged_image(registry: Registry, reference: str, *, table: bool) -> Iterator[ForgedImage]:
    """Forge the noise layer of `reference` in the registry's storage; restore it on exit."""
    repository, _, tag = reference.partition("/")[2].rpartition(":")
    status, body = _request(registry, "GET", f"/v2/{repository}/manifests/{tag}",
                            headers={"Accept": MANIFEST_TYPES})
    assert status == 200, body
    manifest = json.loads(body)
    layer = manifest["layers"][1]
    path = blob_file(registry, layer["digest"])
    original = path.read_bytes()
    assert "sha256:" + hashlib.sha256(original).hexdigest() == layer["digest"]
    image = zstandard.ZstdDecompressor().stream_reader(original, read_across_frames=True).read()
    target = image_offset_of(image, NOISE) + TARGET_IN_FILE
    forgery = forge_blob(original, parse_annotations(layer["annotations"]), target, table=table)
    forged_reference = reference
    if table:
        layer["annotations"] = forge_annotations(layer["annotations"], forgery)
        status, body = _request(registry, "PUT", f"/v2/{repository}/manifests/{tag}-forged",
                                json.dumps(manifest).encode(),
                                {"Content-Type": manifest.get(
                                    "mediaType", "application/vnd.oci.image.manifest.v1+json")})
        assert status == 201, body
        forged_reference = f"{reference}-forged"
    path.write_bytes(forgery.blob)
    try:
        yield ForgedImage(forged_reference, forgery, layer["digest"])
    finally:
        path.write_bytes(original)


# Module-scoped fixtures a test module takes by importing them by name: a registry holding
# the noise image with and without dm-verity ({verity: reference}).
registry = registry_images.registry


@pytest.fixture(scope="module")
def images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, str]:
    work = tmp_path_factory.mktemp("noise-images")
    return {verity: publish_noise_image(work, registry, verity) for verity in (True, False)}
