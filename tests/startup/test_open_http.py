"""open_layer against a real nginx: descriptors found beside the blob by URL, and bounded."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lazyfs.format.descriptor import DescriptorError
from lazyfs.layer.errors import ImageReadError, LayerOpenError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import LayerSource
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.support import nginx

nginx_server = nginx.nginx_server
StartNginx = Callable[[Path], nginx.NginxServer]
pytestmark = pytest.mark.network
IMAGE = make_image_bytes(300_000, seed=11)


def open_and_read(url: str) -> bytes:
    async def read_whole(image: RemoteImage) -> bytes:
        return await image.read(0, image.size)

    data: bytes = run_with_layer(LayerSource(url), read_whole, cache_bytes=1 << 20)
    return data


def test_descriptor_beside_the_blob_url(tmp_path: Path, nginx_server: StartNginx) -> None:
    write_blob(tmp_path, IMAGE, chunk_size=65536)
    server = nginx_server(tmp_path)
    assert open_and_read(server.url + "layer.blob") == IMAGE


def test_missing_descriptor_url_names_what_was_tried(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    write_blob(tmp_path, IMAGE, chunk_size=65536)
    (tmp_path / "layer.descriptor.json").unlink()
    server = nginx_server(tmp_path)
    with pytest.raises(LayerOpenError, match=r"layer\.descriptor\.json"):
        open_and_read(server.url + "layer.blob")


def test_oversized_descriptor_is_refused_without_reading_it_all(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    write_blob(tmp_path, IMAGE, chunk_size=65536)
    # Large enough that nginx cannot hand it all to the kernel's socket buffers at once.
    (tmp_path / "layer.descriptor.json").write_bytes(b" " * (64 * 1024 * 1024))
    server = nginx_server(tmp_path)
    with pytest.raises(DescriptorError, match="larger than 1 MiB"):
        open_and_read(server.url + "layer.blob")
    # nginx logs a request the client gave up on once it notices: poll for its line.
    deadline = time.monotonic() + 10
    sent = [line for line in server.access_lines() if "descriptor" in line]
    while not sent and time.monotonic() < deadline:
        time.sleep(0.05)
        sent = [line for line in server.access_lines() if "descriptor" in line]
    assert sent and all(int(line.split()[-1]) < 64 * 1024 * 1024 for line in sent), sent


def test_a_failed_fetch_is_logged_once_with_url_range_and_status(
    tmp_path: Path, nginx_server: StartNginx, caplog: pytest.LogCaptureFixture
) -> None:
    write_blob(tmp_path, IMAGE, chunk_size=65536)
    server = nginx_server(tmp_path)
    url = server.url + "layer.blob"

    async def body(image: RemoteImage) -> None:
        (tmp_path / "layer.blob").rename(tmp_path / "moved.blob")  # now 404
        with pytest.raises(ImageReadError, match="HTTP 404"):
            await image.read(0, 100)
        requests = image.reader.stats.requests
        with pytest.raises(ImageReadError, match=r"fetch failed \(.*HTTP 404.*tried again in"):
            await image.read(100, 100)  # the same chunk, held off: no fetch, no line
        assert image.reader.stats.requests == requests
        with pytest.raises(ImageReadError, match="HTTP 404"):
            await image.read(2 * 65536, 100)  # another chunk is tried: its own line

    with caplog.at_level(logging.DEBUG):
        run_with_layer(LayerSource(url), body, tuning=ImageTuning(readahead_chunks=0))
    lines = [record.getMessage() for record in caplog.records
             if record.levelno >= logging.WARNING]
    assert len(lines) == 2, lines
    assert all(url in line and "HTTP 404" in line for line in lines)
    assert "chunks 0-0" in lines[0] and "bytes=0-" in lines[0] and "chunks 2-2" in lines[1]
