"""The head start of a mount against a real nginx: what it fetches before the daemon exists,
that the daemon's reader asks for none of it again, and that its answers are checked like any
other (a corrupt one is fetched again, a blob of another size refused)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from converter.encoder import EncodeResult
from lazyfs.fetch.errors import BlobChangedError
from lazyfs.fetch.primed import ArrivingRest, PrimedAnswers
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.early_requests import FIRST_FRAME_BYTES
from lazyfs.startup.head_start import HeadStart, read_descriptor_file
from lazyfs.startup.open import LayerSource
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.startup.test_open_requests import blob_ranges
from tests.support import nginx

nginx_server = nginx.nginx_server
StartNginx = Callable[[Path], nginx.NginxServer]

CHUNK = 64 * 1024
IMAGE = make_image_bytes(2 * 1024 * 1024, seed=33)
WINDOW = 4096
TUNING = ImageTuning(readahead_chunks=0, verity_window_bytes=WINDOW)


def head_start(url: str, **options: object) -> PrimedAnswers:
    started = HeadStart(url, tree_window_bytes=WINDOW, **options).start()  # type: ignore[arg-type]
    return started.finish(10.0)


@dataclass
class Served:
    server: nginx.NginxServer
    url: str
    answers: PrimedAnswers
    result: EncodeResult


@pytest.fixture
def served(tmp_path: Path, nginx_server: StartNginx) -> Served:
    """The test layer served by nginx, and what a head start fetched of it."""
    _, result = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    server = nginx_server(tmp_path)
    url = server.url + "layer.blob"
    answers = head_start(url)
    # nginx logs a request once its answer is sent, which may be after the client has it:
    # count the head start's requests in before a test counts its own.
    deadline = time.monotonic() + 5
    while len(server.access_lines()) < answers.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    return Served(server, url, answers, result)


@pytest.mark.network
def test_it_fetches_descriptor_metadata_first_frame_and_its_hash_blocks(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    blob, result = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    server = nginx_server(tmp_path)
    answers = head_start(server.url + "layer.blob")
    data = blob.read_bytes()
    assert answers.documents.keys() == {server.url + "layer.descriptor.json"}
    a = result.annotations
    assert a.verity_offset is not None
    payload = a.verity_offset + SKIPPABLE_HEADER_SIZE
    # First frame from 0 (whole: it is shorter than FIRST_FRAME_BYTES), then the metadata,
    # then the level-0 hash block over chunk 0 (the window held the top level only).
    assert sorted(answers.ranges) == sorted([0, min(a.chunk_table_offset, a.verity_offset),
                                             payload + 2 * 4096])
    for start, (body, size) in answers.ranges.items():
        assert size == len(data) and body == data[start:start + len(body)]
    assert len(answers.ranges[0][0]) == min(FIRST_FRAME_BYTES, len(data))
    assert answers.requests == 4 and answers.bytes_fetched == sum(
        len(body) for body, _ in answers.ranges.values()) + len(
        answers.documents[server.url + "layer.descriptor.json"] or b"")


@pytest.mark.network
def test_the_reader_asks_for_nothing_the_head_start_holds(served: Served) -> None:
    server, url, answers, result = served.server, served.url, served.answers, served.result
    before = len(server.access_lines())

    async def first_reads(image: RemoteImage) -> tuple[bytes, tuple[int, int]]:
        data = await image.read(1024, 4096) + await image.read(3 * CHUNK, 100)
        return data, image.metadata.frame_range(3)

    data, frame_3 = run_with_layer(LayerSource(url, primed=answers), first_reads, tuning=TUNING)
    assert data == IMAGE[1024:5120] + IMAGE[3 * CHUNK:3 * CHUNK + 100]
    # Only chunk 3 reached the server: the descriptor, metadata, chunk 0 and its hash block
    # came from the head start (and that hash block covers chunk 3 too).
    assert len(server.access_lines()) - before == 1
    assert blob_ranges(server)[-1] == frame_3
    assert result.blob_size > frame_3[1]


@pytest.mark.network
def test_a_corrupt_early_answer_is_fetched_again_from_the_server(served: Served) -> None:
    server, url, answers = served.server, served.url, served.answers
    body, size = answers.ranges[0]
    answers.ranges[0] = (body[:500] + bytes([body[500] ^ 1]) + body[501:], size)
    before = len(server.access_lines())

    async def first_read(image: RemoteImage) -> tuple[bytes, int]:
        return await image.read(0, 8192), image.stats.refetches

    data, refetches = run_with_layer(LayerSource(url, primed=answers), first_read,
                                     tuning=TUNING)
    assert data == IMAGE[:8192] and refetches == 1
    assert [start for start, _ in blob_ranges(server)[-1:]] == [0]
    assert len(server.access_lines()) - before == 1


@pytest.mark.network
def test_an_early_answer_for_a_blob_of_another_size_is_refused(served: Served) -> None:
    url, answers = served.url, served.answers
    metadata_start = sorted(answers.ranges)[1]  # the first range the reader asks for
    for first, (body, size) in list(answers.ranges.items()):
        answers.ranges[first] = (body, size + 1)

    async def nothing(image: RemoteImage) -> None:
        return None

    with pytest.raises(BlobChangedError) as raised:
        run_with_layer(LayerSource(url, primed=answers), nothing, tuning=TUNING)
    assert f"bytes={metadata_start}-" in str(raised.value)
    assert f"blob is {size + 1} bytes, expected {size}" in str(raised.value)


@pytest.mark.network
def test_a_local_descriptor_is_known_at_once_and_the_reader_asks_for_nothing_again(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    """`--descriptor FILE`: the layout is known before any request, so the metadata goes
    first on one connection and the first frame on the other; no descriptor is asked for,
    and the daemon's reader finds everything it opens the layer with."""
    served_dir = tmp_path / "served"
    served_dir.mkdir()
    blob, result = write_blob(served_dir, IMAGE, chunk_size=CHUNK)
    descriptor = tmp_path / "mine.json"
    (served_dir / "layer.descriptor.json").rename(descriptor)
    server = nginx_server(served_dir)
    url = server.url + "layer.blob"
    known = read_descriptor_file(str(descriptor))
    assert known is not None and known.size == result.blob_size
    answers = head_start(url, descriptor=str(descriptor), known=known)
    a = result.annotations
    assert a.verity_offset is not None
    payload = a.verity_offset + SKIPPABLE_HEADER_SIZE
    assert not answers.documents
    assert sorted(answers.ranges) == sorted([0, min(a.chunk_table_offset, a.verity_offset),
                                             payload + 2 * 4096])
    deadline = time.monotonic() + 5
    while len(server.access_lines()) < answers.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.access_lines()) == answers.requests == 3
    data = blob.read_bytes()
    for start, (body, size) in answers.ranges.items():
        assert size == len(data) and body == data[start:start + len(body)]

    async def first_read(image: RemoteImage) -> bytes:
        return await image.read(1024, 4096)

    source = LayerSource(url, descriptor=str(descriptor), primed=answers)
    assert run_with_layer(source, first_read, tuning=TUNING) == IMAGE[1024:5120]
    assert len(server.access_lines()) == 3  # all of it from the head start


def test_a_descriptor_file_is_read_when_it_is_one(tmp_path: Path) -> None:
    _, result = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    path = tmp_path / "layer.descriptor.json"
    for location in (str(path), f"file://{path}"):
        found = read_descriptor_file(location)
        assert found is not None and found.seekable() == result.annotations
    (tmp_path / "garbage.json").write_text("{")
    (tmp_path / "large.json").write_bytes(b" " * (2 * 1024 * 1024))
    for name in ("missing.json", "garbage.json", "large.json"):
        assert read_descriptor_file(str(tmp_path / name)) is None


@pytest.mark.network
def test_no_server_leaves_nothing_and_no_error(tmp_path: Path) -> None:
    answers = head_start("http://127.0.0.1:9/layer.blob")
    assert answers.requests == 0 and not answers.ranges and not answers.documents


def test_it_applies_to_plain_urls_of_one_origin_only() -> None:
    assert HeadStart.applies_to("https://example.com/a.blob", None)
    assert HeadStart.applies_to("http://h/a.blob", "http://h/d.json")
    assert not HeadStart.applies_to("http://h/a.blob", "http://other/d.json")
    assert not HeadStart.applies_to("http://u:p@h/a.blob", None)
    assert HeadStart.applies_to("http://h/a.blob", "/srv/d.json")  # read by the command
    assert HeadStart.applies_to("http://h/a.blob", "file:///srv/d.json")
    assert not HeadStart.applies_to("/srv/a.blob", None)
    assert not HeadStart.applies_to("file:///srv/a.blob", None)


def test_the_mount_command_imports_nothing_heavy_before_its_head_start() -> None:
    """The parsers of `lazyfs mount` and `lazyfs run` and the modules behind them are light,
    so the head starts begin before trio, pyfuse3 and httpx are imported."""
    code = ("import sys, lazyfs.cli as cli; cli.build_parser('mount'); cli.build_parser('run'); "
            "import lazyfs.startup.begin, lazyfs.startup.registry_head_start; "
            "print(sorted({'trio', 'httpx', 'pyfuse3', 'zstandard', 'sqlite3'} & "
            "set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_layer_mount_imports_nothing_it_does_not_use_before_its_daemon() -> None:
    """What `lazyfs mount URL` imports before it forks its daemon (the command, the mount
    service, a warm start, the daemon's preloaded modules) holds nothing of images and
    registries, nor uuid: it is all on the way to the first read."""
    code = ("import sys, lazyfs.cli as cli; cli.build_parser('mount'); "
            "import lazyfs.cli.mount, lazyfs.startup.begin, lazyfs.mount.service, "
            "lazyfs.startup.warm_start, lazyfs.mount.background as background; "
            "background.preload_daemon_modules(); "
            "print(sorted({'lazyfs.mount.images', 'lazyfs.oci.registry_source', "
            "'lazyfs.startup.registry_head_start', 'lazyfs.fetch.registry', 'lazyfs.format.oci', "
            "'lazyfs.oci.image_memory', 'uuid'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


BIG_CHUNK = 1024 * 1024  # a first frame longer than FIRST_FRAME_BYTES
BIG_IMAGE = make_image_bytes(3 * BIG_CHUNK, seed=34)


@pytest.mark.network
def test_a_long_first_frame_is_fetched_whole_and_the_reader_asks_nothing_of_it(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    """The first frame's start comes at once, its rest once the chunk table says where it
    ends; the daemon's reader then reads all of chunk 0 without a request."""
    blob, _ = write_blob(tmp_path, BIG_IMAGE, chunk_size=BIG_CHUNK)
    server = nginx_server(tmp_path)
    url = server.url + "layer.blob"
    started = HeadStart(url, tree_window_bytes=WINDOW).start()
    time.sleep(0.5)  # `finish` takes what has arrived by then (all of it, unless very busy)
    answers = started.finish(10.0)
    data = blob.read_bytes()
    arrived = FIRST_FRAME_BYTES + len(answers.ranges[FIRST_FRAME_BYTES][0])
    still_arriving = answers.rests.get(arrived)
    assert len(answers.rests) == (still_arriving is not None)
    frame_end = arrived + (0 if still_arriving is None else still_arriving.length)
    for start, (body, size) in answers.ranges.items():
        assert size == len(data) and body == data[start:start + len(body)]
    deadline = time.monotonic() + 5
    while len(server.access_lines()) < answers.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    before = len(server.access_lines())

    async def whole_chunk(image: RemoteImage) -> tuple[bytes, tuple[int, int]]:
        return await image.read(0, BIG_CHUNK), image.metadata.frame_range(0)

    whole, frame_0 = run_with_layer(LayerSource(url, primed=answers), whole_chunk,
                                    tuning=TUNING)
    assert whole == BIG_IMAGE[:BIG_CHUNK] and frame_0[1] == frame_end
    assert len(server.access_lines()) == before and not answers.rests


def _settled(server: nginx.NginxServer) -> int:
    """The requests nginx has logged, once no more come in for a while (it logs one when
    its answer is sent or given up)."""
    count, quiet_since = len(server.access_lines()), time.monotonic()
    while time.monotonic() - quiet_since < 0.3:
        time.sleep(0.02)
        if len(server.access_lines()) != count:
            count, quiet_since = len(server.access_lines()), time.monotonic()
    return count


class _Rest:
    """An answer's rest still arriving, from bytes in memory (`cut`: it ends after so
    many)."""

    def __init__(self, body: bytes, cut: int | None = None) -> None:
        self.stream = io.BytesIO(body[:cut])
        self.closed = False

    def read(self, size: int) -> bytes:
        return self.stream.read(min(size, 10_000))


def _handed_over(answers: PrimedAnswers, data: bytes, at: int, frame_end: int,
                 cut: int | None = None) -> _Rest:
    """`answers` as a `finish` leaves them that came while the first frame's rest was
    arriving: what had arrived up to `at` an answer, the rest still on its connection."""
    for start in [start for start in answers.ranges if FIRST_FRAME_BYTES <= start < frame_end]:
        del answers.ranges[start]
    answers.close_rests()  # whatever the real head start had still arriving
    size = len(data)
    answers.ranges[FIRST_FRAME_BYTES] = (data[FIRST_FRAME_BYTES:at], size)
    rest = _Rest(data[at:frame_end], cut)

    def close() -> None:
        rest.closed = True

    answers.rests[at] = ArrivingRest(read=rest.read, close=close, fd=-1,
                                     length=frame_end - at, blob_size=size)
    return rest


@pytest.mark.network
@pytest.mark.parametrize("cut", [None, 5000])
def test_the_reader_streams_the_rest_still_arriving_and_fetches_what_it_lacks(
    tmp_path: Path, nginx_server: StartNginx, cut: int | None
) -> None:
    """A rest handed over at `finish` is read on as it arrives (all of it: no request for
    the frame); one cut short is fetched from the server from where it ended. Its bytes
    are checked like any (the chunk reads back right)."""
    blob, _ = write_blob(tmp_path, BIG_IMAGE, chunk_size=BIG_CHUNK)
    server = nginx_server(tmp_path)
    url = server.url + "layer.blob"


    async def first_frame_end(image: RemoteImage) -> int:
        return image.metadata.frame_range(0)[1]

    frame_end = run_with_layer(LayerSource(url), first_frame_end, tuning=TUNING)
    answers = head_start(url)
    at = FIRST_FRAME_BYTES + 100_000
    rest = _handed_over(answers, blob.read_bytes(), at, frame_end, cut)
    before = _settled(server)

    async def whole_chunk(image: RemoteImage) -> tuple[bytes, tuple[int, int]]:
        return await image.read(0, BIG_CHUNK), image.metadata.frame_range(0)

    whole, frame_0 = run_with_layer(LayerSource(url, primed=answers), whole_chunk,
                                    tuning=TUNING)
    assert whole == BIG_IMAGE[:BIG_CHUNK] and rest.closed and not answers.rests
    assert frame_0[1] == frame_end
    if cut is None:
        assert len(server.access_lines()) == before
    else:
        deadline = time.monotonic() + 5
        while len(server.access_lines()) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(server.access_lines()) == before + 1
        assert blob_ranges(server)[-1] == (at + cut, frame_0[1])
