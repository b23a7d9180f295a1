"""Inline SVG charts, drawn by hand so that the HTML report needs nothing but a browser.

`node_timeline` draws one node's CPU, disk, network and GPU as stacked panels on a time
axis shared by every node of the report (t0..t1), with events, worker starts/stops and
preemptions marked. `time_bar` draws where the fleet's time went as one stacked bar.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

from fleet.report.model import NodeReport

WIDTH = 960
LEFT = 118
RIGHT = 16
PANEL_H = 64
GAP = 20
TOP = 30
COLORS = {
    "user": "#3b82f6",
    "system": "#f59e0b",
    "iowait": "#ef4444",
    "disk_busy": "#8b5cf6",
    "disk_mb_s": "#0ea5e9",
    "net_mb_s": "#10b981",
    "gpu": ("#16a34a", "#dc2626", "#2563eb", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f"),
    "preempted": "#dc2626",
    "event": "#9ca3af",
    "start": "#16a34a",
    "stop": "#2563eb",
    "lost": "#dc2626",
}
TIME_COLORS = {
    "provisioning": "#94a3b8",
    "setup": "#64748b",
    "mounting": "#a78bfa",
    "compute": "#16a34a",
    "waiting": "#f59e0b",
    "lost_to_preemption": "#dc2626",
    "idle": "#e5e7eb",
}


def _fmt(value: float) -> str:
    """A scale label with two significant digits: 0.013, 0.2, 3.5, 160."""
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.2g}"


class _Axis:
    def __init__(self, t0: float, t1: float) -> None:
        self.t0 = t0
        self.t1 = t1 if t1 > t0 else t0 + 1.0
        self.x0 = LEFT
        self.x1 = WIDTH - RIGHT

    def x(self, t: float) -> float:
        return self.x0 + (t - self.t0) / (self.t1 - self.t0) * (self.x1 - self.x0)


def _segments(
    ts: Sequence[float], values: Sequence[float | None], gap: float
) -> list[list[tuple[float, float]]]:
    """Runs of consecutive points, broken where a value is missing or samples stop."""
    runs: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []
    last_t: float | None = None
    for t, value in zip(ts, values):
        if value is None or (last_t is not None and t - last_t > gap):
            if current:
                runs.append(current)
            current = []
        if value is not None:
            current.append((t, value))
        last_t = t
    if current:
        runs.append(current)
    return runs


def _line(
    axis: _Axis,
    y0: float,
    height: float,
    vmax: float,
    runs: list[list[tuple[float, float]]],
    color: str,
    fill: bool,
) -> str:
    parts = []
    for run in runs:
        points = [(axis.x(t), y0 + height - min(v, vmax) / vmax * height) for t, v in run]
        if len(points) == 1:
            x, y = points[0]
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.5" fill="{color}"/>')
            continue
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        if fill:
            base = y0 + height
            parts.append(
                f'<polygon points="{points[0][0]:.1f},{base:.1f} {path} {points[-1][0]:.1f},{base:.1f}" '
                f'fill="{color}" fill-opacity="0.55" stroke="{color}" stroke-width="1"/>'
            )
        else:
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    return "".join(parts)


def _stacked(
    axis: _Axis,
    y0: float,
    height: float,
    ts: Sequence[float],
    layers: Sequence[tuple[str, Sequence[float]]],
    gap: float,
) -> str:
    """Stacked areas (CPU user + system + iowait): each layer drawn from the sum below it."""
    parts = []
    cumulative = [0.0] * len(ts)
    for color, values in layers:
        lower = list(cumulative)
        cumulative = [c + v for c, v in zip(cumulative, values)]
        for run_indexes in _index_runs(ts, gap):
            top = [
                (axis.x(ts[i]), y0 + height - min(cumulative[i], 100.0) / 100.0 * height) for i in run_indexes
            ]
            bottom = [
                (axis.x(ts[i]), y0 + height - min(lower[i], 100.0) / 100.0 * height)
                for i in reversed(run_indexes)
            ]
            if len(top) < 2:
                continue
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in top + bottom)
            parts.append(f'<polygon points="{points}" fill="{color}" fill-opacity="0.8" stroke="none"/>')
    return "".join(parts)


def _index_runs(ts: Sequence[float], gap: float) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, t in enumerate(ts):
        if not runs or t - ts[i - 1] > gap:
            runs.append([])
        runs[-1].append(i)
    return runs


def _frame(axis: _Axis, y0: float, height: float, label: str, top_label: str) -> str:
    return (
        f'<rect x="{axis.x0}" y="{y0}" width="{axis.x1 - axis.x0}" height="{height}" fill="#f9fafb" '
        f'stroke="#d1d5db"/>'
        f'<text x="{axis.x0 - 6}" y="{y0 + height / 2 + 4}" text-anchor="end" font-size="11" '
        f'fill="#374151">{escape(label)}</text>'
        f'<text x="{axis.x0 - 6}" y="{y0 + 9}" text-anchor="end" font-size="9" fill="#6b7280">{escape(top_label)}</text>'
    )


def _time_ticks(axis: _Axis, y: float, labels: bool = True) -> str:
    span = axis.t1 - axis.t0
    step = next(
        (
            s
            for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400)
            if span / s <= 8
        ),
        86400.0,
    )
    parts = []
    tick = axis.t0 - (axis.t0 % step) + step
    while tick < axis.t1:
        x = axis.x(tick)
        label = time.strftime("%H:%M:%S", time.gmtime(tick))
        parts.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="#6b7280"/>')
        if labels:
            parts.append(
                f'<text x="{x:.1f}" y="{y + 14}" text-anchor="middle" font-size="9" fill="#6b7280">{label}</text>'
            )
        tick += step
    return "".join(parts)


def node_timeline(node: NodeReport, t0: float, t1: float) -> str:
    """One SVG: CPU %, disk busy %, disk MB/s, network MB/s, GPU % of one node."""
    axis = _Axis(t0, t1)
    series = node.series
    gap = max(2.5 * series.interval, 3.0)
    panels: list[tuple[str, str, str]] = []  # (label, top label, body)
    y = TOP
    body = _stacked(
        axis,
        y,
        PANEL_H,
        series.t,
        [
            (COLORS["user"], series.cpu_user),
            (COLORS["system"], series.cpu_system),
            (COLORS["iowait"], series.cpu_iowait),
        ],
        gap,
    )
    panels.append(("CPU %", "100", body))
    panels.append(
        (
            "disk busy %",
            "100",
            _line(
                axis,
                y + (PANEL_H + GAP),
                PANEL_H,
                100.0,
                _segments(series.t, series.disk_busy, gap),
                COLORS["disk_busy"],
                True,
            ),
        )
    )
    disk_max = max(series.disk_mb_s, default=0.0) or 1.0
    panels.append(
        (
            "disk MB/s",
            _fmt(disk_max),
            _line(
                axis,
                y + 2 * (PANEL_H + GAP),
                PANEL_H,
                disk_max,
                _segments(series.t, series.disk_mb_s, gap),
                COLORS["disk_mb_s"],
                True,
            ),
        )
    )
    net_max = max(series.net_mb_s, default=0.0) or 1.0
    panels.append(
        (
            "network MB/s",
            _fmt(net_max),
            _line(
                axis,
                y + 3 * (PANEL_H + GAP),
                PANEL_H,
                net_max,
                _segments(series.t, series.net_mb_s, gap),
                COLORS["net_mb_s"],
                True,
            ),
        )
    )
    gpu_y = y + 4 * (PANEL_H + GAP)
    if series.gpu_util:
        gpu_body = "".join(
            _line(
                axis,
                gpu_y,
                PANEL_H,
                100.0,
                _segments(series.t, values, gap),
                COLORS["gpu"][i % len(COLORS["gpu"])],
                False,
            )
            for i, values in enumerate(series.gpu_util)
        )
        legend = "".join(
            f'<text x="{axis.x1 - 4 - 44 * (len(series.gpu_util) - 1 - i)}" y="{gpu_y - 4}" text-anchor="end" '
            f'font-size="9" fill="{COLORS["gpu"][i % len(COLORS["gpu"])]}">GPU {i}</text>'
            for i in range(len(series.gpu_util))
        )
        panels.append(("GPU util %", "100", gpu_body + legend))
    else:
        panels.append(
            (
                "GPU util %",
                "",
                (
                    f'<text x="{(axis.x0 + axis.x1) / 2}" y="{gpu_y + PANEL_H / 2 + 4}" '
                    f'text-anchor="middle" font-size="11" fill="#9ca3af">'
                    f"{'no GPU' if series.t else 'no samples'}</text>"
                ),
            )
        )
    if not series.t:
        for index in range(len(panels) - 1):
            label, top_label, _ = panels[index]
            py = TOP + index * (PANEL_H + GAP)
            panels[index] = (
                label,
                top_label,
                (
                    f'<text x="{(axis.x0 + axis.x1) / 2}" y="{py + PANEL_H / 2 + 4}" '
                    f'text-anchor="middle" font-size="11" fill="#9ca3af">no samples</text>'
                ),
            )
    height = TOP + len(panels) * (PANEL_H + GAP) + 6
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" role="img" '
            f'aria-label="timeline of {escape(node.name)}">'
        )
    ]
    for index, (label, top_label, panel_body) in enumerate(panels):
        py = TOP + index * (PANEL_H + GAP)
        parts.append(_frame(axis, py, PANEL_H, label, top_label))
        parts.append(panel_body)
        parts.append(_time_ticks(axis, py + PANEL_H, labels=index == len(panels) - 1))
    bottom = TOP + len(panels) * (PANEL_H + GAP) - GAP
    label_x = float("-inf")
    row = 0
    for event in node.events:
        if not t0 <= event.t <= t1:
            continue
        x = axis.x(event.t)
        if event.kind == "preempted":
            parts.append(
                f'<line x1="{x:.1f}" y1="{TOP - 8}" x2="{x:.1f}" y2="{bottom}" stroke="{COLORS["preempted"]}" '
                f'stroke-width="2" stroke-dasharray="5,3"/>'
                f'<text x="{x + 3:.1f}" y="{TOP - 10}" font-size="10" font-weight="bold" '
                f'fill="{COLORS["preempted"]}">preempted</text>'
            )
        else:
            row = (row + 1) % 3 if x - label_x < 50 else 0  # labels of close events on three rows
            label_x = x
            parts.append(
                f'<line x1="{x:.1f}" y1="{TOP - 9 * row}" x2="{x:.1f}" y2="{bottom}" stroke="{COLORS["event"]}" '
                f'stroke-width="1" stroke-dasharray="2,3"><title>{escape(event.kind)} {escape(event.detail)}'
                f"</title></line>"
                f'<text x="{x + 2:.1f}" y="{TOP - 2 - 9 * row}" font-size="8" fill="#6b7280">'
                f"{escape(event.kind)}</text>"
            )
    for t, what in node.worker_marks:
        if not t0 <= t <= t1:
            continue
        kind = what.split()[0]
        x = axis.x(t)
        parts.append(
            f'<path d="M{x - 4:.1f},{bottom + 4} L{x + 4:.1f},{bottom + 4} L{x:.1f},{bottom - 3} Z" '
            f'fill="{COLORS.get(kind, "#6b7280")}"><title>worker {escape(what)}</title></path>'
        )
    parts.append("</svg>")
    return "".join(parts)


def time_bar(time_totals: dict[str, float]) -> str:
    """Where the fleet's node time went, as one horizontal stacked bar with a legend."""
    keys = list(TIME_COLORS)
    total = sum(max(0.0, time_totals.get(k, 0.0)) for k in keys)
    height = 64
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'font-family="sans-serif" role="img" aria-label="where the time went">'
        )
    ]
    x = 10.0
    bar_width = WIDTH - 20
    if total <= 0:
        parts.append(
            f'<rect x="10" y="8" width="{bar_width}" height="24" fill="#f3f4f6" stroke="#d1d5db"/>'
            f'<text x="{WIDTH / 2}" y="25" text-anchor="middle" font-size="11" fill="#6b7280">no time recorded</text>'
        )
    for key in keys:
        value = max(0.0, time_totals.get(key, 0.0))
        if total <= 0 or value <= 0:
            continue
        width = value / total * bar_width
        parts.append(
            f'<rect x="{x:.1f}" y="8" width="{width:.1f}" height="24" fill="{TIME_COLORS[key]}">'
            f"<title>{key}: {value:.0f} s</title></rect>"
        )
        x += width
    legend_x = 10.0
    for key in keys:
        share = (100.0 * max(0.0, time_totals.get(key, 0.0)) / total) if total else 0.0
        label = f"{key.replace('_', ' ')} {share:.0f}%"
        parts.append(
            f'<rect x="{legend_x:.0f}" y="42" width="10" height="10" fill="{TIME_COLORS[key]}" stroke="#9ca3af"/>'
            f'<text x="{legend_x + 14:.0f}" y="51" font-size="10" fill="#374151">{escape(label)}</text>'
        )
        legend_x += 20 + 6.2 * len(label)
    parts.append("</svg>")
    return "".join(parts)
