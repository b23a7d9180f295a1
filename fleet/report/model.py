"""The report as data: what `build_report` returns and every renderer reads.

`Report.to_json()` is the `fleet report --json` object. Percentages are 0-100, rates
MB/s (10^6 bytes), times seconds, timestamps unix seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet.report.stats import Stat
from fleet.report.timeline import Event, NodeTime
from fleet.report.verdict import Thresholds, Verdict

STAT_NAMES = ("cpu_busy", "iowait", "disk_busy", "disk_mb_s", "net_mb_s", "gpu_util", "gpu_mem", "mem_used")
STAGES = ("read", "wait", "compute", "write")


@dataclass(frozen=True)
class Series:
    """A node's samples as columns, for the charts (the whole sampled span)."""

    t: tuple[float, ...] = ()
    cpu_user: tuple[float, ...] = ()
    cpu_system: tuple[float, ...] = ()
    cpu_iowait: tuple[float, ...] = ()
    disk_busy: tuple[float, ...] = ()
    disk_mb_s: tuple[float, ...] = ()
    net_mb_s: tuple[float, ...] = ()
    gpu_util: tuple[tuple[float | None, ...], ...] = ()  # one tuple per GPU
    gpu_mem: tuple[tuple[float | None, ...], ...] = ()
    interval: float = 1.0


@dataclass(frozen=True)
class NodeReport:
    name: str
    verdict: Verdict
    stats: dict[str, Stat]
    stages: dict[str, float | None]  # share of worker stage time, %
    input_wait_pct: float | None
    worker_busy_pct: float | None
    items: int
    items_s: float | None
    device: str | None
    ncpu: int | None
    gpus: list[dict[str, Any]]
    window: tuple[float, float] | None
    samples: int
    coverage_pct: float | None
    missing: list[str]
    preempted_at: float | None
    events: list[Event]
    worker_marks: list[tuple[float, str]]  # (t, "start"/"stop"/"lost") per worker process
    series: Series
    time: NodeTime
    cost_usd: float | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "verdict": self.verdict.kind,
            "recommendation": self.verdict.recommendation,
            "evidence": list(self.verdict.evidence),
            "notes": list(self.verdict.notes),
        }
        for name in STAT_NAMES:
            stat = self.stats.get(name, Stat(None, None))
            data[name] = Stat.rounded(stat.mean)
            data[f"{name}_p95"] = Stat.rounded(stat.p95)
        for stage in STAGES:
            data[stage] = Stat.rounded(self.stages.get(stage))
        data.update(
            {
                "input_wait_pct": Stat.rounded(self.input_wait_pct),
                "worker_busy_pct": Stat.rounded(self.worker_busy_pct),
                "items": self.items,
                "items_s": Stat.rounded(self.items_s, 2),
                "device": self.device,
                "ncpu": self.ncpu,
                "gpus": self.gpus,
                "window": list(self.window) if self.window else None,
                "samples": self.samples,
                "coverage_pct": Stat.rounded(self.coverage_pct),
                "preempted_at": self.preempted_at,
                "missing": "; ".join(self.missing),
                "time": self.time.as_dict(),
                "cost_usd": self.cost_usd,
            }
        )
        return data


@dataclass(frozen=True)
class FleetSummary:
    verdict: Verdict
    stats: dict[str, float | None]  # node means averaged (weighted by working time)
    stages: dict[str, float | None]
    items: int
    items_failed: int
    items_total: int | None
    items_s: float | None
    nodes: int

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "verdict": self.verdict.kind,
            "recommendation": self.verdict.recommendation,
            "evidence": list(self.verdict.evidence),
            "nodes": self.nodes,
            "items": self.items,
            "items_failed": self.items_failed,
            "items_total": self.items_total,
            "items_s": Stat.rounded(self.items_s, 2),
        }
        for name in STAT_NAMES:
            data[name] = Stat.rounded(self.stats.get(name))
        for stage in STAGES:
            data[stage] = Stat.rounded(self.stages.get(stage))
        return data


@dataclass(frozen=True)
class Report:
    job: str
    status: str  # "finished", "running", "unknown"
    start: float | None
    end: float | None
    fleet: FleetSummary
    nodes: list[NodeReport]
    time: dict[str, float]
    cost: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "status": self.status,
            "start": self.start,
            "end": self.end,
            "fleet": self.fleet.to_json(),
            "nodes": [node.to_json() for node in self.nodes],
            "time": {k: round(v, 1) for k, v in self.time.items()},
            "cost": self.cost,
            "notes": self.notes,
        }
