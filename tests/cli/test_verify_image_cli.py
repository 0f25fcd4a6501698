"""`lazyfs verify IMAGE` with registry references: images converted with `lazyfs convert
--push` pass against their source (one platform and an index of two), a layer the registry
serves forged is named, and an argument is told apart as an image or a blob."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, run_lazyfs
from tests.support import registry_images
from tests.support.forged_images import forged_image, publish_noise_image
from tests.support.images import skopeo_push, write_index_image
from tests.support.registry import Registry
from tests.support.registry_images import PublishedImage, convert_push

pytestmark = [pytest.mark.network, pytest.mark.root]  # convert keeps owners: root

registry = registry_images.registry
busybox = registry_images.busybox


def _problems(stdout: str) -> list[str]:
    return [line.removeprefix("problem: ") for line in stdout.splitlines()
            if line.startswith("problem: ")]


def test_a_pushed_conversion_against_its_source(busybox: PublishedImage) -> None:
    result = run_lazyfs("verify", busybox.converted, "--against", busybox.original,
                        "--insecure-registry")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"verify {busybox.converted} against {busybox.original}"
    assert lines[1].startswith(f"  image: image {busybox.converted}, manifest sha256:")
    assert lines[-2].startswith("  linux/amd64: each layer holds its source layer's files")
    assert lines[-1] == "OK"
    assert result.stderr == ""  # no terminal: no progress line


def test_an_index_of_two_platforms(registry: Registry, tmp_path: Path) -> None:
    image = write_index_image(tmp_path / "layout", "v1")
    skopeo_push(image.layout, "v1", registry.host, "test/multi:v1", all_platforms=True)
    original, converted = f"{registry.host}/test/multi:v1", f"{registry.host}/test/multi:v1-erofs"
    convert_push(original, converted)
    result = run_lazyfs("verify", converted, "--against", original, "--insecure-registry")
    assert result.returncode == 0, result.stdout + result.stderr
    for platform in ("linux/amd64", "linux/arm64"):
        assert f"  {platform}: each layer holds its source layer's files;" in result.stdout


def test_a_layer_served_forged_is_named(registry: Registry, tmp_path: Path) -> None:
    reference = publish_noise_image(tmp_path, registry, verity=True)
    with forged_image(registry, reference, table=False) as forged:
        result = run_lazyfs("verify", forged.reference, "--insecure-registry")
    assert result.returncode == 1, result.stdout + result.stderr
    problems = _problems(result.stdout)
    assert len(problems) == 1, result.stdout
    assert problems[0].startswith(f"linux/amd64: layer 2/2 ({forged.layer_digest[:19]}): "
                                  "blob: "), problems
    assert "digest" in problems[0]


def test_an_image_that_is_not_there(registry: Registry) -> None:
    result = run_lazyfs("verify", f"{registry.host}/test/none:v1", "--insecure-registry")
    assert_one_line_error(result, "lazyfs verify: error:", "test/none")


def test_a_missing_blob_stays_a_blob(tmp_path: Path) -> None:
    """A path that does not exist is taken for a blob when it is named like one: nothing is
    asked of Docker Hub."""
    result = run_lazyfs("verify", tmp_path / "missing.blob")
    assert result.returncode != 0
    assert "missing.blob" in result.stderr
    assert "docker.io" not in result.stderr
