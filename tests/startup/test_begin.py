"""The start-up seam (`lazyfs.startup.begin`): what it starts for a layer URL or an image, and
what it hands over when nothing was started."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyfs.format.platform import Platform
from lazyfs.startup.begin import EarlyStart, begin_image, begin_layer
from lazyfs.startup.cache_directory import StartupError, prepare_cache_directory

AMD64 = Platform("linux", "amd64")


def never_called() -> None:
    raise AssertionError("nothing to wait for: the daemon's imports are not done here")


def test_nothing_started_hands_over_nothing() -> None:
    early = EarlyStart()
    assert early.layer_answers(never_called) is None
    assert early.image_answers(never_called, 1.0) is None
    assert early.warm_chunks() == ({}, None)


def test_a_layer_path_starts_nothing(tmp_path: Path) -> None:
    early = begin_layer(str(tmp_path / "a.blob"), descriptor=None, headers={},
                        cache_dir=tmp_path, warm_bytes=1 << 20)
    assert early == EarlyStart()


def test_an_unreadable_local_descriptor_is_left_to_the_daemon(tmp_path: Path) -> None:
    """The daemon reads it again and says why; no request goes out before."""
    early = begin_layer("http://127.0.0.1:9/a.blob", descriptor=str(tmp_path / "missing.json"),
                        headers={}, cache_dir=None, warm_bytes=None)
    assert early.layer is None and early.warm is None


@pytest.mark.network
def test_a_layer_url_starts_its_early_requests_and_waits_for_them_after_meanwhile() -> None:
    early = begin_layer("http://127.0.0.1:9/a.blob", descriptor=None, headers={},
                        cache_dir=None, warm_bytes=None)
    assert early.layer is not None and early.image is None
    ran = []
    answers = early.layer_answers(lambda: ran.append(True))
    assert ran == [True]
    assert answers is not None and answers.requests == 0  # nobody listens there


@pytest.mark.parametrize("text", ["", "app: v1"])
def test_a_reference_that_does_not_parse_starts_nothing(text: str) -> None:
    early = begin_image(text, platform=AMD64, insecure_registry=True, mirrors=False,
                        pull="always", cache_dir=None, warm_bytes=None)
    assert early == EarlyStart()


@pytest.mark.parametrize(("pull", "mirrors"), [("never", False), ("always", True)])
def test_an_image_the_registry_is_not_asked_for_first_starts_no_requests(
        pull: str, mirrors: bool) -> None:
    """--pull never resolves from the disk cache alone; mirrors are tried before the
    registry the head start would ask."""
    early = begin_image("127.0.0.1:9/app:v1", platform=AMD64, insecure_registry=True,
                        mirrors=mirrors, pull=pull, cache_dir=None, warm_bytes=None)
    assert early.image is None


def test_an_unusable_cache_directory_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StartupError, match="cannot use the cache directory"):
        prepare_cache_directory(str(tmp_path / "file" / "cache"))


def test_a_cache_directory_is_made_private(tmp_path: Path) -> None:
    directory = prepare_cache_directory(str(tmp_path / "cache"))
    assert directory == tmp_path / "cache"
    assert directory.stat().st_mode & 0o077 == 0
