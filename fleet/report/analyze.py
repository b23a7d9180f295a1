"""`build_report`: a job directory (plus the fleet's events and prices) -> `Report`.

Per node: the working window (first worker start to last worker line; the whole
sampled span for a node without worker timings), mean and p95 of every figure over
that window, the worker's stage shares, the verdict, what is missing, and where its
time went. Then the fleet: totals, its verdict, time and cost.
"""

from __future__ import annotations

import time as _time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fleet.report.load import JobFiles, NodeFiles, Sample, load_job
from fleet.report.model import STAGES, STAT_NAMES, FleetSummary, NodeReport, Report, Series
from fleet.report.stats import Stat, mean
from fleet.report.timeline import END_KINDS, Event, NodeTime, account_node, cost_summary, first
from fleet.report.verdict import NodeSignals, Thresholds, Verdict, classify_fleet, classify_node

MB = 1e6
CHART_POINTS = 900  # per chart line; more is invisible at the chart's width
STOPPED_SLACK_INTERVALS = 3  # data this many intervals older than the job's last record: stopped


def _clock(t: float) -> str:
    return _time.strftime("%H:%M:%S", _time.gmtime(t)) + " UTC"


def _gpu_mem_pct(sample: Sample, totals: Mapping[int, float]) -> float | None:
    values = [
        100.0 * g.mem_used_mb / totals[g.index]
        for g in sample.gpus
        if g.mem_used_mb is not None and totals.get(g.index)
    ]
    return mean(values)


def _series(files: NodeFiles) -> Series:
    """The node's samples as chart columns, averaged down to at most CHART_POINTS
    points (a 10-hour job at 1 Hz would otherwise put 36,000 points in every chart).
    Averaging never crosses a gap in the samples, so gaps stay visible."""
    samples = files.samples
    totals = files.gpu_mem_total_mb
    gpu_indexes = sorted({g.index for s in samples for g in s.gpus})
    rows: list[list[float | None]] = []
    for sample in samples:
        by_index = {g.index: g for g in sample.gpus}
        row: list[float | None] = [
            sample.t,
            sample.cpu_user,
            sample.cpu_system,
            sample.cpu_iowait,
            sample.disk_busy,
            (sample.disk_read_bps + sample.disk_write_bps) / MB,
            (sample.net_rx_bps + sample.net_tx_bps) / MB,
        ]
        for index in gpu_indexes:
            gpu = by_index.get(index)
            used = gpu.mem_used_mb if gpu else None
            row.append(gpu.util if gpu else None)
            row.append(100.0 * used / totals[index] if used is not None and totals.get(index) else None)
        rows.append(row)
    step = max(1, -(-len(rows) // CHART_POINTS))
    interval = files.interval
    if step > 1:
        rows = _average_rows(rows, step, gap=2.5 * interval)
        interval *= step
    columns = list(zip(*rows)) if rows else [() for _ in range(7 + 2 * len(gpu_indexes))]
    return Series(
        t=tuple(columns[0]),  # type: ignore[arg-type]
        cpu_user=tuple(columns[1]),  # type: ignore[arg-type]
        cpu_system=tuple(columns[2]),  # type: ignore[arg-type]
        cpu_iowait=tuple(columns[3]),  # type: ignore[arg-type]
        disk_busy=tuple(columns[4]),  # type: ignore[arg-type]
        disk_mb_s=tuple(columns[5]),  # type: ignore[arg-type]
        net_mb_s=tuple(columns[6]),  # type: ignore[arg-type]
        gpu_util=tuple(tuple(columns[7 + 2 * i]) for i in range(len(gpu_indexes))),
        gpu_mem=tuple(tuple(columns[8 + 2 * i]) for i in range(len(gpu_indexes))),
        interval=interval,
    )


def _average_rows(rows: list[list[float | None]], step: int, gap: float) -> list[list[float | None]]:
    """Means of up to `step` consecutive rows, a group ending early at a gap in time."""
    averaged: list[list[float | None]] = []
    group: list[list[float | None]] = []

    def close() -> None:
        if not group:
            return
        merged: list[float | None] = []
        for column in zip(*group):
            values = [v for v in column if v is not None]
            merged.append(sum(values) / len(values) if values else None)
        averaged.append(merged)
        group.clear()

    for row in rows:
        if group and (len(group) >= step or row[0] - group[-1][0] > gap):  # type: ignore[operator]
            close()
        group.append(row)
    close()
    return averaged


def _window_samples(files: NodeFiles, window: tuple[float, float] | None) -> list[Sample]:
    if window is None:
        return list(files.samples)
    inside = [s for s in files.samples if window[0] < s.t <= window[1] + files.interval]
    return inside or list(files.samples)


class _NodeAnalysis:
    """Figures of one node, computed once, shared by the verdict and the report."""

    def __init__(
        self,
        files: NodeFiles,
        events: list[Event],
        job: JobFiles,
        report_t: float,
        thresholds: Thresholds,
        worker_job: bool,
    ) -> None:
        self.files = files
        self.events = events
        self.name = files.name
        interval = files.interval
        runs = [r for r in files.workers if r.first_t is not None]
        self.batches = sorted((b for r in files.workers for b in r.batches), key=lambda b: b.t)
        self.worker_window = (
            (min(r.first_t for r in runs), max(r.end_t or r.first_t for r in runs)) if runs else None  # type: ignore[type-var]
        )
        if self.worker_window is not None:
            self.window: tuple[float, float] | None = self.worker_window
        elif files.samples:
            self.window = (files.samples[0].t - interval, files.samples[-1].t)
        else:
            self.window = None
        samples = _window_samples(files, self.window)
        self.samples = samples
        totals = files.gpu_mem_total_mb
        gpu_samples = [s for s in samples if s.gpus]
        self.stats: dict[str, Stat] = {
            "cpu_busy": Stat.of([s.cpu_busy for s in samples]),
            "iowait": Stat.of([s.cpu_iowait for s in samples]),
            "disk_busy": Stat.of([s.disk_busy for s in samples]),
            "disk_mb_s": Stat.of([(s.disk_read_bps + s.disk_write_bps) / MB for s in samples]),
            "net_mb_s": Stat.of([(s.net_rx_bps + s.net_tx_bps) / MB for s in samples]),
            "gpu_util": Stat.of(
                [
                    u
                    for s in gpu_samples
                    if (u := mean([g.util for g in s.gpus if g.util is not None])) is not None
                ]
            ),
            "gpu_mem": Stat.of([m for s in gpu_samples if (m := _gpu_mem_pct(s, totals)) is not None]),
            "mem_used": Stat.of([s.mem_used_pct for s in samples]),
        }
        self.gpus = self._per_gpu(gpu_samples, totals)
        # Worker stage timings.
        sums = {stage: sum(getattr(b, f"{stage}_s") for b in self.batches) for stage in STAGES}
        self.stage_sums = sums
        stage_total = sum(sums.values())
        self.stages = {k: (100.0 * v / stage_total if stage_total > 0 else None) for k, v in sums.items()}
        step = sums["wait"] + sums["compute"]
        self.input_wait_pct = 100.0 * sums["wait"] / step if step > 0 else None
        self.items = sum(b.items for b in self.batches)
        self.worker_seconds = sum(max(0.0, (r.end_t or 0.0) - (r.first_t or 0.0)) for r in runs)
        self.worker_busy_pct = self._busy_pct()
        devices = Counter(b.device for b in self.batches)
        self.device = (
            devices.most_common(1)[0][0] if devices else next((r.device for r in runs if r.device), None)
        )
        span = (self.worker_window[1] - self.worker_window[0]) if self.worker_window else 0.0
        self.items_s = self.items / span if span > 0 and self.items else (0.0 if runs else None)
        self.preempted_at = first(sorted(events, key=lambda e: e.t), "preempted")
        self.unfinished, self._unfinished_note = self._unfinished_items(job, report_t, interval)
        self.lost_fraction = 0.0
        self.signals = self._signals()
        self.verdict = classify_node(self.signals, thresholds)
        self.missing = self._missing(job, report_t, interval, worker_job)

    def settle_redone(self, redone_share: float) -> None:
        """Of the items this node processed but never finished (it was preempted or
        killed), the share `redone_share` was computed again elsewhere: the rest had
        their outputs written, and the chunk's next holder kept them."""
        if self._unfinished_note:
            self.missing.append(self._unfinished_note)
        if not self.unfinished or not self.items:
            return
        redone = round(self.unfinished * redone_share)
        self.lost_fraction = redone / self.items
        kept = self.unfinished - redone
        self.missing.append(
            f"{self.unfinished} item(s) processed here were never marked done by this node: "
            + (f"{redone} redone elsewhere" if redone else "none redone elsewhere")
            + (f", {kept} kept (their outputs were written before it stopped)" if kept else "")
        )

    def _per_gpu(self, samples: list[Sample], totals: Mapping[int, float]) -> list[dict[str, Any]]:
        by_index: dict[int, list[Any]] = defaultdict(list)
        for sample in samples:
            for gpu in sample.gpus:
                by_index[gpu.index].append(gpu)
        result = []
        for index, gpus in sorted(by_index.items()):
            utils = [g.util for g in gpus if g.util is not None]
            mems = [
                100.0 * g.mem_used_mb / totals[index]
                for g in gpus
                if g.mem_used_mb is not None and totals.get(index)
            ]
            power = [g.power_w for g in gpus if g.power_w is not None]
            sm = [g.sm_active for g in gpus if g.sm_active is not None]
            tensor = [g.tensor_active for g in gpus if g.tensor_active is not None]
            stat = Stat.of(utils)
            result.append(
                {
                    "index": index,
                    "util": Stat.rounded(stat.mean),
                    "util_p95": Stat.rounded(stat.p95),
                    "mem": Stat.rounded(mean(mems)),
                    "mem_used_mb": Stat.rounded(
                        mean([g.mem_used_mb for g in gpus if g.mem_used_mb is not None])
                    ),
                    "power_w": Stat.rounded(mean(power)),
                    "sm_active": Stat.rounded(mean(sm)),
                    "tensor_active": Stat.rounded(mean(tensor)),
                }
            )
        return result

    def _model_busy_pct(self) -> float | None:
        """The model's device time (batch lines' model_s) in % of the worker processes'
        wall time: what share of the time the GPU computed for this job."""
        timed = [b.model_s for b in self.batches if b.model_s is not None]
        if not timed or self.worker_seconds <= 0:
            return None
        return min(100.0, 100.0 * sum(timed) / self.worker_seconds)

    def _busy_pct(self) -> float | None:
        """Share of the worker's time between its first and last batch spent inside
        batches (waiting for a batch or computing it), over all its processes."""
        by_proc: dict[str, list[Any]] = defaultdict(list)
        for batch in self.batches:
            by_proc[batch.proc].append(batch)
        inside = outside_span = 0.0
        for batches in by_proc.values():
            if len(batches) < 2:
                continue
            span = batches[-1].t - (batches[0].t - batches[0].wait_s - batches[0].compute_s)
            inside += sum(b.wait_s + b.compute_s for b in batches)
            outside_span += span
        if outside_span < 2.0:
            return None
        return min(100.0, 100.0 * inside / outside_span)

    def _unfinished_items(self, job: JobFiles, report_t: float, interval: float) -> tuple[int, str | None]:
        """Items processed here whose chunks this node never marked done, when it was
        preempted or its worker stopped uncleanly (0 otherwise)."""
        stopped_unclean = [
            r
            for r in self.files.workers
            if r.stop_t is None
            and r.last_t is not None
            and r.last_t < report_t - STOPPED_SLACK_INTERVALS * interval
        ]
        if (self.preempted_at is None and not stopped_unclean) or not self.items:
            return 0, None
        if job.done and all(d.node is None for d in job.done):
            return 0, "cannot tell how much work was redone (done markers carry no node)"
        credited = sum(d.items + d.failed for d in job.done if d.node == self.name)
        return max(0, self.items - credited), None

    def _signals(self) -> NodeSignals:
        samples = self.samples
        proc_cpu = [s.proc_cpu_pct for s in samples if s.proc_cpu_pct is not None]
        proc_io = [s.proc_io_bps for s in samples if s.proc_io_bps is not None]
        proc_runq = [s.proc_runq_pct for s in samples if s.proc_runq_pct is not None]
        return NodeSignals(
            cpu_busy=self.stats["cpu_busy"].mean or 0.0,
            iowait=self.stats["iowait"].mean or 0.0,
            cpu_steal=mean([s.cpu_steal for s in samples]) or 0.0,
            disk_busy=self.stats["disk_busy"].mean or 0.0,
            disk_read_mb_s=mean([s.disk_read_bps / MB for s in samples]) or 0.0,
            net_rx_mb_s=mean([s.net_rx_bps / MB for s in samples]) or 0.0,
            net_mb_s=self.stats["net_mb_s"].mean or 0.0,
            ncpu=self.files.ncpu,
            gpu_count=len(self.gpus),
            gpu_util=self.stats["gpu_util"].mean,
            gpu_util_each=tuple(g["util"] or 0.0 for g in self.gpus),
            gpu_sm_active=mean([g["sm_active"] for g in self.gpus if g["sm_active"] is not None]),
            gpu_sm_each=tuple(g["sm_active"] for g in self.gpus),
            gpu_tensor_active=mean([g["tensor_active"] for g in self.gpus if g["tensor_active"] is not None]),
            model_busy_pct=self._model_busy_pct(),
            gpu_mem=self.stats["gpu_mem"].mean,
            job_cpu_pct_one_core=mean(proc_cpu),
            job_runq_pct_one_core=mean(proc_runq),
            job_io_mb_s=(mean(proc_io) or 0.0) / MB if proc_io else None,
            has_samples=bool(samples),
            has_worker=bool(self.files.workers),
            worker_seconds=self.worker_seconds,
            items=self.items,
            device=self.device,
            input_wait_pct=self.input_wait_pct,
            worker_busy_pct=self.worker_busy_pct,
            read_s=self.stage_sums["read"],
            wait_s=self.stage_sums["wait"],
            compute_s=self.stage_sums["compute"],
            write_s=self.stage_sums["write"],
            mode=next((r.mode for r in self.files.workers if r.mode), None),
        )

    def _missing(self, job: JobFiles, report_t: float, interval: float, worker_job: bool) -> list[str]:
        files = self.files
        missing: list[str] = []
        if not files.sample_file:
            missing.append(f"no samples: metrics/{self.name}.jsonl is missing")
        elif not files.samples:
            missing.append("the sample file holds no sample")
        if files.bad_lines:
            missing.append(f"{files.bad_lines} unreadable sample line(s) skipped")
        if files.truncated_tail:
            missing.append("the last sample line is cut off (its writer stopped mid-line)")
        clean_stop = bool(files.workers) and all(r.stop_t is not None for r in files.workers)
        if files.samples and not clean_stop:
            last = files.samples[-1].t
            if last < report_t - STOPPED_SLACK_INTERVALS * interval:
                text = f"samples stop at {_clock(last)}, {report_t - last:.0f} s before the job's last record"
                if self.preempted_at is not None:
                    text += f" (preempted at {_clock(self.preempted_at)})"
                missing.append(text)
        for run in files.workers:
            if (
                run.stop_t is None
                and run.last_t is not None
                and run.last_t < report_t - STOPPED_SLACK_INTERVALS * interval
            ):
                missing.append(
                    f"worker {run.proc} has no stop line: it was killed or its node lost after {_clock(run.last_t)}"
                )
            if run.truncated_tail:
                missing.append(f"worker {run.proc}'s last line is cut off")
        if worker_job and not files.workers:
            missing.append("no worker stage timings (metrics/<node>.worker*.jsonl)")
        if self.window and self.samples and files.samples:
            expected = (self.window[1] - self.window[0]) / interval
            if expected >= 5 and len(self.samples) < 0.8 * expected:
                missing.append(
                    f"samples cover {100 * len(self.samples) / expected:.0f}% of the working window (gaps)"
                )
        return missing

    @property
    def data_span(self) -> tuple[float, float] | None:
        times = [s.t for s in self.files.samples] + [
            t for r in self.files.workers for t in (r.first_t, r.end_t) if t
        ]
        return (min(times), max(times)) if times else None

    def worker_marks(self, report_t: float) -> list[tuple[float, str]]:
        marks = []
        for run in self.files.workers:
            if run.first_t is not None:
                marks.append((run.first_t, f"start {run.proc}"))
            if run.stop_t is not None:
                marks.append((run.stop_t, f"stop {run.proc}"))
            elif (
                run.last_t is not None
                and run.last_t < report_t - STOPPED_SLACK_INTERVALS * self.files.interval
            ):
                marks.append((run.last_t, f"lost {run.proc}"))
        return marks


def _job_time_bounds(job: JobFiles, events: Sequence[Event]) -> tuple[float | None, float | None]:
    times = [t for e in events for t in (e.t,)]
    for files in job.nodes.values():
        times += [s.t for s in files.samples[:1] + files.samples[-1:]]
        for run in files.workers:
            times += [t for t in (run.first_t, run.end_t) if t is not None]
    return (min(times), max(times)) if times else (None, None)


def _redone_share(job: JobFiles, analyses: Sequence[_NodeAnalysis]) -> float:
    """Which share of the items that stopped nodes processed but never finished was
    computed again. Computations beyond one per finished item are the redone ones
    (done markers count the items a chunk's last holder kept as well as those it
    computed); items in flight on live nodes make this an upper bound while a job runs."""
    unfinished = sum(a.unfinished for a in analyses)
    if not unfinished:
        return 0.0
    computed = sum(a.items for a in analyses)
    finished = sum(d.items + d.failed for d in job.done)
    return min(1.0, max(0.0, computed - finished) / unfinished)


def _events_of_the_job(events: Sequence[Event], data_start: float | None, with_data: set[str]) -> list[Event]:
    """The node events that concern the job: none from before the last `fleet down` that
    preceded it (a fleet brought up again reuses the head's name, and `down` writes no
    per-node end), none of nodes whose last event, before the job's first record, ended
    them (unless they left data in it), and none of the fleet as a whole."""
    if data_start is None:
        return [e for e in events if e.node]
    downs = [e.t for e in events if e.kind == "down" and e.t < data_start]
    since = max(downs, default=float("-inf"))
    kept = [e for e in events if e.node and e.t > since]
    last = {e.node: e for e in kept}
    ended_before = {node for node, e in last.items() if e.kind in END_KINDS and e.t < data_start}
    return [e for e in kept if e.node not in ended_before or e.node in with_data]


def _status(job: JobFiles) -> str:
    if job.total_chunks:
        return "finished" if len({d.chunk for d in job.done}) >= job.total_chunks else "running"
    runs = [r for f in job.nodes.values() for r in f.workers]
    if runs and all(r.stop_t is not None for r in runs):
        return "finished"
    return "running" if runs else "unknown"


def build_report(
    job_dir: Path,
    events: Sequence[Mapping[str, Any]] = (),
    prices: Mapping[str, float] | None = None,
    thresholds: Thresholds | None = None,
) -> Report:
    """The report of the job whose (local copy of its) directory is `job_dir`.

    events: the fleet's events, dicts {"t", "node", "kind", "detail"}; prices: node name
    -> USD/hour. Works on a finished job and on one still running."""
    thresholds = thresholds or Thresholds()
    job_dir = Path(job_dir)
    job = load_job(job_dir)
    data_start, _ = _job_time_bounds(job, ())
    parsed = _events_of_the_job(
        sorted((e for e in (Event.parse(raw) for raw in events) if e is not None), key=lambda e: e.t),
        data_start,
        set(job.nodes),
    )
    job_start, report_t = _job_time_bounds(job, parsed)
    report_t = report_t if report_t is not None else _time.time()
    events_by_node: dict[str, list[Event]] = defaultdict(list)
    for event in parsed:
        events_by_node[event.node].append(event)
    worker_job = any(f.workers for f in job.nodes.values())
    notes: list[str] = []
    if not job_dir.is_dir():
        notes.append(f"job directory {job_dir} does not exist: only the fleet's events are reported")
    elif not job.nodes:
        notes.append("no metrics yet: metrics/ is empty or missing")

    analyses = [
        _NodeAnalysis(files, events_by_node.get(name, []), job, report_t, thresholds, worker_job)
        for name, files in sorted(job.nodes.items())
    ]
    share = _redone_share(job, analyses)
    for analysis in analyses:
        analysis.settle_redone(share)
    event_only = [name for name in sorted(events_by_node) if name not in job.nodes]
    node_reports: list[NodeReport] = []
    times: dict[str, NodeTime] = {}
    for analysis in analyses:
        span = analysis.data_span
        busy = analysis.stage_sums["wait"] + analysis.stage_sums["compute"]
        compute_fraction = (
            min(1.0, analysis.stage_sums["compute"] / analysis.worker_seconds)
            if analysis.worker_seconds > 0 and busy > 0
            else (0.0 if analysis.files.workers else None)
        )
        times[analysis.name] = account_node(
            analysis.events,
            span[0] if span else None,
            span[1] if span else None,
            analysis.worker_window,
            compute_fraction,
            analysis.lost_fraction,
            report_t,
            analysis.files.interval,
            counts_as_compute=analysis.verdict.kind not in ("idle", "starved"),
            job_start=data_start,
        )
    for name in event_only:
        times[name] = account_node(
            events_by_node[name], None, None, None, None, 0.0, report_t, 1.0, False, job_start=data_start
        )
        if name.endswith("-head"):
            notes.append(
                f"{name}: the head serves the shared disk and runs no part of the job; counted in cost"
            )
    cost = cost_summary(times, prices, _items_done(job, analyses))
    for analysis in analyses:
        node_reports.append(
            NodeReport(
                name=analysis.name,
                verdict=analysis.verdict,
                stats=analysis.stats,
                stages=analysis.stages,
                input_wait_pct=analysis.input_wait_pct,
                worker_busy_pct=analysis.worker_busy_pct,
                items=analysis.items,
                items_s=analysis.items_s,
                device=analysis.device,
                ncpu=analysis.files.ncpu,
                gpus=analysis.gpus,
                window=analysis.window,
                samples=len(analysis.samples),
                coverage_pct=_coverage(analysis),
                missing=analysis.missing,
                preempted_at=analysis.preempted_at,
                events=analysis.events,
                worker_marks=analysis.worker_marks(report_t),
                series=_series(analysis.files),
                time=times[analysis.name],
                cost_usd=cost["per_node_usd"].get(analysis.name),
            )
        )
    for name in event_only:
        if name.endswith("-head"):
            continue
        verdict = Verdict(
            "idle",
            ("no metrics from this node",),
            "The node ran no part of the job: check logs/<node>.log, or remove it.",
        )
        node_reports.append(
            NodeReport(
                name=name,
                verdict=verdict,
                stats={k: Stat(None, None) for k in STAT_NAMES},
                stages={k: None for k in STAGES},
                input_wait_pct=None,
                worker_busy_pct=None,
                items=0,
                items_s=None,
                device=None,
                ncpu=None,
                gpus=[],
                window=None,
                samples=0,
                coverage_pct=None,
                missing=[f"no samples: metrics/{name}.jsonl is missing", "no worker stage timings"],
                preempted_at=first(events_by_node[name], "preempted"),
                events=events_by_node[name],
                worker_marks=[],
                series=Series(),
                time=times[name],
                cost_usd=cost["per_node_usd"].get(name),
            )
        )
    fleet = _fleet_summary(job, analyses, node_reports)
    totals = {
        key: sum(getattr(t, key) for t in times.values())
        for key in ("provisioning", "setup", "mounting", "compute", "waiting", "lost_to_preemption", "idle")
    }
    totals["node_seconds"] = sum(t.alive for t in times.values())
    # The report spans the job's records and the accounted part of each node's life
    # (a node up long before the job is counted from the job's start: timeline.py).
    starts = [t.start for t in times.values() if t.start is not None]
    if data_start is not None or starts:
        job_start = min([*starts, *([data_start] if data_start is not None else [])])
    totals["wall"] = (report_t - job_start) if job_start is not None else 0.0
    return Report(
        job=job.job,
        status=_status(job),
        start=job_start,
        end=report_t,
        fleet=fleet,
        nodes=node_reports,
        time=totals,
        cost=cost,
        notes=notes,
        thresholds=thresholds,
    )


def _coverage(analysis: _NodeAnalysis) -> float | None:
    if not analysis.window or not analysis.samples:
        return None
    expected = (analysis.window[1] - analysis.window[0]) / analysis.files.interval
    return min(100.0, 100.0 * len(analysis.samples) / expected) if expected >= 1 else 100.0


def _items_done(job: JobFiles, analyses: Sequence[_NodeAnalysis]) -> int:
    if job.done:
        return sum(d.items for d in job.done)
    return sum(a.items for a in analyses)


def _fleet_summary(
    job: JobFiles, analyses: Sequence[_NodeAnalysis], reports: Sequence[NodeReport]
) -> FleetSummary:
    weighted: dict[str, float | None] = {}
    for name in STAT_NAMES:
        pairs = [
            (a.stats[name].mean, (a.window[1] - a.window[0]) if a.window else 0.0)
            for a in analyses
            if a.stats[name].mean is not None
        ]
        total_weight = sum(w for _, w in pairs)
        weighted[name] = (
            sum(v * w for v, w in pairs) / total_weight if total_weight > 0 else mean([v for v, _ in pairs])  # type: ignore[misc]
        )
    stage_sums = {stage: sum(a.stage_sums[stage] for a in analyses) for stage in STAGES}
    stage_total = sum(stage_sums.values())
    stages = {k: (100.0 * v / stage_total if stage_total else None) for k, v in stage_sums.items()}
    windows = [a.worker_window for a in analyses if a.worker_window]
    items = _items_done(job, analyses)
    processed = sum(a.items for a in analyses)
    span = (max(w[1] for w in windows) - min(w[0] for w in windows)) if windows else 0.0
    verdicts = [
        (r.name, r.verdict, a.worker_seconds or ((a.window[1] - a.window[0]) if a.window else 0.0))
        for r, a in zip(reports, analyses)
    ] + [(r.name, r.verdict, 0.0) for r in reports[len(analyses) :]]
    return FleetSummary(
        verdict=classify_fleet(verdicts),
        stats=weighted,
        stages=stages,
        items=items,
        items_failed=sum(d.failed for d in job.done),
        items_total=job.total_items,
        items_s=(processed / span) if span > 0 else None,
        nodes=len(reports),
    )
