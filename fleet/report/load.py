"""Reading a job directory's metrics, defensively.

The files are written by nodes that may vanish at any moment (preemption), over sshfs,
while the report may be reading a job that is still running. So: a missing file is an
empty one, a line that does not parse (the truncated last line of a killed writer) is
skipped and counted, unknown kinds and keys are ignored, and nothing here raises for
what is inside the files.

Files read (formats in docs/report.md):
- metrics/<node>.jsonl              the sampler's `info` and `sample` lines
- metrics/<node>.worker<proc>.jsonl the worker's `start`, `batch` and `stop` lines
- done/<chunk>                      completion markers {"items", "failed", "node", "seconds"}
- chunks.json                       the job's chunk list (for the total item count)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

_WORKER_FILE = re.compile(r"^(?P<node>.+)\.worker(?P<proc>[^.]+)\.jsonl$")


@dataclass
class JsonLines:
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    truncated_tail: bool = False


def read_jsonl(path: Path) -> JsonLines:
    """Every JSON object line of `path`; unreadable lines are counted, not raised."""
    result = JsonLines()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return result
    lines = text.split("\n")
    for index, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if index == len(lines) - 1:
                result.truncated_tail = True
            else:
                result.bad_lines += 1
            continue
        if isinstance(record, dict):
            result.records.append(record)
        else:
            result.bad_lines += 1
    return result


def _num(value: Any, default: float | None = 0.0) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and not math.isnan(value):
        return float(value)
    return default


@dataclass(frozen=True)
class GpuSample:
    index: int
    util: float | None
    mem_util: float | None
    mem_used_mb: float | None
    power_w: float | None
    sm_active: float | None = None  # GPM: % of SMs busy (Hopper and later)
    tensor_active: float | None = None  # GPM: % of time tensor cores worked


@dataclass(frozen=True)
class Sample:
    """One sampler tick, normalised: missing figures are 0 (or None for GPUs)."""

    t: float
    cpu_user: float
    cpu_system: float
    cpu_iowait: float
    cpu_idle: float
    cpu_steal: float
    mem_used_pct: float
    disk_busy: float  # the busiest disk's busy %
    disk_read_bps: float  # summed over disks
    disk_write_bps: float
    net_rx_bps: float
    net_tx_bps: float
    lo_bps: float
    gpus: tuple[GpuSample, ...]
    proc_cpu_pct: float | None  # watched process tree, percent of one core
    proc_runq_pct: float | None  # its threads runnable but waiting for a CPU, % of one core
    proc_io_bps: float | None

    @property
    def cpu_busy(self) -> float:
        return self.cpu_user + self.cpu_system

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> Sample | None:
        t = _num(record.get("t"), None)
        if t is None:
            return None
        cpu = record.get("cpu") if isinstance(record.get("cpu"), dict) else {}
        mem = record.get("mem") if isinstance(record.get("mem"), dict) else {}
        disks = record.get("disks") if isinstance(record.get("disks"), dict) else {}
        net = record.get("net") if isinstance(record.get("net"), dict) else {}
        disk_values = [d for d in disks.values() if isinstance(d, dict)]
        gpus = []
        for position, gpu in enumerate(record.get("gpus") or []):
            if not isinstance(gpu, dict):
                continue
            gpus.append(
                GpuSample(
                    index=int(_num(gpu.get("index"), position) or 0),
                    util=_num(gpu.get("util"), None),
                    mem_util=_num(gpu.get("mem_util"), None),
                    mem_used_mb=_num(gpu.get("mem_used_mb"), None),
                    power_w=_num(gpu.get("power_w"), None),
                    sm_active=_num(gpu.get("sm_active"), None),
                    tensor_active=_num(gpu.get("tensor_active"), None),
                )
            )
        proc = record.get("proc") if isinstance(record.get("proc"), dict) else None
        return cls(
            t=t,
            cpu_user=_num(cpu.get("user")) or 0.0,
            cpu_system=_num(cpu.get("system")) or 0.0,
            cpu_iowait=_num(cpu.get("iowait")) or 0.0,
            cpu_idle=_num(cpu.get("idle")) or 0.0,
            cpu_steal=_num(cpu.get("steal")) or 0.0,
            mem_used_pct=_num(mem.get("used_pct")) or 0.0,
            disk_busy=max((_num(d.get("busy_pct")) or 0.0 for d in disk_values), default=0.0),
            disk_read_bps=sum(_num(d.get("read_bps")) or 0.0 for d in disk_values),
            disk_write_bps=sum(_num(d.get("write_bps")) or 0.0 for d in disk_values),
            net_rx_bps=_num(net.get("rx_bps")) or 0.0,
            net_tx_bps=_num(net.get("tx_bps")) or 0.0,
            lo_bps=(_num(net.get("lo_rx_bps")) or 0.0) + (_num(net.get("lo_tx_bps")) or 0.0),
            gpus=tuple(sorted(gpus, key=lambda g: g.index)),
            proc_cpu_pct=_num(proc.get("cpu_pct"), None) if proc else None,
            proc_runq_pct=_num(proc.get("runq_pct"), None) if proc else None,
            proc_io_bps=((_num(proc.get("read_bps")) or 0.0) + (_num(proc.get("write_bps")) or 0.0))
            if proc
            else None,
        )


@dataclass(frozen=True)
class Batch:
    t: float
    proc: str
    device: str
    items: int
    read_s: float
    wait_s: float
    compute_s: float
    write_s: float
    model_s: float | None = None  # the model's device time (CUDA events), when recorded


@dataclass
class WorkerRun:
    """One worker process's file: its batches and, if it stopped cleanly, its stop line."""

    node: str
    proc: str
    start_t: float | None = None
    stop_t: float | None = None
    stop_items: int | None = None
    device: str | None = None
    mode: str | None = None  # "files" or "records", from the start line
    batches: list[Batch] = field(default_factory=list)
    last_t: float | None = None
    bad_lines: int = 0
    truncated_tail: bool = False

    @property
    def first_t(self) -> float | None:
        times = [t for t in (self.start_t, self.batches[0].t if self.batches else None) if t is not None]
        return min(times) if times else None

    @property
    def end_t(self) -> float | None:
        return self.stop_t if self.stop_t is not None else self.last_t


@dataclass
class NodeFiles:
    name: str
    info: list[dict[str, Any]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    sample_file: bool = False
    bad_lines: int = 0
    truncated_tail: bool = False
    workers: list[WorkerRun] = field(default_factory=list)

    @cached_property  # read once loading is over
    def interval(self) -> float:
        for info in reversed(self.info):
            value = _num(info.get("interval"), None)
            if value and value > 0:
                return value
        if len(self.samples) >= 2:
            gaps = sorted(b.t - a.t for a, b in zip(self.samples, self.samples[1:]))
            return max(gaps[len(gaps) // 2], 0.05)
        return 1.0

    @cached_property  # read once loading is over
    def gpu_mem_total_mb(self) -> dict[int, float]:
        totals: dict[int, float] = {}
        for info in self.info:
            for gpu in info.get("gpus") or []:
                if isinstance(gpu, dict) and _num(gpu.get("mem_total_mb"), None):
                    totals[int(_num(gpu.get("index"), 0) or 0)] = float(gpu["mem_total_mb"])
        return totals

    @cached_property  # read once loading is over
    def ncpu(self) -> int | None:
        for info in reversed(self.info):
            if _num(info.get("ncpu"), None):
                return int(info["ncpu"])
        return None

    @cached_property  # read once loading is over
    def gpu_reason(self) -> str | None:
        for info in reversed(self.info):
            if info.get("gpu") is False:
                return str(info.get("reason") or "no GPU")
        return None


@dataclass(frozen=True)
class DoneMarker:
    chunk: str
    items: int
    failed: int
    node: str | None
    seconds: float | None


@dataclass
class JobFiles:
    job: str
    nodes: dict[str, NodeFiles]
    done: list[DoneMarker]
    total_items: int | None
    total_chunks: int | None


def _read_worker(path: Path, node: str, proc: str) -> WorkerRun:
    lines = read_jsonl(path)
    run = WorkerRun(node=node, proc=proc, bad_lines=lines.bad_lines, truncated_tail=lines.truncated_tail)
    for record in lines.records:
        t = _num(record.get("t"), None)
        if t is not None:
            run.last_t = t if run.last_t is None else max(run.last_t, t)
        kind = record.get("kind")
        if isinstance(record.get("device"), str):
            run.device = record["device"]
        if kind == "start" and t is not None:
            run.start_t = t if run.start_t is None else min(run.start_t, t)
            if isinstance(record.get("mode"), str):
                run.mode = record["mode"]
        elif kind == "stop" and t is not None:
            run.stop_t = t
            items = _num(record.get("items"), None)
            run.stop_items = int(items) if items is not None else None
        elif kind == "batch" and t is not None:
            run.batches.append(
                Batch(
                    t=t,
                    proc=proc,
                    device=str(record.get("device") or run.device or "unknown"),
                    items=int(_num(record.get("items")) or 0),
                    read_s=max(0.0, _num(record.get("read_s")) or 0.0),
                    wait_s=max(0.0, _num(record.get("wait_s")) or 0.0),
                    compute_s=max(0.0, _num(record.get("compute_s")) or 0.0),
                    write_s=max(0.0, _num(record.get("write_s")) or 0.0),
                    model_s=_num(record.get("model_s"), None),
                )
            )
    run.batches.sort(key=lambda b: b.t)
    return run


def _metric_files(metrics: Path) -> Iterator[tuple[Path, str, str | None]]:
    try:
        entries = sorted(metrics.iterdir())
    except OSError:
        return
    for path in entries:
        if not path.is_file() or not path.name.endswith(".jsonl"):
            continue
        match = _WORKER_FILE.match(path.name)
        if match:
            yield path, match["node"], match["proc"]
        else:
            yield path, path.name[: -len(".jsonl")], None


def _read_done(done_dir: Path) -> list[DoneMarker]:
    markers = []
    try:
        entries = sorted(done_dir.iterdir())
    except OSError:
        return markers
    for path in entries:
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            body = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            body = {}
        if not isinstance(body, dict):
            body = {}
        markers.append(
            DoneMarker(
                chunk=path.name,
                items=int(_num(body.get("items")) or 0),
                failed=int(_num(body.get("failed")) or 0),
                node=body.get("node") if isinstance(body.get("node"), str) else None,
                seconds=_num(body.get("seconds"), None),
            )
        )
    return markers


def _read_chunks(path: Path) -> tuple[int | None, int | None]:
    """(total items, total chunks) from chunks.json, whatever of it can be understood."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    chunks = data.get("chunks") if isinstance(data, dict) else data
    if isinstance(data, dict) and _num(data.get("total_items"), None) is not None:
        total = int(data["total_items"])
    else:
        total = None
    if not isinstance(chunks, list):
        return total, None
    if total is None:
        counted = 0
        for chunk in chunks:
            if isinstance(chunk, dict):
                for key in ("items", "count", "size", "n"):
                    value = chunk.get(key)
                    if isinstance(value, list):
                        counted += len(value)
                        break
                    if _num(value, None) is not None:
                        counted += int(value)
                        break
                else:
                    return None, len(chunks)
            else:
                return None, len(chunks)
        total = counted
    return total, len(chunks)


def load_job(job_dir: Path) -> JobFiles:
    """Everything the report needs from a (local copy of a) job directory."""
    nodes: dict[str, NodeFiles] = {}
    for path, node, proc in _metric_files(job_dir / "metrics"):
        files = nodes.setdefault(node, NodeFiles(name=node))
        if proc is not None:
            files.workers.append(_read_worker(path, node, proc))
            continue
        lines = read_jsonl(path)
        files.sample_file = True
        files.bad_lines += lines.bad_lines
        files.truncated_tail = files.truncated_tail or lines.truncated_tail
        for record in lines.records:
            if record.get("kind") == "info":
                files.info.append(record)
            elif record.get("kind", "sample") == "sample":
                sample = Sample.parse(record)
                if sample is not None:
                    files.samples.append(sample)
        files.samples.sort(key=lambda s: s.t)
    total_items, total_chunks = _read_chunks(job_dir / "chunks.json")
    return JobFiles(
        job=job_dir.name,
        nodes=nodes,
        done=_read_done(job_dir / "done"),
        total_items=total_items,
        total_chunks=total_chunks,
    )
