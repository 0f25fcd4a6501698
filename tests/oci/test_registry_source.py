"""Resolving image references to pinned manifests of seekable layers, against a scripted
registry (httpx.MockTransport): platform choice, annotations as the root of trust, refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lazyfs.fetch.registry import RegistryClient
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.format.descriptor import LABEL_UNCOMPRESSED, DescriptorError, parse_annotations
from lazyfs.format.platform import Platform
from lazyfs.format.reference import parse_reference
from lazyfs.layer.errors import ImageResolveError, UntrustedLayerError
from lazyfs.oci.registry_source import (
    ResolvedImage,
    UnconvertedLayerError,
    host_platform,
    is_image_reference,
    layer_sources,
    resolve_image,
)

HOST = "registry.test:5000"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
EROFS = "application/vnd.erofs.layer.v1+zstd"
AMD64 = Platform("linux", "amd64")


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def seekable(offset: int = 100, *, trusted: bool = True) -> dict[str, str]:
    notes = {"dev.containerd.erofs.zstd.chunk_table_offset": str(offset)}
    if trusted:
        notes["dev.containerd.erofs.zstd.chunk_digest"] = "sha512:" + "ab" * 64
        notes["dev.containerd.erofs.dmverity.offset"] = str(offset + 200)
        notes["dev.containerd.erofs.dmverity.root_digest"] = "sha512:" + "cd" * 64
    return notes


def layer(seed: str, annotations: dict[str, str] | None, media_type: str = EROFS) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": media_type, "digest": digest(seed.encode()), "size": 1000}
    if annotations is not None:
        out["annotations"] = annotations
    return out


class ScriptedRegistry:
    """Manifests and blobs by digest, tags pointing at them; counts requests."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.tags: dict[str, str] = {}
        self.requests: list[str] = []

    def add(self, data: bytes, media_type: str, tag: str | None = None) -> str:
        found = digest(data)
        self.objects[found] = (data, media_type)
        if tag is not None:
            self.tags[tag] = found
        return found

    def image(self, layers: list[dict[str, Any]], tag: str | None = "v1",
              config: dict[str, Any] | None = None) -> str:
        config_bytes = json.dumps(config if config is not None else {
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin", "A=b=c"], "WorkingDir": "/srv", "Cmd": ["sh"]},
        }).encode()
        config_digest = self.add(config_bytes, "application/octet-stream")
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": len(config_bytes)},
            "layers": layers,
        }).encode()
        return self.add(manifest, MANIFEST, tag)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        _, _, rest = request.url.path.partition("/v2/app/")
        kind, _, reference = rest.partition("/")
        found = self.objects.get(self.tags.get(reference, reference))
        if kind not in ("manifests", "blobs") or found is None:
            return httpx.Response(404, json={"errors": [{"code": "NOT_FOUND", "message": "x"}]})
        data, media_type = found
        return httpx.Response(200, content=data, headers={
            "Content-Type": media_type, "Docker-Content-Digest": digest(data)})


def resolve(registry: ScriptedRegistry, text: str, platform: Platform = AMD64,
            **options: Any) -> ResolvedImage:
    async def main() -> ResolvedImage:
        transport = httpx.MockTransport(registry.handler)
        async with RegistryClient(HOST, insecure=True, transport=transport, retries=0) as client:
            return await resolve_image(client, parse_reference(text), platform, **options)

    return trio.run(main)


def test_a_manifest_with_seekable_layers_is_pinned_by_digest() -> None:
    registry = ScriptedRegistry()
    layers = [layer("base", seekable()), layer("top", seekable(7)), layer("base", seekable())]
    manifest_digest = registry.image(layers)
    image = resolve(registry, f"{HOST}/app:v1")
    assert image.manifest_digest == manifest_digest and image.index_digest is None
    assert image.pinned == f"{HOST}/app:v1@{manifest_digest}"
    assert image.platform == "linux/amd64"
    assert [entry.digest for entry in image.layers] == [entry["digest"] for entry in layers]
    assert [entry.name for entry in image.layers] == [
        entry["digest"][7:19] for entry in layers
    ]
    assert [entry.digest for entry in image.distinct_layers] == [
        layers[0]["digest"], layers[1]["digest"]
    ]
    assert image.layers[1].annotations.chunk_table_offset == 7
    assert image.config.env == ("PATH=/bin", "A=b=c") and image.config.working_dir == "/srv"
    assert image.config.cmd == ("sh",)
    # By digest, the same manifest again.
    assert resolve(registry, f"{HOST}/app@{manifest_digest}").layers == image.layers


def test_a_layer_that_carries_its_uncompressed_digest_resolves_as_any_other() -> None:
    """`lazyfs convert` no longer writes `containerd.io/uncompressed` into manifests
    (containerd keeps it as a content-store label), but images that carry it (older
    conversions, manifests made from a `lazyfs convert -o` descriptor file) still mount."""
    registry = ScriptedRegistry()
    carried = seekable() | {LABEL_UNCOMPRESSED: "sha256:" + "ef" * 32}
    registry.image([layer("base", carried)])
    image = resolve(registry, f"{HOST}/app:v1")
    assert image.layers[0].annotations == parse_annotations(seekable())


def test_an_index_gives_the_manifest_of_the_platform() -> None:
    registry = ScriptedRegistry()
    amd = registry.image([layer("amd", seekable())], tag=None)
    arm = registry.image([layer("arm", seekable())], tag=None)
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": MANIFEST, "digest": amd, "size": len(registry.objects[amd][0]),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": MANIFEST, "digest": arm, "size": len(registry.objects[arm][0]),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    ]}).encode()
    index_digest = registry.add(index, INDEX, "v1")
    image = resolve(registry, f"{HOST}/app:v1", Platform("linux", "aarch64"))
    assert (image.manifest_digest, image.index_digest) == (arm, index_digest)
    assert image.layers[0].digest == digest(b"arm")
    with pytest.raises(ImageResolveError, match=r"no manifest for platform linux/s390x "
                       r"\(available: linux/amd64, linux/arm64/v8\)"):
        resolve(registry, f"{HOST}/app:v1", Platform("linux", "s390x"))


def test_an_unconverted_layer_is_named_with_the_way_to_convert_it() -> None:
    registry = ScriptedRegistry()
    tar = layer("tar", None, "application/vnd.oci.image.layer.v1.tar+gzip")
    registry.image([layer("base", seekable()), tar])
    with pytest.raises(UnconvertedLayerError) as info:
        resolve(registry, f"{HOST}/app:v1")
    message = str(info.value)
    assert f"layer 2 of 2 ({tar['digest']})" in message
    assert "tar+gzip" in message and f"lazyfs convert {HOST}/app:v1 --push" in message


def test_layers_without_digests_need_insecure_and_bad_annotations_are_named() -> None:
    registry = ScriptedRegistry()
    registry.image([layer("plain", seekable(trusted=False))])
    with pytest.raises(UntrustedLayerError, match="--insecure"):
        resolve(registry, f"{HOST}/app:v1")
    assert not resolve(registry, f"{HOST}/app:v1", insecure=True).layers[0].annotations.is_trusted

    registry.image([layer("bad", {**seekable(), "dev.containerd.erofs.zstd.chunk_table_offset":
                                  "12x"})])
    with pytest.raises(DescriptorError, match=r"layer 1 of 1 .*chunk_table_offset"):
        resolve(registry, f"{HOST}/app:v1")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"config": {"Env": "PATH=/bin"}}', "config.Env must be a list of strings"),
        (b'{"config": {"WorkingDir": 5}}', "config.WorkingDir must be a string"),
    ],
)
def test_a_malformed_config_is_refused(config: bytes, message: str) -> None:
    registry = ScriptedRegistry()
    config_digest = registry.add(config, "application/octet-stream")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
        "size": len(config)}, "layers": [layer("x", seekable())]}).encode()
    registry.add(manifest, MANIFEST, "v1")
    with pytest.raises(ImageResolveError, match=message):
        resolve(registry, f"{HOST}/app:v1")


def test_an_image_without_layers_is_refused() -> None:
    registry = ScriptedRegistry()
    registry.image([])
    with pytest.raises(ImageResolveError, match="has no layers"):
        resolve(registry, f"{HOST}/app:v1")


def test_layer_names_grow_where_short_ones_clash() -> None:
    registry = ScriptedRegistry()
    first = {"mediaType": EROFS, "digest": "sha256:" + "a" * 63 + "1", "size": 1,
             "annotations": seekable()}
    second = {**first, "digest": "sha256:" + "a" * 63 + "2"}
    registry.image([first, second])
    names = [entry.name for entry in resolve(registry, f"{HOST}/app:v1").layers]
    assert names == ["a" * 63 + "1", "a" * 63 + "2"]


def test_layer_sources_read_from_the_registry_with_its_auth() -> None:
    registry = ScriptedRegistry()
    registry.image([layer("base", seekable()), layer("top", seekable(9))])
    image = resolve(registry, f"{HOST}/app:v1")

    async def main() -> list[Any]:
        async with RegistryClient(HOST, insecure=True) as client:
            sources = await layer_sources(
                image.reference, image.distinct_layers, client, RegistryOptions(insecure=True)
            )
            return [(s.blob, s.reader_options.auth is client.auth, s.chunk_table_offset,
                     s.name, s.insecure, s.reader_options.expected_size) for s in sources]

    # The manifest's size goes to the reader, which refuses a blob of another size at open.
    assert trio.run(main) == [
        (f"http://{HOST}/v2/app/blobs/{entry.digest}", True,
         entry.annotations.chunk_table_offset, entry.name, False, entry.size)
        for entry in image.layers
    ]


def test_what_counts_as_an_image_reference(tmp_path: Path) -> None:
    existing = tmp_path / "layer.blob"
    existing.write_bytes(b"")
    assert is_image_reference("alpine")
    assert is_image_reference("127.0.0.1:5000/team/app:v1")
    assert is_image_reference("app@sha256:" + "0" * 64)
    assert not is_image_reference(str(existing))  # an existing path wins
    assert not is_image_reference("http://127.0.0.1/layer.blob")
    assert not is_image_reference("file:///tmp/layer.blob")
    assert not is_image_reference("./relative/layer.blob")
    assert not is_image_reference("Not A Reference")


def test_the_host_platform_uses_oci_names() -> None:
    platform = host_platform()
    assert platform.os == "linux"
    assert platform.architecture not in ("x86_64", "aarch64")


def stored(entries: Any) -> list[str]:
    """The keys `entries` (PendingEntries) would write, not drop."""
    return [key for key, data in entries.writes if data is not None]


def test_a_resolution_reads_the_cache_files_and_leaves_its_writes_to_the_daemon(
        tmp_path: Path) -> None:
    """A resolution reads the disk cache's files without opening its index, and lists what it
    would write (`PendingEntries.writes`) for the daemon to write once the mount is up: the
    first lists the tag's pointer, the manifest and the config; written, they answer the next
    resolution without a request or a write (the keys used listed); a tag not remembered is
    asked of the registry under "missing", an error under "never"."""
    from lazyfs.cache.disk import DiskCache, DiskCacheOptions
    from lazyfs.oci.image_memory import ImageMemory, PendingEntries

    registry = ScriptedRegistry()
    pinned = registry.image([layer("a", seekable())])
    registry.image([layer("b", seekable())], tag="v2")

    async def main(memory_of: Any, tag: str = "v1") -> ResolvedImage:
        transport = httpx.MockTransport(registry.handler)
        async with RegistryClient(HOST, insecure=True, transport=transport, retries=0) as client:
            return await resolve_image(client, parse_reference(f"{HOST}/app:{tag}"), AMD64,
                                       memory=memory_of(client))

    first = PendingEntries(str(tmp_path))
    fetched = trio.run(main, lambda client: ImageMemory(client, HOST, first))
    assert fetched.manifest_digest == pinned and len(registry.requests) == 2
    assert len(stored(first)) == 3 and not (tmp_path / "data").exists()  # nothing written yet
    cache = DiskCache.open(DiskCacheOptions(str(tmp_path)))
    try:
        for key, data in first.writes:
            cache.store.delete(key) if data is None else cache.store.put(key, data)
    finally:
        cache.store.close()

    used: list[str] = []
    again = PendingEntries(str(tmp_path))
    remembered = trio.run(main, lambda client: ImageMemory(client, HOST, again, "missing", used))
    assert remembered == fetched and len(registry.requests) == 2
    assert len(used) == 3 and again.writes == []  # the tag's pointer, the manifest, the config
    moved = PendingEntries(str(tmp_path))
    trio.run(main, lambda client: ImageMemory(client, HOST, moved, "missing"), "v2")
    # Its manifest is asked for; its config is the one remembered.
    assert len(registry.requests) == 3 and len(stored(moved)) == 2
    with pytest.raises(ImageResolveError, match="--pull never"):
        trio.run(main, lambda client: ImageMemory(client, HOST, PendingEntries(str(tmp_path)),
                                                  "never"), "v2")
    assert len(registry.requests) == 3
