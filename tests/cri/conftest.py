"""Fixtures of the CRI tests: a registry with the app image (gzip and converted), an image
with the app image's layers under one of its own, and a pause image, and a private registry
(htpasswd) with the busybox image, for the package; a fresh node (containerd with its CRI
plugin, the snapshotter and its image service) per test. When a test that ran a node fails,
the tails of containerd's log and the snapshotter's go into the report."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cri import Node, publish_pause_image, running_node
from tests.support.images import base_layer, change_layer, skopeo_push, write_oci_image
from tests.support.node_fixtures import (  # the fixtures: used by name
    add_logs,
    image_fixture,  # noqa: F401
    registry_fixture,  # noqa: F401
    short_work_dir,
)
from tests.support.registry import Registry, htpasswd_auth, running_registry
from tests.support.registry_images import PublishedImage, convert_push, publish
from tests.support.snapshotter_images import CHUNK_SIZE, change_layer_with_big_file

PULL_USER = "puller"
PULL_PASSWORD = f"pull-secret-{secrets.token_hex(8)}"  # found nowhere it must not be


@pytest.fixture(scope="package")
def work() -> Iterator[Path]:
    yield from short_work_dir("lzk-")


@pytest.fixture(scope="package")
def sibling(work: Path, registry: Registry, image: PublishedImage) -> PublishedImage:
    """`test/sibling:v1` (gzip) and `:v1-erofs`: the app image's two layers, converted alike
    (the same blobs), under a top layer of its own (`/etc/motd` says `welcome-sibling`)."""
    layers = [*image.layers, change_layer("-sibling")]
    layout = write_oci_image(work / "images" / "sibling", "v1", layers)
    original = f"{registry.host}/test/sibling:v1"
    converted = f"{registry.host}/test/sibling:v1-erofs"
    skopeo_push(layout.layout, "v1", registry.host, "test/sibling:v1")
    convert_push(original, converted, "--chunk-size", CHUNK_SIZE)
    return PublishedImage(registry.host, original, converted, layers)


@pytest.fixture(scope="package")
def pause(work: Path, registry: Registry) -> str:
    return publish_pause_image(work, registry.host)


@pytest.fixture(scope="package")
def private(work: Path) -> Iterator[Registry]:
    auth = htpasswd_auth(work / "private-auth", {PULL_USER: PULL_PASSWORD})
    with running_registry(work / "private", auth) as server:
        yield server


@pytest.fixture(scope="package")
def private_image(work: Path, private: Registry) -> PublishedImage:
    """`test/private:v1` (gzip) and `:v1-erofs` in the private registry."""
    return publish(work / "private-images", private.host, repository="test/private",
                   creds=f"{PULL_USER}:{PULL_PASSWORD}")


@pytest.fixture(scope="package")
def private_app(work: Path, private: Registry) -> PublishedImage:
    """The app image's layers (a large file nobody reads) as `test/private-app` there."""
    return publish(work / "private-app", private.host, repository="test/private-app",
                   layers=[base_layer(), change_layer_with_big_file()],
                   creds=f"{PULL_USER}:{PULL_PASSWORD}")


@pytest.fixture
def node(work: Path, registry: Registry, private: Registry, pause: str,
         request: pytest.FixtureRequest) -> Iterator[Node]:
    # Its own directory (a test's name ends like another's: a hash of all of it).
    name = hashlib.sha256(request.node.name.encode()).hexdigest()[:10]
    with running_node(work / f"n{name}", pause, [registry.host, private.host]) as running:
        yield running


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Node):
            add_logs(report, value.containerd)
