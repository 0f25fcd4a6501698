"""The parts of `lazyfs run`'s command line that need no root: its options and its report."""

from __future__ import annotations

import pytest

from lazyfs.cli import build_parser
from lazyfs.cli._run_report import format_report
from lazyfs.cli.run import split_command
from lazyfs.container.report import LayerReport, RunReport, lazy_layer_report


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
