"""The report in a terminal: one row per node plus a fleet row, then verdicts with
their evidence and advice, where the time went, cost and what is missing."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleet.report.model import STAGES, Report
from fleet.report.stats import Stat

VERDICT_STYLE = {
    "gpu-bound": "green",
    "cpu-bound": "yellow",
    "disk-bound": "red",
    "network-bound": "magenta",
    "starved": "bright_red",
    "idle": "dim",
}
TIME_LABELS = (
    ("provisioning", "provisioning"),
    ("setup", "setup"),
    ("mounting", "mounting"),
    ("compute", "useful compute"),
    ("waiting", "waiting"),
    ("lost_to_preemption", "lost to preemption"),
    ("idle", "idle"),
)


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair(stat: Stat | None, digits: int = 0) -> str:
    if stat is None or stat.mean is None:
        return "-"
    return f"{stat.mean:.{digits}f}/{_f(stat.p95, digits)}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def _verdict(kind: str) -> Text:
    return Text(kind, style=VERDICT_STYLE.get(kind, ""))


def render_terminal(report: Report, console: Console) -> None:
    """Print the whole report to `console` (a rich Console; plain text when not a TTY)."""
    console.print(f"[bold]job {report.job}[/bold]  ({report.status}, {len(report.nodes)} node(s))")
    table = Table(title="per node: mean/p95", title_justify="left", show_lines=False)
    for column, justify in (
        ("node", "left"),
        ("verdict", "left"),
        ("cpu %", "right"),
        ("iowait %", "right"),
        ("disk busy %", "right"),
        ("disk MB/s", "right"),
        ("net MB/s", "right"),
        ("gpu %", "right"),
        ("gpu mem %", "right"),
        ("read/wait/compute/write %", "right"),
        ("items/s", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for node in report.nodes:
        stages = (
            "/".join(_f(node.stages.get(s)) for s in STAGES)
            if node.stages.get("compute") is not None
            else "-"
        )
        table.add_row(
            node.name,
            _verdict(node.verdict.kind),
            _pair(node.stats.get("cpu_busy")),
            _pair(node.stats.get("iowait")),
            _pair(node.stats.get("disk_busy")),
            _pair(node.stats.get("disk_mb_s"), 1),
            _pair(node.stats.get("net_mb_s"), 1),
            _pair(node.stats.get("gpu_util")),
            _pair(node.stats.get("gpu_mem")),
            stages,
            _f(node.items_s, 1),
        )
    fleet = report.fleet
    fleet_stages = (
        "/".join(_f(fleet.stages.get(s)) for s in STAGES) if fleet.stages.get("compute") is not None else "-"
    )
    table.add_section()
    table.add_row(
        Text("fleet", style="bold"),
        _verdict(fleet.verdict.kind),
        _f(fleet.stats.get("cpu_busy")),
        _f(fleet.stats.get("iowait")),
        _f(fleet.stats.get("disk_busy")),
        _f(fleet.stats.get("disk_mb_s"), 1),
        _f(fleet.stats.get("net_mb_s"), 1),
        _f(fleet.stats.get("gpu_util")),
        _f(fleet.stats.get("gpu_mem")),
        fleet_stages,
        _f(fleet.items_s, 1),
    )
    console.print(table)

    console.print("[bold]verdicts[/bold]")
    for node in report.nodes:
        line = Text(f"  {node.name}: ")
        line.append_text(_verdict(node.verdict.kind))
        line.append(f"  ({'; '.join(node.verdict.evidence)})")
        console.print(line)
        console.print(f"    -> {node.verdict.recommendation}", highlight=False)
        for note in node.verdict.notes:
            console.print(f"    note: {note}", highlight=False)
        if node.missing:
            console.print(f"    [yellow]missing:[/yellow] {'; '.join(node.missing)}", highlight=False)
    line = Text("  fleet: ", style="bold")
    line.append_text(_verdict(fleet.verdict.kind))
    line.append(f"  ({'; '.join(fleet.verdict.evidence)})")
    console.print(line)
    console.print(f"    -> {fleet.verdict.recommendation}", highlight=False)

    items = f"{fleet.items} item(s) done"
    if fleet.items_total:
        items += f" of {fleet.items_total}"
    if fleet.items_failed:
        items += f", {fleet.items_failed} failed"
    console.print(
        f"[bold]where the time went[/bold] ({_duration(report.time.get('node_seconds', 0.0))} "
        f"node time over {_duration(report.time.get('wall', 0.0))}; {items})"
    )
    total = report.time.get("node_seconds", 0.0) or 1.0
    for key, label in TIME_LABELS:
        seconds = report.time.get(key, 0.0)
        console.print(
            f"  {label:<20} {_duration(seconds):>10}  {100 * seconds / total:5.1f}%", highlight=False
        )

    cost = report.cost
    text = f"[bold]cost[/bold]  {cost['node_hours']:.2f} node-hours"
    if cost.get("usd") is not None:
        text += f", ${cost['usd']:.2f}"
        if cost.get("usd_per_1000_items") is not None:
            text += f", ${cost['usd_per_1000_items']:.4f} per 1,000 items"
        if cost.get("unpriced_nodes"):
            text += f" (no price for {', '.join(cost['unpriced_nodes'])})"
    else:
        text += " (no prices known)"
    console.print(text, highlight=False)
    for note in report.notes:
        console.print(f"[dim]note: {note}[/dim]", highlight=False)
