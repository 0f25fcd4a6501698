"""Options anywhere on the command line of `lazyfs mount` and `lazyfs run`, and the checks of
the options that bound reads."""

from __future__ import annotations

import argparse

import pytest

from lazyfs.cli import UserError, build_parser
from lazyfs.cli._images import low_speed_of, tuning_of
from lazyfs.cli.run import split_command
from lazyfs.fetch.base import SpeedLimit


def parse(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    if argv[0] == "run":
        split_command(args)  # as cmd_run does: options that follow IMAGE_REF, up to `--`
    return args


@pytest.mark.parametrize("argv", [
    ("mount", "http://h/l.blob", "--trace", "t.jsonl", "/mnt", "--read-timeout", "3"),
    ("mount", "--trace", "t.jsonl", "http://h/l.blob", "--read-timeout", "3", "/mnt"),
    ("mount", "--read-timeout", "3", "--trace", "t.jsonl", "http://h/l.blob", "/mnt"),
])
def test_mount_options_before_between_and_after_the_positionals(argv: tuple[str, ...]) -> None:
    args = parse(*argv)
    assert (args.source, args.mountpoint, args.more) == ("http://h/l.blob", "/mnt", [])
    assert args.trace == "t.jsonl" and args.read_timeout == 3.0


def test_mount_of_several_images_with_options_among_them() -> None:
    args = parse("mount", "reg/a:1", "/m1", "--insecure", "reg/b:2", "/m2", "-v")
    assert (args.source, args.mountpoint, args.more) == ("reg/a:1", "/m1", ["reg/b:2", "/m2"])
    assert args.insecure and args.verbose == 1


@pytest.mark.parametrize("argv", [
    ("run", "--read-timeout", "3", "app:1", "--trace", "t", "--", "cat", "--trace", "x"),
    ("run", "app:1", "--trace", "t", "--read-timeout", "3", "--", "cat", "--trace", "x"),
    ("run", "--trace", "t", "app:1", "-v", "--read-timeout=3", "--", "cat", "--trace", "x"),
])
def test_run_options_anywhere_before_the_command(argv: tuple[str, ...]) -> None:
    args = parse(*argv)
    assert args.image == "app:1" and args.trace == "t" and args.read_timeout == 3.0
    assert args.command == ["cat", "--trace", "x"]  # the command's own options untouched


def test_read_bounds_from_the_command_line() -> None:
    args = parse("mount", "http://h/l.blob", "/mnt", "--read-timeout", "5",
                 "--low-speed-limit", "32K", "--low-speed-time", "2", "--retry-bad-after", "7",
                 "--readahead", "1")
    tuning = tuning_of(args)
    assert (tuning.read_timeout_s, tuning.bad_retry_after_s, tuning.readahead_chunks) == (
        5.0, 7.0, 1)
    assert low_speed_of(args) == SpeedLimit(32 * 1024, 2.0)
    defaults = parse("mount", "http://h/l.blob", "/mnt")
    assert tuning_of(defaults).read_timeout_s == 30.0
    assert low_speed_of(defaults) == SpeedLimit()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--read-timeout", "0", "--read-timeout must be more than 0"),
    ("--retry-bad-after", "-1", "--retry-bad-after must be 0 seconds or more"),
    ("--low-speed-time", "0", "--low-speed-time must be more than 0"),
    ("--low-speed-limit", "fast", "--low-speed-limit"),
])
def test_bad_read_bounds_are_user_errors(flag: str, value: str, message: str) -> None:
    args = parse("mount", "http://h/l.blob", "/mnt", f"{flag}={value}")
    with pytest.raises(UserError, match=message):
        tuning_of(args)
        low_speed_of(args)


def test_an_error_of_run_names_the_command_not_the_containers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`run` keeps the container's command in its arguments; the error line names `run`."""
    from lazyfs.cli import main

    assert main(["run", "app:1", "--eager", "--trace", "t", "--", "cat", "x"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lazyfs run: error: ") and "cat" not in error, error
