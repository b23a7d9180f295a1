"""`write_html`: the report as ONE self-contained HTML file (inline CSS and SVG, no
script, nothing fetched from a network), rendered with jinja2 (autoescaped)."""

from __future__ import annotations

import time
from pathlib import Path

import jinja2
from markupsafe import Markup

from fleet.report.model import STAGES, Report
from fleet.report.stats import Stat
from fleet.report.svg import COLORS, node_timeline, time_bar
from fleet.report.terminal import TIME_LABELS

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fleet report: {{ r.job }}</title>
<style>
body { font-family: sans-serif; margin: 24px; color: #111827; max-width: 1000px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
h3 { font-size: 15px; margin: 20px 0 4px; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 3px 7px; text-align: right; }
th:first-child, td:first-child, td.l { text-align: left; }
.v { font-weight: bold; padding: 1px 6px; border-radius: 4px; color: white; white-space: nowrap; }
.v-gpu-bound { background: #16a34a; } .v-cpu-bound { background: #d97706; }
.v-disk-bound { background: #dc2626; } .v-network-bound { background: #9333ea; }
.v-starved { background: #e11d48; } .v-idle { background: #9ca3af; }
.box { border: 1px solid #d1d5db; border-radius: 6px; padding: 10px 14px; background: #f9fafb; }
.missing { color: #b45309; } .muted { color: #6b7280; font-size: 12px; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
</style></head><body>
<h1>fleet report: {{ r.job }}</h1>
<div class="muted">{{ r.status }} · {{ r.nodes|length }} node(s) · {{ span }} · generated {{ generated }}</div>
<h2>Verdict</h2>
<div class="box"><span class="v v-{{ r.fleet.verdict.kind }}">{{ r.fleet.verdict.kind }}</span>
 {{ r.fleet.verdict.evidence|join("; ") }}<br><b>What to change:</b> {{ r.fleet.verdict.recommendation }}<br>
 <span class="muted">{{ items }}</span></div>
<h2>Per node (mean / p95)</h2>
<table><tr><th>node</th><th>verdict</th><th>CPU %</th><th>iowait %</th><th>disk busy %</th><th>disk MB/s</th>
<th>net MB/s</th><th>GPU %</th><th>GPU mem %</th><th>read/wait/compute/write %</th><th>items/s</th></tr>
{% for n in rows %}<tr><td>{{ n.name }}</td><td class="l"><span class="v v-{{ n.verdict }}">{{ n.verdict }}</span></td>
{% for cell in n.cells %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
<h2>Where the time went</h2>
{{ bar }}
<table>{% for label, seconds, share in time_rows %}<tr><td>{{ label }}</td><td>{{ seconds }}</td><td>{{ share }}</td></tr>{% endfor %}</table>
<h2>Cost</h2><div>{{ cost }}</div>
{% for note in r.notes %}<div class="muted">note: {{ note }}</div>{% endfor %}
<h2>Timelines</h2>
<div class="legend"><span><i style="background:{{ c.user }}"></i>CPU user</span><span><i style="background:{{ c.system }}"></i>CPU system</span>
<span><i style="background:{{ c.iowait }}"></i>iowait</span><span><i style="background:{{ c.disk_busy }}"></i>disk busy</span>
<span><i style="background:{{ c.disk_mb_s }}"></i>disk MB/s</span><span><i style="background:{{ c.net_mb_s }}"></i>network MB/s</span>
<span><i style="background:{{ c.preempted }}"></i>preempted / worker lost</span><span><i style="background:{{ c.start }}"></i>worker start</span>
<span><i style="background:{{ c.stop }}"></i>worker stop</span></div>
{% for n in nodes %}<h3 id="node-{{ n.name }}">{{ n.name }} <span class="v v-{{ n.verdict.kind }}">{{ n.verdict.kind }}</span></h3>
<div>{{ n.verdict.evidence|join("; ") }}</div><div><b>What to change:</b> {{ n.verdict.recommendation }}</div>
{% for note in n.verdict.notes %}<div class="muted">note: {{ note }}</div>{% endfor %}
{% if n.missing %}<div class="missing">missing: {{ n.missing|join("; ") }}</div>{% endif %}
{{ charts[n.name] }}
{% endfor %}
</body></html>
"""


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


PAIR_COLUMNS = (
    ("cpu_busy", 0),
    ("iowait", 0),
    ("disk_busy", 0),
    ("disk_mb_s", 1),
    ("net_mb_s", 1),
    ("gpu_util", 0),
    ("gpu_mem", 0),
)


def _pair(stat: Stat | None, digits: int) -> str:
    if stat is None or stat.mean is None:
        return "-"
    return f"{stat.mean:.{digits}f} / {_f(stat.p95, digits)}"


def render_html(report: Report) -> str:
    t0 = report.start if report.start is not None else 0.0
    t1 = report.end if report.end is not None else t0 + 1.0
    rows = []
    for node in report.nodes:
        stages = (
            "/".join(_f(node.stages.get(s)) for s in STAGES)
            if node.stages.get("compute") is not None
            else "-"
        )
        cells = [_pair(node.stats.get(name), digits) for name, digits in PAIR_COLUMNS]
        rows.append(
            {
                "name": node.name,
                "verdict": node.verdict.kind,
                "cells": [*cells, stages, _f(node.items_s, 1)],
            }
        )
    total = report.time.get("node_seconds", 0.0) or 1.0
    time_rows = [
        (label, f"{report.time.get(key, 0.0):.0f} s", f"{100 * report.time.get(key, 0.0) / total:.1f}%")
        for key, label in TIME_LABELS
    ]
    cost = report.cost
    cost_text = f"{cost['node_hours']:.2f} node-hours"
    if cost.get("usd") is not None:
        cost_text += f", ${cost['usd']:.2f}"
        if cost.get("usd_per_1000_items") is not None:
            cost_text += f", ${cost['usd_per_1000_items']:.4f} per 1,000 items"
    else:
        cost_text += " (no prices known)"
    fleet = report.fleet
    items = f"{fleet.items} item(s) done" + (f" of {fleet.items_total}" if fleet.items_total else "")
    if fleet.items_failed:
        items += f", {fleet.items_failed} failed"
    if fleet.items_s:
        items += f", {fleet.items_s:.1f} items/s"
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        r=report,
        rows=rows,
        nodes=report.nodes,
        charts={n.name: Markup(node_timeline(n, t0, t1)) for n in report.nodes},
        bar=Markup(time_bar(report.time)),
        time_rows=time_rows,
        cost=cost_text,
        items=items,
        c=COLORS,
        span=f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t0))} to "
        f"{time.strftime('%H:%M:%S', time.gmtime(t1))} UTC ({t1 - t0:.0f} s)",
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )


def write_html(report: Report, path: Path) -> Path:
    """Write the report as one self-contained HTML file; returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(report), encoding="utf-8")
    tmp.replace(path)
    return path
