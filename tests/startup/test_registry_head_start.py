"""The head start of an image mount against Debian's docker-registry on 127.0.0.1: what it
fetches before the command has imported its libraries, and that resolving the image takes
the manifest and config from it only when they match their digests."""

from __future__ import annotations

import hashlib
import json

import pytest
import trio

from lazyfs.fetch.registry import RegistryClient
from lazyfs.fetch.registry_options import RegistryOptions
from lazyfs.fetch.registry_session import RegistryUnavailableError
from lazyfs.format.descriptor import ANNOTATION_CHUNK_TABLE_OFFSET
from lazyfs.format.reference import parse_reference
from lazyfs.mount.images import resolve_images
from lazyfs.oci.names import host_platform
from lazyfs.startup.early_requests import FIRST_FRAME_BYTES
from lazyfs.startup.registry_head_start import PrimedClient, PrimedRegistry, RegistryHeadStart
from tests.support import registry_images
from tests.support.registry import Registry, free_port
from tests.support.registry_images import PublishedImage

pytestmark = [pytest.mark.network, pytest.mark.slow]

WINDOW = 16 * 1024

registry = registry_images.registry
busybox = registry_images.busybox


def head_start(reference: str, **options: bool) -> PrimedRegistry:
    started = RegistryHeadStart(parse_reference(reference), insecure=True,
                                platform=host_platform(), tree_window_bytes=WINDOW,
                                **options).start()
    return started.finish(10.0)


def blob(registry: Registry, digest: str) -> bytes:
    hex_digest = digest.partition(":")[2]
    return (registry.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
            / hex_digest[:2] / hex_digest / "data").read_bytes()


def test_it_fetches_manifest_config_and_each_layers_first_answers(
    registry: Registry, busybox: PublishedImage
) -> None:
    primed = head_start(busybox.converted)
    tag = busybox.converted.rpartition(":")[2]
    body, _, sent = primed.manifests[tag]
    assert sent == "sha256:" + hashlib.sha256(body).hexdigest()
    manifest = json.loads(body)
    assert list(primed.blobs) == [manifest["config"]["digest"]]
    layers = [layer for layer in manifest["layers"]
              if ANNOTATION_CHUNK_TABLE_OFFSET in layer.get("annotations", {})]
    assert layers and sorted(primed.layers) == sorted(layer["digest"] for layer in layers)
    for layer in layers:
        data = blob(registry, layer["digest"])
        answers = primed.layers[layer["digest"]]
        offset = int(layer["annotations"][ANNOTATION_CHUNK_TABLE_OFFSET])
        assert 0 in answers.ranges and len(answers.ranges[0][0]) == min(FIRST_FRAME_BYTES,
                                                                        len(data))
        assert any(start <= offset < start + len(body) for start, (body, _) in
                   answers.ranges.items())
        for start, (body, size) in answers.ranges.items():
            assert size == len(data) and body == data[start:start + len(body)]


def test_without_layers_only_the_manifest_and_config(busybox: PublishedImage) -> None:
    primed = head_start(busybox.converted, layers=False)
    assert len(primed.manifests) == 1 and len(primed.blobs) == 1 and primed.layers == {}


def test_answers_serve_without_the_registry_and_only_if_they_match_their_digests(
    busybox: PublishedImage
) -> None:
    primed = head_start(busybox.converted)
    tag = busybox.converted.rpartition(":")[2]
    repository = parse_reference(busybox.converted).repository
    (config,) = primed.blobs
    tampered = dict(primed.manifests)

    async def main() -> None:
        # A registry that is not there: every answer must come from the head start.
        async with RegistryClient(f"127.0.0.1:{free_port()}", insecure=True, retries=0,
                                  timeout=2) as client:
            served = PrimedClient(client, primed)
            body, media_type, digest = await served.get_manifest(repository, tag)
            assert "manifest" in media_type and digest == tampered[tag][2]
            assert await served.get_blob(repository, config) == blob_bytes
            # Each answer serves once: the next ask goes to the (absent) registry.
            with pytest.raises(RegistryUnavailableError):
                await served.get_manifest(repository, tag)
            # One that does not match its digest is not used.
            forged = PrimedRegistry(repository, {tag: (body + b" ", *tampered[tag][1:])})
            with pytest.raises(RegistryUnavailableError):
                await PrimedClient(client, forged).get_manifest(repository, tag)

    blob_bytes = primed.blobs[config]
    trio.run(main)


def test_resolving_with_the_answers_gives_each_layer_its_own(
    busybox: PublishedImage
) -> None:
    primed = head_start(busybox.converted)
    found = trio.run(lambda: resolve_images([busybox.converted],
                                            RegistryOptions(insecure=True), host_platform(),
                                            insecure=False, primed=primed))
    assert found.sources and all(source.primed is primed.layers[digest] for source, digest in
                                 zip(found.sources, primed.layers, strict=True))


def test_no_head_start_for_docker_hub_or_behind_mirrors() -> None:
    assert not RegistryHeadStart.applies_to(parse_reference("busybox:1"), mirrors=False)
    assert not RegistryHeadStart.applies_to(parse_reference("127.0.0.1:5000/a:b"),
                                            mirrors=True)
    assert RegistryHeadStart.applies_to(parse_reference("127.0.0.1:5000/a:b"), mirrors=False)


def test_the_first_frames_do_not_wait_for_the_config(
    registry: Registry, busybox: PublishedImage
) -> None:
    """Config and first frames go on connections of their own, connected at once: a proxy in
    front of the registry holds the config's answer until the first frame is asked for."""
    import http.server
    import threading
    import urllib.request

    frame_asked = threading.Event()
    config_held: list[bool] = []
    manifest = json.loads(head_start(busybox.converted, layers=False).manifests[
        busybox.converted.rpartition(":")[2]][0])
    config_path = f"/blobs/{manifest['config']['digest']}"

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.endswith(config_path):
                config_held.append(frame_asked.wait(5))
            elif self.headers.get("Range", "").startswith("bytes=0-"):
                frame_asked.set()
            headers = {name: value for name, value in self.headers.items()
                       if name.lower() in ("accept", "range")}
            request = urllib.request.Request(f"http://{registry.host}{self.path}",
                                             headers=headers)
            with urllib.request.urlopen(request, timeout=10) as answer:
                body = answer.read()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    if name.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proxied = busybox.converted.replace(registry.host, f"127.0.0.1:{server.server_port}")
        primed = head_start(proxied)
    finally:
        server.shutdown()
        server.server_close()
    assert config_held == [True]  # the first frame was asked for while the config was held
    assert list(primed.blobs) == [manifest["config"]["digest"]] and primed.layers
