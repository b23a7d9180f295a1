"""Where each node's time went, from the fleet's events and the worker's timings.

A node's life, in node-seconds, is cut into consecutive spans: provisioning
(requested -> SSH ready), setup (-> set up), mounting (-> shared dir mounted), then the
rest until it ended (preempted or deleted) or until the report's time. That rest is
split by the worker's timings into useful compute, waiting (for input, claims, writes),
compute lost to preemption (work of chunks that were never marked done by this node and
were redone elsewhere) and idle (alive, set up, no worker running). Spans missing from
the events collapse to zero; nothing here assumes that every event was recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

END_KINDS = ("preempted", "deleted")
READY_GRACE_S = 600.0  # ready this long before the job's first record: up before the job
EVENT_KINDS = (
    "requested",
    "running",
    "ssh_ready",
    "setup_done",
    "mounted",
    "working",
    "preempted",
    "replaced",
    "deleted",
    "unreachable",
)


@dataclass(frozen=True)
class Event:
    t: float
    node: str
    kind: str
    detail: str = ""

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Event | None:
        try:
            t = float(raw["t"])
            node = str(raw["node"])
            kind = str(raw["kind"])
        except (KeyError, TypeError, ValueError):
            return None
        return cls(t, node, kind, str(raw.get("detail") or ""))


@dataclass(frozen=True)
class NodeTime:
    start: float | None
    end: float | None
    provisioning: float = 0.0
    setup: float = 0.0
    mounting: float = 0.0
    compute: float = 0.0
    waiting: float = 0.0
    lost_to_preemption: float = 0.0
    idle: float = 0.0

    @property
    def alive(self) -> float:
        return (self.end - self.start) if self.start is not None and self.end is not None else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "provisioning": round(self.provisioning, 1),
            "setup": round(self.setup, 1),
            "mounting": round(self.mounting, 1),
            "compute": round(self.compute, 1),
            "waiting": round(self.waiting, 1),
            "lost_to_preemption": round(self.lost_to_preemption, 1),
            "idle": round(self.idle, 1),
        }


def first(events: Sequence[Event], kind: str, after: float | None = None) -> float | None:
    for event in events:
        if event.kind == kind and (after is None or event.t >= after):
            return event.t
    return None


def node_end(events: Sequence[Event], last_data: float | None, report_t: float, interval: float) -> float:
    """When the node stopped counting: its first preemption or deletion; an unreachable
    node whose data stopped there; else the report's time (still alive)."""
    ends = [t for t in (first(events, kind) for kind in END_KINDS) if t is not None]
    if ends:
        return min(ends)
    unreachable = first(events, "unreachable")
    if unreachable is not None and (last_data is None or last_data <= unreachable + 2 * interval):
        return unreachable
    return report_t


def account_node(
    events: Sequence[Event],
    data_start: float | None,
    data_end: float | None,
    worker_window: tuple[float, float] | None,
    compute_fraction: float | None,
    lost_fraction: float,
    report_t: float,
    interval: float,
    counts_as_compute: bool,
    job_start: float | None = None,
) -> NodeTime:
    """Cut one node's life into the spans of the module docstring.

    compute_fraction: share of worker wall time spent computing (None: no worker
    timings; then the sampled span counts as compute if `counts_as_compute`, else idle).
    lost_fraction: share of that compute redone elsewhere after a preemption.
    job_start: the job's first record. A node that was ready more than READY_GRACE_S
    before it was up before this job (an earlier job, a fleet left running): its life
    is counted from the job's start, without its provisioning.
    """
    events = sorted(events, key=lambda e: e.t)
    requested = first(events, "requested")
    starts = [t for t in (requested, events[0].t if events else None, data_start) if t is not None]
    if not starts:
        return NodeTime(None, None)
    start = min(starts) if requested is None else requested
    ready = first(events, "mounted") or first(events, "setup_done") or first(events, "ssh_ready")
    carried_over = (
        job_start is not None
        and ready is not None
        and ready < job_start - READY_GRACE_S
        and start < job_start
    )
    if carried_over:
        assert job_start is not None
        start = job_start
    after = start if carried_over else None
    end = max(start, node_end(events, data_end, report_t, interval))

    def clamp(t: float | None, floor: float) -> float:
        return floor if t is None else min(max(t, floor), end)

    def at(*kinds: str) -> float | None:
        return next((t for t in (first(events, k, after) for k in kinds) if t is not None), None)

    reachable = at("ssh_ready", "running", "setup_done", "mounted", "working")
    if reachable is None and requested is not None and not carried_over:
        reachable = data_start
    provisioned = clamp(reachable, start)
    set_up = clamp(at("setup_done", "mounted", "working"), provisioned)
    mounted = clamp(at("mounted", "working"), set_up)
    rest = end - mounted

    if worker_window is not None and compute_fraction is not None:
        w0, w1 = max(worker_window[0], mounted), min(worker_window[1], end)
        working = max(0.0, w1 - w0)
        computing = working * compute_fraction
        lost = computing * lost_fraction
        return NodeTime(
            start,
            end,
            provisioned - start,
            set_up - provisioned,
            mounted - set_up,
            compute=computing - lost,
            waiting=working - computing,
            lost_to_preemption=lost,
            idle=max(0.0, rest - working),
        )
    if data_start is not None and data_end is not None and counts_as_compute:
        working = max(0.0, min(data_end, end) - max(data_start, mounted))
        return NodeTime(
            start,
            end,
            provisioned - start,
            set_up - provisioned,
            mounted - set_up,
            compute=working,
            idle=max(0.0, rest - working),
        )
    return NodeTime(
        start, end, provisioned - start, set_up - provisioned, mounted - set_up, idle=max(0.0, rest)
    )


def cost_summary(
    times: Mapping[str, NodeTime], prices: Mapping[str, float] | None, items_done: int
) -> dict[str, Any]:
    """Node-hours times price; cost per 1,000 items when prices and items are known."""
    node_hours = {name: t.alive / 3600.0 for name, t in times.items()}
    summary: dict[str, Any] = {
        "node_hours": round(sum(node_hours.values()), 4),
        "usd": None,
        "usd_per_1000_items": None,
        "per_node_usd": {},
        "unpriced_nodes": [],
    }
    if not prices:
        return summary
    total = 0.0
    for name, hours in node_hours.items():
        price = prices.get(name)
        if price is None:
            summary["unpriced_nodes"].append(name)
            continue
        summary["per_node_usd"][name] = round(hours * float(price), 4)
        total += hours * float(price)
    summary["usd"] = round(total, 4)
    if items_done > 0:
        summary["usd_per_1000_items"] = round(total / items_done * 1000.0, 6)
    return summary
