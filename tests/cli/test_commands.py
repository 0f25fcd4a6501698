"""The command table: every command's module registers it with the help line the table
shows, and a command's parser is built without importing the other commands' modules."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys

import lazyfs.cli
from lazyfs.cli import COMMANDS, build_parser, command_of
from tests.support.lazyfs_cli import REPO


def test_the_table_lists_every_registered_command_with_its_own_help() -> None:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    found: dict[str, str] = {}
    for info in pkgutil.iter_modules(lazyfs.cli.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"lazyfs.cli.{info.name}")
        if hasattr(module, "register"):
            before = set(subparsers.choices)
            module.register(subparsers)
            for name in set(subparsers.choices) - before:
                found[name] = info.name
    assert found == {name: module for name, (module, _) in COMMANDS.items()}
    helps = {action.dest: action.help for action in subparsers._choices_actions}
    assert helps == {name: help_line for name, (_, help_line) in COMMANDS.items()}


def test_command_of_skips_the_options_before_it() -> None:
    assert command_of(["-vv", "mount", "x", "-v"]) == "mount"
    assert command_of(["--version"]) is None
    assert command_of(["--", "mount"]) is None


def test_one_command_parses_in_full_and_the_others_are_listed() -> None:
    args = build_parser("stats").parse_args(["stats", "/mnt", "--json"])
    assert args.command == "stats" and args.json
    assert set(build_parser("").format_help().split()) >= set(COMMANDS)


def imported_by(*argv: str) -> set[str]:
    """The modules (and their top-level packages) that `lazyfs ARGV` imported."""
    code = ("import sys; from lazyfs.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('MODULES', *sorted(sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO,
                            capture_output=True, text=True, check=True)
    line = next(line for line in result.stderr.splitlines() if line.startswith("MODULES "))
    names = set(line.split()[1:])
    return names | {name.partition(".")[0] for name in names}


def test_version_and_mount_import_neither_converter_nor_httpx_nor_zstandard() -> None:
    heavy = {"converter", "httpx", "zstandard", "hypothesis", "grpc"}
    for argv in (["--version"], ["--help"], ["mount", "--help"], ["stats", "--help"]):
        modules = imported_by(*argv)
        assert not modules & heavy, (argv, modules & heavy)
    assert "lazyfs.cli.convert" not in imported_by("--version")
