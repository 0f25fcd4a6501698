"""`lazyfs run IMAGE_REF -- CMD` lazy and eager, against a converted busybox image in Debian's
docker-registry on 127.0.0.1: the command's output, its exit status, the report, and that
nothing stays mounted, attached or running afterwards, also after Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import registry_images
from tests.support.images import base_layer, ghost_layer
from tests.support.lazyfs_cli import killed_if_left
from tests.support.registry import Registry
from tests.support.registry_images import (
    REPO,
    PrivateCommand,
    PublishedImage,
    private_command,
    publish,
)

pytestmark = [pytest.mark.root, pytest.mark.network]

SCRIPT = "cat /etc/hostname; ls /var/cache/app; ls /var; test -e /etc/os-release || echo gone"
EXPECTED = "changed\nfresh.txt\ncache\ngone\n"
WAIT_S = 60

registry = registry_images.registry
busybox = registry_images.busybox


Runner = PrivateCommand  # `lazyfs run` with a private state directory and TMPDIR


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    with private_command(tmp_path, "run", timeout_s=180) as tool:
        yield tool


def report_rows(stderr: str) -> list[list[str]]:
    """The per-layer rows of the report table (name first)."""
    lines = stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "blob"])
    return [line.split() for line in lines[header + 1 :]]


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_run_prints_the_commands_output_and_the_report(
    runner: Runner, busybox: PublishedImage, mode: str, tmp_path: Path
) -> None:
    report_file = tmp_path / "report.json"
    extra = ["--eager"] if mode == "eager" else []
    result = runner.run(busybox.converted, "--insecure-registry", *extra,
                        "--report", str(report_file), "--", "/bin/busybox", "sh", "-c", SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED
    assert f"{mode}: exit code 0" in result.stderr
    report = json.loads(report_file.read_text())
    assert report["mode"] == mode and report["exit_code"] == 0
    assert report["image"].startswith(busybox.converted + "@sha256:")
    assert 0 < report["mounted_s"] <= report["total_s"]
    assert len(report["layers"]) == 2
    rows = report_rows(result.stderr)
    assert [row[0] for row in rows] == [layer["name"] for layer in report["layers"]] + ["all"]
    for layer in report["layers"]:
        assert layer["bytes_fetched"] > 0 and layer["requests"] >= 1
        if mode == "lazy":
            assert 1 <= layer["chunks_fetched"] <= layer["chunk_count"]
        else:
            assert layer["bytes_fetched"] == layer["blob_size"] and layer["requests"] == 1
    runner.assert_clean()


def test_the_command_runs_in_its_own_namespaces_with_proc_dev_and_tmp(
    runner: Runner, busybox: PublishedImage
) -> None:
    script = (
        "echo pid $$; test -e /proc/1/cmdline && echo proc; echo x > /dev/null && "
        "head -c 4 /dev/zero | wc -c; touch /tmp/new && echo tmp; ls /proc | grep -c '^[0-9]'"
    )
    result = runner.run(busybox.converted, "--insecure-registry", "--", "/bin/busybox", "sh",
                        "-c", script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[:6] == ["pid", "2", "proc", "4", "tmp", lines[5]]
    assert int(lines[5]) < 10  # init, the shell, ls, grep: none of the host's processes
    runner.assert_clean()


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_whiteouts_of_names_no_layer_has_stay_hidden(
    runner: Runner, registry: Registry, mode: str, tmp_path: Path
) -> None:
    """The command sees no entry for a whiteout of a name no lower layer has, in a directory
    of the whiting-out layer alone: that layer the only one, the bottom or the top."""
    only = publish(tmp_path / "work", registry.host, layers=[ghost_layer(on_base=True)],
                   repository="t/run-ghost-only")
    stacked = publish(tmp_path / "work", registry.host,
                      layers=[ghost_layer(), base_layer(), ghost_layer("newer")],
                      repository="t/run-ghost-stacked")
    extra = ["--eager"] if mode == "eager" else []
    # The shell's globs list names as readdir returns them (busybox ls leaves out, on its
    # stdout, an entry it cannot stat).
    for image, expected in ((only, "/fresh/real"), (stacked, "/fresh/real /newer/real")):
        result = runner.run(image.converted, "--insecure-registry", *extra, "--",
                            "/bin/busybox", "sh", "-c", "echo /fresh/* /newer/*; echo /*")
        assert result.returncode == 0, result.stderr
        listed, root = result.stdout.splitlines()
        assert listed.replace(" /newer/*", "") == expected
        assert "phantom" not in root and "/bin" in root
    runner.assert_clean()


def test_exit_status_and_a_missing_command(runner: Runner, busybox: PublishedImage) -> None:
    failed = runner.run(busybox.converted, "--insecure-registry", "--", "/bin/busybox", "sh",
                        "-c", "echo out; exit 7")
    assert failed.returncode == 7 and failed.stdout == "out\n"
    assert "exit code 7" in failed.stderr
    missing = runner.run(busybox.converted, "--insecure-registry", "--eager", "--", "/no/such")
    assert missing.returncode == 127
    assert "/no/such: No such file or directory" in missing.stderr
    runner.assert_clean()


def test_writable_directory_and_trace_file(
    runner: Runner, busybox: PublishedImage, tmp_path: Path
) -> None:
    changes, trace = tmp_path / "changes", tmp_path / "trace.jsonl"
    result = runner.run(busybox.converted, "--insecure-registry", "--writable", str(changes),
                        "--trace", str(trace), "--", "/bin/busybox", "sh", "-c",
                        "echo kept > /root/note")
    assert result.returncode == 0, result.stderr
    assert (changes / "upper" / "root" / "note").read_text() == "kept\n"
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert records and all({"t", "layer", "chunk", "event"} <= set(r) for r in records)
    runner.assert_clean()


def test_unconverted_image_and_bad_options_fail_in_one_line(
    runner: Runner, busybox: PublishedImage, tmp_path: Path
) -> None:
    for args, message in (
        ([busybox.original, "--insecure-registry", "--", "true"], "not a seekable EROFS layer"),
        ([f"{busybox.host}/test/busybox:nope", "--insecure-registry", "--", "true"],
         "not found"),
        ([busybox.converted, "--insecure-registry", "--eager", "--trace",
          str(tmp_path / "t"), "--", "true"], "not with --eager"),
        ([busybox.converted, "--insecure-registry", "--readahead", "-1", "--", "true"],
         "--readahead must be 0 or more"),
        ([busybox.converted, "--insecure-registry", "--eager", "--pull", "never", "--", "true"],
         "--pull never"),
        ([busybox.converted, "--insecure-registry", "--no-disk-cache", "--pull", "never", "--",
          "true"], "not with --no-disk-cache"),
    ):
        result = runner.run(*args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr
    runner.assert_clean()


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_ctrl_c_stops_the_command_and_tears_everything_down(
    runner: Runner, busybox: PublishedImage, mode: str
) -> None:
    extra = ["--eager"] if mode == "eager" else []
    process = subprocess.Popen(
        runner.argv(busybox.converted, "--insecure-registry", *extra, "--", "/bin/busybox",
                    "sh", "-c", "echo ready; exec /bin/busybox sleep 600"),
        cwd=REPO, env=runner.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with killed_if_left(process):
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=WAIT_S)
    # Not from the terminal, so the command got SIGTERM from lazyfs run.
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "exit code 143" in stderr and "Traceback" not in stderr
    sleeping = subprocess.run(["pgrep", "-f", "sleep 600"], capture_output=True, text=True)
    assert sleeping.stdout == ""
    runner.assert_clean()
