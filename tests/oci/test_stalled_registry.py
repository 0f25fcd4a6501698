"""A registry that stalls while an image is resolved counts as one that is down: under the pull
policy "always" the manifest the disk cache remembers stands in, once the client's deadline
(`RegistryClient(deadline_s=…)`, the command's --read-timeout) has passed."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from lazyfs.cache.disk_store import entry_path
from lazyfs.cache.keys import image_data_key, tag_key
from lazyfs.fetch.registry import RegistryClient
from lazyfs.format.reference import parse_reference
from lazyfs.oci.image_memory import ImageMemory, PendingEntries
from lazyfs.oci.registry_source import resolve_image
from tests.oci.test_registry_source import (
    AMD64,
    HOST,
    MANIFEST,
    ScriptedRegistry,
    layer,
    seekable,
)


def test_a_stalled_registry_falls_back_to_the_remembered_manifest_at_the_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = ScriptedRegistry()
    remembered = registry.image([layer("one", seekable())])
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    for digest, (data, _) in registry.objects.items():
        key = image_data_key(digest)
        assert key is not None
        path = entry_path(cache, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    pointer = entry_path(cache, tag_key(HOST, "app", "v1"))
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_bytes(json.dumps({"digest": remembered, "media_type": MANIFEST}).encode())

    async def stalled(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    async def main() -> tuple[str, float]:
        transport = httpx.MockTransport(stalled)
        async with RegistryClient(HOST, insecure=True, transport=transport,
                                  deadline_s=2.0) as client:
            memory = ImageMemory(client, HOST, PendingEntries(str(cache)), "always")
            began = trio.current_time()
            image = await resolve_image(client, parse_reference(f"{HOST}/app:v1"), AMD64,
                                        memory=memory)
            return image.manifest_digest, trio.current_time() - began

    digest, took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert digest == remembered and took == pytest.approx(2.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "no answer to GET /v2/app/manifests/v1 (gave up at the read timeout, 2 s)" in (
        warnings[0]) and f"using app@{remembered}" in warnings[0]
