"""The parts of `lazyfs run` that need no root: its command line, the container's environment,
the report, and the exit statuses of the container init script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.cli import build_parser
from lazyfs.cli._run_report import LayerReport, RunReport, format_report, lazy_layer_report
from lazyfs.cli.run import split_command
from lazyfs.fuse.container import DEFAULT_PATH, INIT_SCRIPT, container_env


@pytest.mark.parametrize(
    ("argv", "eager", "trace", "command"),
    [
        (
            ["run", "img", "--", "sh", "-c", "echo --eager"],
            False,
            None,
            ["sh", "-c", "echo --eager"],
        ),
        (
            ["run", "img", "--eager", "--trace", "t", "--", "ls", "--", "-l"],
            True,
            "t",
            ["ls", "--", "-l"],
        ),
        (["run", "--eager", "img", "--", "ls"], True, None, ["ls"]),
        (["run", "img", "ls", "-l"], False, None, ["ls", "-l"]),
        (["run", "img", "--eager"], True, None, []),
        (["run", "img"], False, None, []),
    ],
)
def test_options_may_follow_the_image_up_to_the_double_dash(
    argv: list[str], eager: bool, trace: str | None, command: list[str]
) -> None:
    args = build_parser().parse_args(argv)
    split_command(args)
    assert (args.image, args.eager, args.trace, args.command) == ("img", eager, trace, command)


def test_an_unknown_option_before_the_double_dash_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["run", "img", "--eagre", "--", "ls"])
    with pytest.raises(SystemExit) as info:
        split_command(args)
    assert info.value.code == 2
    assert "--eagre" in capsys.readouterr().err


def test_the_environment_comes_from_the_image_with_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("SECRET", "not passed on")
    assert container_env([]) == {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm"}
    env = container_env(["PATH=/opt/bin", "EQ=a=b", "EMPTY=", "junk", "=x"])
    assert env["PATH"] == "/opt/bin" and env["EQ"] == "a=b" and env["EMPTY"] == ""
    assert "SECRET" not in env and "junk" not in env and "" not in env


def test_the_report_has_a_row_per_layer_and_a_total() -> None:
    report = RunReport(
        "lazy",
        "reg/app@sha256:1",
        "linux/amd64",
        exit_code=3,
        mounted_s=0.5,
        command_s=0.25,
        total_s=0.75,
    )
    report.layers = [
        lazy_layer_report(
            "aaaa",
            "sha256:a",
            100,
            {
                "blob_size": 4 << 20,
                "bytes_fetched": 1 << 20,
                "requests": 3,
                "chunks_fetched": 1,
                "chunk_count": 4,
            },
        ),
        lazy_layer_report("bbbb", "sha256:b", 2 << 20, {}),
    ]
    text = format_report(report)
    lines = text.splitlines()
    assert lines[0] == (
        "lazyfs run: lazy: exit code 3, 0.750 s from start to exit (mounted "
        "after 0.500 s, command 0.250 s)"
    )
    assert lines[2].split() == [
        "aaaa",
        "4.0",
        "MiB",
        "1.0",
        "MiB",
        "3",
        "1",
        "of",
        "4",
        "(25.0%)",
        "25.0%",
    ]
    assert lines[3].split()[0] == "bbbb" and "0 of 0" in lines[3]
    assert lines[4].split()[:2] == ["all", "layers"] and "1 of 4 (25.0%)" in lines[4]

    eager = RunReport("eager", "x", "linux/amd64", layers=[LayerReport("c", "d", 10, 10, 1)])
    assert "all (whole blob)" in format_report(eager)
    assert "all layers" not in format_report(eager)  # no total for a single layer


@pytest.mark.root
def test_the_init_script_reports_setup_and_exec_failures(tmp_path: Path) -> None:
    def init(root: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
        spec = json.dumps({"root": str(root), "argv": argv, "env": {}, "cwd": "/"})
        return subprocess.run(
            [sys.executable, "-I", "-S", str(INIT_SCRIPT), spec],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    failed = init(not_a_directory, ["/bin/sh"])
    assert failed.returncode == 125
    assert failed.stderr.startswith("lazyfs run: cannot set up the container:")
    empty = tmp_path / "root"
    empty.mkdir()
    missing = init(empty, ["/no/such/command"])
    assert missing.returncode == 127
    assert missing.stderr == "lazyfs run: /no/such/command: No such file or directory\n"
    # /proc, /dev and /dev/shm were mounted in the command's mount namespace only.
    assert sorted(os.listdir(empty)) == ["dev", "proc", "tmp"]
    assert os.listdir(empty / "dev") == [] and os.listdir(empty / "proc") == []
