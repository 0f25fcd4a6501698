"""What the disk cache remembers of images is read only from a directory that no other user
can change: a tag's pointer is authenticated by nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from lazyfs.cache.disk_index import DiskCacheError
from lazyfs.cache.disk_store import entry_path
from lazyfs.cache.keys import image_data_key, tag_key
from lazyfs.fetch.registry import RegistryClient
from lazyfs.format.reference import parse_reference
from lazyfs.oci.image_memory import ImageMemory, PendingEntries
from lazyfs.oci.registry_source import ResolvedImage, resolve_image
from tests.oci.test_registry_source import (
    AMD64,
    HOST,
    MANIFEST,
    ScriptedRegistry,
    layer,
    seekable,
)


def plant(cache: Path, key: str, data: bytes) -> None:
    path = entry_path(cache, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_a_tag_planted_in_a_cache_others_can_write_is_never_used(tmp_path: Path) -> None:
    """Another user who can write the cache directory plants the pointer of a tag and the
    manifest and config it names: from a directory of ours alone, the resolution would take
    them without asking the registry (`--pull missing`); from one that others can write, it
    refuses the directory, naming its owner and mode, and reads nothing."""
    registry = ScriptedRegistry()
    registry.image([layer("real", seekable())])
    elsewhere = ScriptedRegistry()
    planted = elsewhere.image([layer("planted", seekable())])
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    for digest, (data, _) in elsewhere.objects.items():
        key = image_data_key(digest)
        assert key is not None
        plant(cache, key, data)
    plant(cache, tag_key(HOST, "app", "v1"),
          json.dumps({"digest": planted, "media_type": MANIFEST}).encode())

    async def resolve() -> ResolvedImage:
        transport = httpx.MockTransport(registry.handler)
        async with RegistryClient(HOST, insecure=True, transport=transport, retries=0) as client:
            memory = ImageMemory(client, HOST, PendingEntries(str(cache)), "missing")
            return await resolve_image(client, parse_reference(f"{HOST}/app:v1"), AMD64,
                                       memory=memory)

    # The premise: a remembered tag is taken on the cache's word.
    assert trio.run(resolve).manifest_digest == planted and registry.requests == []
    cache.chmod(0o777)
    with pytest.raises(DiskCacheError) as refused:
        trio.run(resolve)
    message = str(refused.value)
    assert f"{cache} (owner " in message and "mode 0777) can be written by other users" in message
    assert "\n" not in message and registry.requests == []
