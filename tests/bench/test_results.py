"""What `lazyfs bench` makes of its runs: the figures of a run from `lazyfs run`'s report,
the summary per mode with ratios against eager, the JSON and CSV files, the plot, and the
message when matplotlib is missing."""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from lazyfs.bench.plot import PlotError, check_plot_file, plot_bench
from lazyfs.bench.results import (
    CSV_ENVIRONMENT_COLUMNS,
    CSV_RUN_COLUMNS,
    SCHEMA,
    Environment,
    LayerInfo,
    RunResult,
    document,
    median_run,
    result_of_report,
    summarize,
    write_csv,
)
from lazyfs.bench.trace import TraceEvent
from lazyfs.cli.bench import format_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def report(total_s: float, fetched: int, *, eager: bool = False) -> dict[str, object]:
    layer = {"name": "aaa", "digest": "sha256:" + "a" * 64, "blob_size": 4000,
             "bytes_fetched": fetched, "requests": 1 if eager else 3,
             "chunks_fetched": None if eager else 2, "chunk_count": None if eager else 8,
             "chunks_from_disk": 0}
    return {"mode": "eager" if eager else "lazy", "image": "h/r:t@sha256:" + "b" * 64,
            "platform": "linux/amd64", "exit_code": 0, "mounted_s": total_s / 2,
            "command_s": total_s / 2, "total_s": total_s, "layers": [layer],
            "phases": {} if eager else {"cli_start_s": 0.25, "daemon_start_s": 0.05,
                                        "metadata_s": 0.1}}


def environment() -> Environment:
    return Environment(
        lazyfs_version="0.1.0", image="h/r:t", reference="127.0.0.1:1/r:t",
        image_digest="sha256:" + "b" * 64, platform="linux/amd64",
        layers=(LayerInfo("aaa", "sha256:" + "a" * 64, 4000, 524288, 8),),
        command=("sh", "-c", "true"), modes=("lazy", "eager"), repeat=3,
        link={"rtt_ms": 20.0, "rate_mbit": 100.0}, prefetch_list=None,
        page_cache_dropped=True, kernel="6.1.0", machine="x86_64", python="3.11.2",
        cpu_count=2, started_at="2026-01-01T00:00:00.000+00:00")


def results() -> list[RunResult]:
    runs = []
    order = 0
    for number, (lazy_s, eager_s) in enumerate(((1.0, 4.0), (1.2, 3.0), (0.8, 5.0)), start=1):
        for mode, total in (("lazy", lazy_s), ("eager", eager_s)):
            order += 1
            data = report(total, 1000 if mode == "lazy" else 4000, eager=mode == "eager")
            runs.append(result_of_report(data, mode, number, order, "2026-01-01T00:00:00Z"))
    return runs


def test_a_run_from_its_report() -> None:
    lazy = result_of_report(report(1.0, 1000), "lazy", 2, 5, "now")
    assert (lazy.mode, lazy.run, lazy.order, lazy.exit_code) == ("lazy", 2, 5, 0)
    assert (lazy.bytes_fetched, lazy.requests, lazy.chunks_fetched) == (1000, 3, 2)
    assert lazy.trace_offset_s == pytest.approx(0.3)  # the command's start-up, then the fork
    eager = result_of_report(report(3.0, 4000, eager=True), "eager", 1, 1, "now")
    assert eager.chunks_fetched is None and eager.trace_offset_s is None
    with pytest.raises(KeyError):
        result_of_report({"exit_code": 0}, "lazy", 1, 1, "now")


def test_summary_per_mode_with_ratios_against_eager() -> None:
    lazy, eager = summarize(results(), ("lazy", "eager", "warm"))
    assert lazy.mode == "lazy" and lazy.runs == 3
    assert (lazy.total_s.median, lazy.total_s.min, lazy.total_s.max) == (1.0, 0.8, 1.2)
    assert lazy.mounted_s.median == 0.5 and lazy.requests.median == 3
    assert lazy.speedup == pytest.approx(4.0) and lazy.bytes_share == pytest.approx(0.25)
    assert eager.speedup == pytest.approx(1.0)
    assert summarize(results(), ("lazy",))[0].speedup is None
    median = median_run(results(), "lazy")
    assert median is not None and median.total_s == 1.0 and median.run == 1


def test_json_document_and_csv(tmp_path: Path) -> None:
    data = json.loads(json.dumps(document(environment(), results())))
    assert data["schema"] == SCHEMA
    assert set(data) == {"schema", "environment", "runs", "summary"}
    env = data["environment"]
    assert env["chunk_size"] == 524288 and env["link"] == {"rtt_ms": 20.0, "rate_mbit": 100.0}
    assert env["kernel"] == "6.1.0" and env["lazyfs_version"] == "0.1.0"
    assert [run["order"] for run in data["runs"]] == [1, 2, 3, 4, 5, 6]
    assert set(data["summary"]) == {"lazy", "eager"}
    assert data["summary"]["lazy"]["total_s"] == {"median": 1.0, "min": 0.8, "max": 1.2}
    out = tmp_path / "runs.csv"
    write_csv(out, environment(), results())
    with open(out, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 6
    assert list(rows[0]) == [*CSV_RUN_COLUMNS, *CSV_ENVIRONMENT_COLUMNS]
    assert rows[0]["mode"] == "lazy" and float(rows[1]["total_s"]) == 4.0
    assert rows[1]["chunks_fetched"] == "" and rows[0]["link_rtt_ms"] == "20.0"
    assert rows[0]["command"] == "sh -c true" and rows[0]["chunk_size"] == "524288"


def test_table() -> None:
    table = format_table(environment(), summarize(results(), ("lazy", "eager")))
    lines = table.splitlines()
    assert lines[0].startswith("lazyfs bench: h/r:t (sha256:bbbbbbbbbbbb…, linux/amd64, "
                               "1 layer, 512.0 KiB chunks)")
    assert "link 20 ms RTT, 100 Mbit/s; 3 runs per mode" in lines[1]
    lazy = lines[3].split()
    assert lazy[0] == "lazy" and lazy[1:3] == ["1.00", "s"] and lazy[-2:] == ["4.0x", "25%"]
    assert lines[4].split()[-2:] == ["1.0x", "100%"]


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("matplotlib")
    runs = results()
    lazy = median_run(runs, "lazy")
    assert lazy is not None
    trace = [TraceEvent(0.05 * index, "aaa", index, "fetch", 250) for index in range(4)]
    out = tmp_path / f"bench{suffix}"
    plot_bench(str(out), environment(), runs, {lazy.order: trace})
    if suffix == ".png":
        assert out.read_bytes().startswith(PNG_SIGNATURE)
    else:
        assert ElementTree.parse(out).getroot().tag.endswith("svg")


def test_without_matplotlib_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    with pytest.raises(PlotError, match=r"^plots need matplotlib: pip install 'lazyfs\[plot\]'$"):
        check_plot_file("out.png")
    with pytest.raises(PlotError, match=r"written as \.png or \.svg"):
        check_plot_file("out.pdf")
