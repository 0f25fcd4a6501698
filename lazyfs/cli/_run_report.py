"""The report `lazyfs run` prints after the command: time to exit, and what each layer cost."""

from __future__ import annotations

from lazyfs.container.report import LayerReport, RunReport
from lazyfs.sizes import human_size


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _chunks(fetched: int | None, count: int | None) -> str:
    if fetched is None or count is None:
        return "all (whole blob)"
    return f"{fetched} of {count} ({_share(fetched, count)})"


def format_report(report: RunReport) -> str:
    """The report as text: a summary line, then a table with a row per layer and a total."""
    lines = [
        f"lazyfs run: {report.mode}: exit code {report.exit_code}, {report.total_s:.3f} s from "
        f"start to exit (mounted after {report.mounted_s:.3f} s, command {report.command_s:.3f} "
        "s)",
        f"  {'layer':<14} {'blob':>10} {'fetched':>10} {'requests':>9}  {'chunks fetched':<20} "
        f"{'bytes fetched':>13}",
    ]
    rows = list(report.layers)
    if len(rows) > 1:
        counted = [row for row in rows if row.chunk_count is not None]
        rows.append(
            LayerReport(
                "all layers",
                "",
                sum(row.blob_size for row in rows),
                sum(row.bytes_fetched for row in rows),
                sum(row.requests for row in rows),
                sum(row.chunks_fetched or 0 for row in counted) if counted else None,
                sum(row.chunk_count or 0 for row in counted) if counted else None,
            )
        )
    for row in rows:
        lines.append(
            f"  {row.name:<14} {human_size(row.blob_size):>10} {human_size(row.bytes_fetched):>10}"
            f" {row.requests:>9}  {_chunks(row.chunks_fetched, row.chunk_count):<20} "
            f"{_share(row.bytes_fetched, row.blob_size):>13}"
        )
    return "\n".join(lines) + "\n"
