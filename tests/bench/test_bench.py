"""`lazyfs bench IMAGE -- CMD` against a converted busybox image in Debian's docker-registry on
127.0.0.1, through the built-in link emulator: the table, the JSON, CSV and plot files and
their figures, errors that name the mode and run, and that an interrupted bench leaves no
mount, loop device, record or process behind."""

from __future__ import annotations

import csv
import json
import platform
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyfs import __version__
from tests.support import registry_images
from tests.support.lazyfs_cli import killed_if_left
from tests.support.registry_images import REPO, PrivateCommand, PublishedImage, private_command

pytestmark = [pytest.mark.root, pytest.mark.network]

registry = registry_images.registry
busybox = registry_images.busybox

COMMAND = ["--", "/bin/busybox", "sh", "-c", "cat /etc/hostname; ls /var/cache/app"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WAIT_S = 120


Bencher = PrivateCommand  # `lazyfs bench` with a private state directory and TMPDIR


@pytest.fixture
def bencher(tmp_path: Path) -> Iterator[Bencher]:
    with private_command(tmp_path, "bench", timeout_s=600) as tool:
        yield tool


def table_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["mode", "to"])
    return {line.split()[0]: line.split() for line in lines[header + 1:]
            if not line.lstrip().startswith("(")}


@pytest.mark.slow  # eleven runs, about a minute
def test_every_mode_through_the_link(bencher: Bencher, busybox: PublishedImage,
                                     tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out_json, out_csv, out_plot = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    result = bencher.run(busybox.converted, "--insecure-registry", "--repeat", "2",
                         "--link", "20ms,100mbit", "--json", str(out_json), "--csv",
                         str(out_csv), "--plot", str(out_plot), *COMMAND)
    assert result.returncode == 0, result.stderr
    # The table: a row per mode, in the order asked.
    rows = table_rows(result.stdout)
    assert list(rows) == ["lazy", "prefetch", "eager", "warm"]
    assert rows["eager"][-2:] == ["1.0x", "100%"]
    assert "link 20 ms RTT, 100 Mbit/s; 2 runs per mode" in result.stdout
    # Progress: which mode, which run.
    assert "[1/8] lazy, run 1 of 2" in result.stderr
    assert "[8/8] warm, run 2 of 2" in result.stderr

    data = json.loads(out_json.read_text())
    assert data["schema"] == "lazyfs-bench/1"
    env = data["environment"]
    assert env["lazyfs_version"] == __version__ and env["kernel"] == platform.release()
    assert env["image"] == busybox.converted
    assert env["image_digest"].startswith("sha256:") and len(env["layers"]) == 2
    assert env["chunk_size"] == 512 * 1024
    assert all(layer["chunk_size"] == 512 * 1024 for layer in env["layers"])
    assert env["link"] == {"rtt_ms": 20.0, "rate_mbit": 100.0}
    assert env["modes"] == ["lazy", "prefetch", "eager", "warm"] and env["repeat"] == 2
    assert env["prefetch_list"] == "recorded by a first lazy run"
    assert env["page_cache_dropped"] is True
    assert env["reference"] != busybox.converted  # through the emulator's port
    runs = data["runs"]
    assert [(run["mode"], run["run"]) for run in runs] == [
        (mode, number) for number in (1, 2) for mode in ("lazy", "prefetch", "eager", "warm")]
    assert [run["order"] for run in runs] == list(range(1, 9))
    blobs = sum(layer["size_bytes"] for layer in env["layers"])
    for run in runs:
        assert run["exit_code"] == 0
        # A round trip to connect and one for the manifest at least, through the link.
        assert 0.04 < run["mounted_s"] < run["total_s"] < 60
        assert run["command_s"] == pytest.approx(run["total_s"] - run["mounted_s"], abs=1e-6)
        if run["mode"] == "eager":
            assert run["bytes_fetched"] == blobs and run["requests"] == 2
        elif run["mode"] == "warm":
            assert run["bytes_fetched"] == 0 and run["chunks_from_disk"] >= 1
        else:
            assert run["bytes_fetched"] > 0 and run["requests"] >= 2
            assert 1 <= run["chunks_fetched"] <= sum(layer["chunk_count"]
                                                     for layer in env["layers"])
            assert run["phases"]["metadata_s"] > 0
        if run["mode"] == "lazy":
            assert run["trace_offset_s"] > 0
    summary = data["summary"]
    assert list(summary) == ["lazy", "prefetch", "eager", "warm"]
    for mode, figures in summary.items():
        assert figures["runs"] == 2
        times = sorted(run["total_s"] for run in runs if run["mode"] == mode)
        assert figures["total_s"]["min"] == times[0] and figures["total_s"]["max"] == times[1]
        assert figures["speedup"] > 0
    assert summary["eager"]["bytes_share"] == 1.0

    with open(out_csv, newline="") as stream:
        rows_csv = list(csv.DictReader(stream))
    assert [row["mode"] for row in rows_csv] == [run["mode"] for run in runs]
    assert {row["image_digest"] for row in rows_csv} == {env["image_digest"]}
    assert float(rows_csv[0]["total_s"]) == runs[0]["total_s"]
    assert out_plot.read_bytes().startswith(PNG_SIGNATURE)
    bencher.assert_clean()


def test_errors_name_the_mode_and_run(bencher: Bencher, busybox: PublishedImage) -> None:
    failed = bencher.run(busybox.converted, "--insecure-registry", "--modes", "lazy,eager",
                         "--repeat", "1", "--", "/bin/busybox", "sh", "-c",
                         "echo broken >&2; exit 3")
    assert failed.returncode == 2
    error = failed.stderr.strip().splitlines()[-1]
    assert error == "lazyfs bench: error: lazy run 1 of 1: the command exited with 3: broken"
    missing = bencher.run(f"{busybox.host}/test/busybox:nope", "--insecure-registry",
                          "--modes", "eager", "--", "true")
    assert missing.returncode == 2 and "not found" in missing.stderr.splitlines()[-1]
    for args, message in (
        (["--modes", "lazy,fast"], "--modes lazy,fast: a list of distinct modes"),
        (["--link", "20,100"], "--link '20,100' is not RTT,RATE"),
        (["--repeat", "0"], "--repeat must be 1 or more"),
        (["--prefetch", "list.json", "--modes", "lazy"], "--prefetch FILE is the list"),
        (["--plot", "out.gif"], "written as .png or .svg"),
    ):
        result = bencher.run(busybox.converted, "--insecure-registry", *args, "--", "true")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr
    bencher.assert_clean()


# The busybox image's changes, as a container must see them: the upper layer's files, its
# whiteouts (a file, a directory) and its opaque directory.
CHANGES = ('test "$(cat /etc/hostname)" = changed && ! test -e /etc/os-release && '
           '! test -e /var/log && test "$(ls /var/cache/app)" = fresh.txt')


def test_an_ordinary_image_runs_eagerly(bencher: Bencher, busybox: PublishedImage,
                                        tmp_path: Path) -> None:
    """An image lazyfs cannot mount (gzip tar layers) runs in the eager mode alone: pulled
    and unpacked as a container engine does, its whiteouts overlayfs's."""
    out_json = tmp_path / "b.json"
    result = bencher.run(busybox.original, "--insecure-registry", "--modes", "eager",
                         "--repeat", "2", "--json", str(out_json), "--", "/bin/busybox", "sh",
                         "-c", CHANGES)
    assert result.returncode == 0, result.stderr
    assert list(table_rows(result.stdout)) == ["eager"]
    data = json.loads(out_json.read_text())
    env = data["environment"]
    assert env["chunk_size"] is None and len(env["layers"]) == 2 and env["link"] is None
    blobs = sum(layer["size_bytes"] for layer in env["layers"])
    for run in data["runs"]:
        assert run["mode"] == "eager" and run["exit_code"] == 0
        assert 0 < run["mounted_s"] < run["total_s"]
        assert run["bytes_fetched"] == blobs and run["requests"] == 2
    refused = bencher.run(busybox.original, "--insecure-registry", "--", "true")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 2
    assert refused.stderr.splitlines()[-1].endswith("only --modes eager runs it")
    bencher.assert_clean()


def _pids(pattern: str, parent: int | None = None) -> list[int]:
    extra = ["-P", str(parent)] if parent is not None else []
    found = subprocess.run(["pgrep", *extra, "-f", pattern], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


@pytest.mark.parametrize("mode", ["lazy", "eager", "ordinary"])
def test_ctrl_c_leaves_nothing_behind(bencher: Bencher, busybox: PublishedImage,
                                      mode: str) -> None:
    marker = {"lazy": "611.25", "eager": "612.25", "ordinary": "613.25"}[mode]
    image = busybox.original if mode == "ordinary" else busybox.converted
    process = subprocess.Popen(
        bencher.argv(image, "--insecure-registry", "--modes", mode.replace("ordinary", "eager"),
                     "--link", "5ms,100mbit", "--", "/bin/busybox", "sleep", marker),
        cwd=REPO, env=bencher.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with killed_if_left(process):
        deadline = time.monotonic() + WAIT_S
        while not _pids(f"^/bin/busybox sleep {marker}") and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        assert _pids(f"^/bin/busybox sleep {marker}"), "the command never started"
        emulators = _pids("lazyfs.bench.link", parent=process.pid)
        assert len(emulators) == 1
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=WAIT_S)
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "lazyfs: interrupted" and "Traceback" not in stderr
    assert _pids(f"sleep {marker}") == []  # nor lazyfs run, nor the bench
    assert emulators[0] not in _pids("lazyfs.bench.link")
    bencher.assert_clean()
