"""`write_png`: the same charts as the HTML report, as PNG images (matplotlib, Agg).

matplotlib is imported here, lazily, only when PNGs are asked for (the `report` extra).
One `<node>.png` per node (CPU, disk busy, disk MB/s, network MB/s, GPU on a shared
time axis, preemptions marked) and `fleet.png` (where the time went).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fleet.errors import DependencyError
from fleet.report.model import NodeReport, Report
from fleet.report.svg import COLORS, TIME_COLORS


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise DependencyError(
            "PNG charts need matplotlib", hint="pip install 'fleet-batch[report]' (or matplotlib)"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "node"


def _gaps_to_nan(
    ts: tuple[float, ...], values: tuple[Any, ...], gap: float
) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for i, (t, v) in enumerate(zip(ts, values)):
        if i and t - ts[i - 1] > gap:
            xs.append((t + ts[i - 1]) / 2)
            ys.append(float("nan"))
        xs.append(t)
        ys.append(float("nan") if v is None else float(v))
    return xs, ys


def _node_figure(plt: Any, node: NodeReport, t0: float, t1: float) -> Any:
    series = node.series
    gap = max(2.5 * series.interval, 3.0)
    fig, axes = plt.subplots(5, 1, figsize=(11, 8), sharex=True)
    rel = tuple(t - t0 for t in series.t)
    user = series.cpu_user
    system = tuple(u + s for u, s in zip(user, series.cpu_system))
    iowait = tuple(s + w for s, w in zip(system, series.cpu_iowait))
    for upper, lower, color, label in (
        (user, None, COLORS["user"], "user"),
        (system, user, COLORS["system"], "system"),
        (iowait, system, COLORS["iowait"], "iowait"),
    ):
        xs, ys = _gaps_to_nan(rel, upper, gap)
        _, ys_low = _gaps_to_nan(rel, lower if lower is not None else tuple(0.0 for _ in upper), gap)
        axes[0].fill_between(xs, ys_low, ys, color=color, alpha=0.8, label=label, linewidth=0)
    axes[0].set_ylim(0, 100)
    axes[0].set_ylabel("CPU %")
    axes[0].legend(loc="upper right", fontsize=7, ncol=3)
    for ax, values, color, label, limit in (
        (axes[1], series.disk_busy, COLORS["disk_busy"], "disk busy %", 100.0),
        (axes[2], series.disk_mb_s, COLORS["disk_mb_s"], "disk MB/s", None),
        (axes[3], series.net_mb_s, COLORS["net_mb_s"], "net MB/s", None),
    ):
        xs, ys = _gaps_to_nan(rel, values, gap)
        ax.fill_between(xs, 0, ys, color=color, alpha=0.55, linewidth=1)
        ax.set_ylabel(label)
        ax.set_ylim(0, limit if limit else max(max(values, default=0.0) * 1.1, 1.0))
    if series.gpu_util:
        for i, values in enumerate(series.gpu_util):
            xs, ys = _gaps_to_nan(rel, values, gap)
            axes[4].plot(xs, ys, color=COLORS["gpu"][i % len(COLORS["gpu"])], label=f"GPU {i}", linewidth=1.3)
        axes[4].legend(loc="upper right", fontsize=7, ncol=min(8, len(series.gpu_util)))
    else:
        axes[4].text(
            0.5, 0.5, "no GPU", transform=axes[4].transAxes, ha="center", va="center", color="#9ca3af"
        )
    axes[4].set_ylim(0, 100)
    axes[4].set_ylabel("GPU %")
    axes[4].set_xlim(0, max(t1 - t0, 1.0))
    axes[4].set_xlabel("seconds since the job's first record")
    for event in node.events:
        if event.kind == "preempted":
            for ax in axes:
                ax.axvline(event.t - t0, color=COLORS["preempted"], linestyle="--", linewidth=1.8)
            axes[0].annotate(
                "preempted",
                (event.t - t0, 100),
                color=COLORS["preempted"],
                fontsize=8,
                xytext=(3, -10),
                textcoords="offset points",
            )
        else:
            for ax in axes:
                ax.axvline(event.t - t0, color=COLORS["event"], linestyle=":", linewidth=0.8)
    for t, what in node.worker_marks:
        axes[4].plot([t - t0], [0], marker="^", color=COLORS.get(what.split()[0], "#6b7280"), clip_on=False)
    fig.suptitle(f"{node.name}: {node.verdict.kind}", fontsize=12)
    fig.tight_layout()
    return fig


def _fleet_figure(plt: Any, report: Report) -> Any:
    fig, ax = plt.subplots(figsize=(11, 2.2))
    left = 0.0
    for key, color in TIME_COLORS.items():
        value = max(0.0, report.time.get(key, 0.0))
        ax.barh(
            [0], [value / 3600.0], left=[left], color=color, edgecolor="#9ca3af", label=key.replace("_", " ")
        )
        left += value / 3600.0
    ax.set_yticks([])
    ax.set_xlabel("node-hours")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=7, fontsize=8)
    ax.set_title(f"{report.job}: {report.fleet.verdict.kind} (where the time went)")
    fig.tight_layout()
    return fig


def write_png(report: Report, directory: Path) -> list[Path]:
    """One PNG per node plus fleet.png in `directory`; returns the files written."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    t0 = report.start if report.start is not None else 0.0
    t1 = report.end if report.end is not None else t0 + 1.0
    written = []
    for node in report.nodes:
        fig = _node_figure(plt, node, t0, t1)
        path = directory / f"{_safe(node.name)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    fig = _fleet_figure(plt, report)
    path = directory / "fleet.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written
