"""`lazyfs trace summary` and `lazyfs trace plot`: what a --trace file holds, counted and
drawn (`lazyfs.bench.trace`), on traces written by the mount's own TraceWriter."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from lazyfs.bench.trace import (
    TraceError,
    fetched_over_time,
    heat_strip,
    parse_trace,
    quantile,
    read_trace,
    summarize,
)
from lazyfs.layer.stats import TraceWriter

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_trace(path: Path) -> None:
    """A trace as a mount writes it: two layers, fetches, hits, a disk load, a bad chunk."""
    stream = io.StringIO()
    writer = TraceWriter(stream, started=0.0)
    records = [
        ("base", 0, "fetch", {"reason": "read", "bytes": 1000, "latency_ms": 20.0}),
        ("base", 0, "hit", {}),
        ("base", 9, "fetch", {"reason": "read", "bytes": 3000, "latency_ms": 40.0}),
        ("base", 10, "fetch", {"reason": "readahead", "bytes": 2000, "latency_ms": 60.0}),
        ("app", 1, "disk", {"bytes": 500}),
        ("app", 1, "hit", {}),
        ("app", 1, "hit", {}),
        ("base", 9, "hit", {}),
        ("app", 2, "bad", {}),
    ]
    for layer, chunk, event, extra in records:
        writer.record(layer=layer, chunk=chunk, event=event, **extra)
    lines = stream.getvalue().splitlines(keepends=True)
    # Rewrite the times so that the test does not depend on the clock: 0.1 s apart.
    fixed = []
    for number, line in enumerate(lines):
        record = json.loads(line)
        record["t"] = round(0.1 * (number + 1), 3)
        fixed.append(json.dumps(record) + "\n")
    path.write_text("".join(fixed))


def lazyfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazyfs", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_summary_counts_each_layer_and_all(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_trace(trace)
    summary = summarize(read_trace(trace))
    base, app = summary.layers
    assert (base.layer, app.layer) == ("base", "app")
    assert base.events == {"hit": 2, "fetch": 3} and app.events == {"hit": 2, "disk": 1, "bad": 1}
    assert base.bytes_fetched == 6000 and app.bytes_from_disk == 500
    assert base.fetches_by_reason == {"read": 2, "readahead": 1}
    assert base.bytes_by_reason == {"read": 4000, "readahead": 2000}
    assert base.latency_ms == {"p50": 40.0, "p90": 56.0, "p99": 59.6, "max": 60.0}
    assert app.latency_ms["p50"] is None
    assert base.chunks_touched == 3 and base.chunks_seen == 11
    assert base.hottest[:2] == [(0, 2), (9, 2)]
    assert len(base.heat) == 11 and sum(base.heat) == base.accesses == 5
    assert summary.total.accesses == 9 and summary.total.bytes_fetched == 6000
    assert (summary.total.first_t, summary.total.last_t) == (0.1, 0.9)


def test_fetched_over_time_is_cumulative_per_layer(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_trace(trace)
    series = fetched_over_time(read_trace(trace))
    assert series["base"] == ([0.1, 0.1, 0.3, 0.4], [0, 1000, 4000, 6000])
    assert series["app"] == ([0.1], [0])


def test_quantiles_and_heat_strip() -> None:
    assert quantile([], 0.5) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert heat_strip([0, 1, 10]) == " .@"
    assert heat_strip([0, 0]) == "  "


def test_parse_rejects_what_is_no_trace_but_a_cut_last_line() -> None:
    good = '{"t":0.1,"layer":"a","chunk":1,"event":"hit"}\n'
    assert len(parse_trace([good, '{"t":0.2,"layer":"a","ch'])) == 1  # being written
    with pytest.raises(TraceError, match="line 2: not JSON"):
        parse_trace([good, "garbage\n", good])
    with pytest.raises(TraceError, match="line 1: not a chunk access"):
        parse_trace(['{"t": 1}\n'])
    with pytest.raises(TraceError, match="line 1: not a chunk access"):
        parse_trace(['[1, 2]\n'])


def test_summary_command(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_trace(trace)
    result = lazyfs("trace", "summary", str(trace))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{trace}: 9 chunk accesses, 2 layers, from 0.100 s to 0.900 s"
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["base"][1:8] == ["5", "2", "3", "0", "0", "3", "5.9"]
    assert rows["all"][2] == "9"
    assert "fetches by reason: read 2 (3.9 KiB), readahead 1 (2.0 KiB)" in result.stdout
    assert "hottest: chunk 0 (2), chunk 9 (2), chunk 10 (1)" in result.stdout
    as_json = lazyfs("trace", "summary", "--json", str(trace))
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert [layer["layer"] for layer in data["layers"]] == ["base", "app"]
    assert data["total"]["bytes_fetched"] == 6000


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_command_writes_a_readable_file(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("matplotlib")
    trace, out = tmp_path / "trace.jsonl", tmp_path / f"trace{suffix}"
    write_trace(trace)
    result = lazyfs("trace", "plot", str(trace), str(out))
    assert result.returncode == 0, result.stderr
    if suffix == ".png":
        assert out.read_bytes().startswith(PNG_SIGNATURE)
    else:
        assert ElementTree.parse(out).getroot().tag.endswith("svg")


def test_bad_files_are_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_text("not a trace\n")
    empty = tmp_path / "empty"
    empty.write_text("")
    for args, message in (
        (["summary", str(tmp_path / "missing")], "No such file or directory"),
        (["summary", str(garbage)], "line 1: not JSON"),
        (["summary", str(empty)], "no chunk accesses"),
        (["plot", str(garbage), str(tmp_path / "out.gif")], "written as .png or .svg"),
    ):
        result = lazyfs("trace", *args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr
