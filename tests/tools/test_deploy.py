"""A node's files (`tools/deploy/`) and README's instructions for them agree with what they
configure: the example configuration loads and lists every key, README's table of keys is
the schema's, every TOML snippet of README parses (containerd's are the files'), the systemd
unit passes `systemd-analyze verify` and starts the snapshotter as its parser reads it, and
containerd reads its snippet."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from lazyfs.cli import build_parser
from lazyfs.cli.snapshotter import flags_given
from lazyfs.node.config import (
    DEFAULT_ADDRESS,
    DEFAULT_CONFIG_PATH,
    SCHEMA,
    settings_of_document,
    snapshotter_config,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "tools" / "deploy"
README = REPO / "README.md"
UNIT = DEPLOY / "lazyfs-snapshotter.service"
CONTAINERD_SNIPPETS = ("containerd-1.x.toml", "containerd-2.x.toml")
_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```$",
                    re.MULTILINE | re.DOTALL)


def readme_blocks(lang: str) -> list[str]:
    """README's fenced blocks of `lang`, their indentation (in a list item) removed."""
    blocks = []
    for found in _FENCE.finditer(README.read_text()):
        if found["lang"] == lang:
            indent = len(found["indent"])
            blocks.append("".join(line[indent:] for line in
                                  found["body"].splitlines(keepends=True)))
    return blocks


def test_the_example_configuration_loads_and_lists_every_key() -> None:
    text = (DEPLOY / "config.toml").read_text()
    config = snapshotter_config(settings_of_document(tomllib.loads(text), "config.toml"))
    assert config.address == DEFAULT_ADDRESS
    assert config.metrics_address == ("127.0.0.1", 9180)
    sections = re.split(r"^\[(\w+)\]$", text, flags=re.MULTILINE)
    body = dict(zip(sections[1::2], sections[2::2], strict=True))
    for key in SCHEMA:
        assert re.search(rf"^(# )?{key.name} = ", body.get(key.section, ""), re.MULTILINE), \
            f"the example does not show {key.label}"
    # Its commented-out keys uncommented, it still loads: the defaults it shows are valid.
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)
    uncommented = uncommented.replace('"mirror.example.internal:5000"', "")
    defaults = settings_of_document(tomllib.loads(uncommented), "config.toml")
    assert {key_id for key_id in defaults} == {key.id for key in SCHEMA}


def test_readme_lists_every_key_as_the_schema_has_it() -> None:
    rows = [f"| `{key.label}` | `{key.option}` | {key.value_name} | {key.default} | "
            f"{key.help} |" for key in SCHEMA]
    header = "| key | option | value | default | what it sets |\n|---|---|---|---|---|\n"
    assert header + "\n".join(rows) + "\n" in README.read_text()


def test_every_toml_snippet_of_the_readme_parses() -> None:
    blocks = readme_blocks("toml")
    assert len(blocks) >= 3
    documents = [tomllib.loads(block) for block in blocks]
    for name in CONTAINERD_SNIPPETS:
        assert tomllib.loads((DEPLOY / name).read_text()) in documents, name


def test_the_files_name_one_socket() -> None:
    for name in CONTAINERD_SNIPPETS:
        plugin = tomllib.loads((DEPLOY / name).read_text())["proxy_plugins"]["lazyfs"]
        assert plugin == {"type": "snapshot", "address": DEFAULT_ADDRESS}
    config = tomllib.loads((DEPLOY / "config.toml").read_text())
    assert config["snapshotter"]["address"] == DEFAULT_ADDRESS


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    return unit


def test_the_unit_starts_the_snapshotter_as_its_parser_reads_it() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"  # `lazyfs snapshotter` says READY=1
    program, *argv = shlex.split(service["ExecStart"])
    assert program == "/usr/local/bin/lazyfs"
    args = build_parser("snapshotter").parse_args(argv)
    assert args.command == "snapshotter" and args.config == DEFAULT_CONFIG_PATH
    assert flags_given(args) == {}  # every setting in the file
    assert "containerd.service" in _unit()["Unit"]["Before"]
    for private in ("PrivateMounts", "ProtectSystem", "MountFlags", "PrivateTmp"):
        assert private not in service


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    # verify checks that ExecStart's program exists: a stand-in of the same name.
    program = tmp_path / "bin" / "lazyfs"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/lazyfs", str(program)))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    # Warnings (an unknown key, a bad value) are printed, yet exit 0: both must be clean.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_containerd_1_6_reads_its_snippet(tmp_path: Path) -> None:
    containerd = shutil.which("containerd")
    if containerd is None:
        pytest.skip("containerd is not installed")
    version = subprocess.run([containerd, "--version"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    if not re.search(r" 1\.[67]\.", version):
        pytest.skip(f"the snippet is for containerd 1.6 and 1.7, not {version.strip()}")
    result = subprocess.run(
        [containerd, "--config", str(DEPLOY / "containerd-1.x.toml"), "config", "dump"],
        capture_output=True, text=True, timeout=60, check=True)
    dumped = tomllib.loads(result.stdout)
    assert dumped["proxy_plugins"]["lazyfs"]["address"] == DEFAULT_ADDRESS
    cri = dumped["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == "lazyfs" and cri["disable_snapshot_annotations"] is False
