"""The job commands of the CLI: run, jobs, logs, cancel, watch, report.

`fleet run` submits the job, starts it on every selected node, runs the monitor in a
background thread (lost nodes are replaced and given the job), and shows progress until
every item is done or recorded as failed. It ends on its own when nothing can finish
the job: no node could start it (its setup failed everywhere, after its retries), or
the head is gone past `monitor.grace` and the monitor is not bringing a new one. A
launcher whose heartbeat goes stale on a live node is restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fleet.cli_base import err, out
from fleet.cli_base import open_fleet as _open_fleet
from fleet.errors import FleetError, JobError
from fleet.spec.loader import load_job_spec
from fleet.textsafe import plain

if TYPE_CHECKING:
    from fleet.monitor import Monitor, OnReplaced

_STALL_GRACE_S = 15.0
_SETTLE_S = 15.0


def register(add) -> None:
    sub = add("run", cmd_run, "run a job (job.yaml) on the fleet until it is finished")
    sub.add_argument("job")
    sub.add_argument("--detach", action="store_true", help="start the job and return at once")
    sub.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
    sub.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 1)")
    sub = add("jobs", cmd_jobs, "list the jobs run on this fleet")
    sub.add_argument("--json", action="store_true")
    sub = add("logs", cmd_logs, "show a job's logs")
    sub.add_argument("job")
    sub.add_argument("--node", default=None)
    sub.add_argument("--follow", action="store_true")
    sub = add("cancel", cmd_cancel, "stop a job's processes everywhere")
    sub.add_argument("job")
    sub = add("watch", cmd_watch, "run the monitor in the foreground: replace lost nodes")
    sub.add_argument("--passes", type=int, default=0, help="stop after this many passes (0: never)")
    sub = add("report", cmd_report, "where the time of a job went: CPU, disk, network, GPU per node")
    sub.add_argument("job")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--html", default=None, metavar="PATH")
    sub.add_argument("--png", default=None, metavar="DIR")


def _runner(fleet, job):
    from fleet.jobs import JobRunner

    return JobRunner(fleet, job)


def hand_over(fleet, runners) -> OnReplaced:
    """The monitor's `on_replaced`: every node it brought up (a replacement, a node
    brought forward, a restarted or new head) gets the processes of the jobs `runners()`
    returns (one start at a time). Processes such a node still runs are stopped first:
    they hold a mount that died with its head (a fresh node has none). A new head first
    gets the job's launcher and env back, and its packer."""
    from fleet.model import Role

    lock = threading.Lock()

    def on_replaced(new_nodes, alive) -> None:
        with lock:
            for runner in runners():
                try:
                    for head in (n for n in new_nodes if n.role == Role.HEAD):
                        runner.install([head])
                        runner.start_packer(head)
                    runner.stop_processes(new_nodes, handover=True)
                    runner.start(new_nodes, all_nodes=alive)
                except FleetError as error:
                    fleet.state.add_event("handover_failed", None, f"job {runner.job.name}: {error}")

    return on_replaced


def running_jobs(fleet) -> list:
    """A runner for each job the fleet's record says is running (`fleet run --detach`)."""
    from fleet.jobs import job_from_state

    return [_runner(fleet, job_from_state(fleet, job.name)) for job in fleet.state.jobs() if job.status == "running"]


def job_monitor(fleet, runner) -> tuple[Monitor, threading.Thread]:
    """The monitor of a running job or serving, in a thread not yet started: each node it
    brings up in place of a lost one gets the job's processes. It runs on a session of
    its own (`Fleet.session`: SSH connections, cloud clients, state connection), so that
    it never waits on the follower's connections and `end_monitor` cuts its pass short."""
    from fleet.monitor import Monitor

    monitor = Monitor(fleet.session(threading.Event()), on_replaced=hand_over(fleet, lambda: [runner]))
    return monitor, threading.Thread(target=monitor.run, name="fleet-monitor", daemon=True)


def end_monitor(monitor: Monitor, thread: threading.Thread) -> None:
    """Stop a `job_monitor`: a pass in progress gives up its waits (SSH readiness, cloud
    operations, commands) at once; then its session's connections are closed."""
    monitor.stop()
    if thread.is_alive():
        thread.join(timeout=60)
    if not thread.is_alive():
        monitor.fleet.close()


def cmd_run(args: argparse.Namespace) -> int:

    job = load_job_spec(Path(args.job))
    quiet = args.json
    with _open_fleet(args, quiet=quiet) as fleet:
        runner = _runner(fleet, job)
        started = time.time()
        nodes = fleet.observe()
        state = runner.submit(nodes)
        runner.prepare(nodes)
        first = runner.start(fleet.alive(nodes), all_nodes=nodes)
        for result in first.results.values():
            if not result.ok:
                err.print(plain(f"{result.node}: could not start: {runner.redact(result.describe())}", style="red"))
        if first.results and not any(result.ok for result in first.results.values()):
            # Nothing runs anywhere (e.g. no node has the runtime): following would only stall.
            fleet.state.set_job_status(job.name, "failed")
            err.print(plain(f"job {job.name}: no node could start it", style="red"))
            return 1
        fleet.state.set_job_status(job.name, "running")
        if args.detach:
            out.print(f"job {job.name} started ({state}); follow it with `fleet logs {job.name} --follow`")
            return 0

        monitor, thread = job_monitor(fleet, runner)
        thread.start()
        try:
            summary = _follow(fleet, runner, monitor, started, args)
        finally:
            end_monitor(monitor, thread)
        stopped = summary.pop("stopped", None)
        fleet.state.set_job_status(job.name, "finished" if summary["ok"] else "failed", summary)
        ok = summary.pop("ok")
        if stopped:
            err.print(plain(f"job {job.name}: {stopped}", style="red"))
        if args.json:
            print(json.dumps(summary))
        else:
            out.print(f"job {job.name}: {summary['done']}/{summary['total']} done, {summary['failed']} failed, "
                      f"{summary['replacements']} node(s) replaced, {summary['seconds']:.1f} s")
        return 0 if ok else 1


def _follow(fleet, runner, monitor, started: float, args: argparse.Namespace) -> dict:
    job = runner.job
    interactive = sys.stderr.isatty() and not args.json
    replacements_start = fleet.state.count_events("replaced", since=started)
    last_line = 0.0
    deadline = started + args.timeout if args.timeout else None
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[rate]:.1f} items/s"), TimeRemainingColumn(),
                   TextColumn("{task.fields[extra]}"), console=err, transient=False) if interactive else None
    task = bar.add_task(job.name, total=None, rate=0.0, extra="") if bar else None
    if bar:
        bar.start()
    ok = False
    progress = None
    idle_since: float | None = None
    stopped: str | None = None
    head_watch = _HeadWatch(fleet, monitor)
    try:
        while True:
            try:
                nodes = fleet.observe()
                progress = runner.progress(nodes)
            except FleetError as error:  # the head or the provider API does not answer
                progress = None
                stopped = head_watch.failed(error)
                if stopped:
                    fleet.state.add_event("stopped", None, f"job {job.name}: {stopped}")
                    break
            else:
                head_watch.answered()
            elapsed = time.time() - started
            replacements = fleet.state.count_events("replaced", since=started) - replacements_start
            if progress is not None:
                rate = progress.done / elapsed if elapsed > 0 else 0.0
                extra = (f"{progress.running_nodes} working, {replacements} replaced, {progress.failed} failed")
                if bar is not None:
                    bar.update(task, total=progress.total or None, completed=progress.done + progress.failed,
                               rate=rate, extra=extra)
                elif not args.json and time.time() - last_line >= 5:
                    last_line = time.time()
                    err.print(f"{job.name}: {progress.done + progress.failed}/{progress.total} items, "
                              f"{rate:.1f} items/s, {extra}", markup=False)
                selected = runner.selected(nodes)
                if job.run:
                    # A `run:` process that failed after its retries is a failed job, not
                    # an item "recorded as failed" the way the worker records items.
                    if selected and progress.finished_nodes >= len(selected):
                        ok = progress.failed == 0
                        break
                elif progress.complete:
                    ok = True
                    _settle(fleet, runner, progress)
                    break
                if progress.cancelled:
                    fleet.state.add_event("stopped", None, f"job {job.name} was cancelled")
                    break
                if progress.stale_nodes and not progress.cancelled:
                    runner.restart_stale(progress.stale_nodes, nodes)
                if monitor.exhausted and not any(n for n in selected):
                    break
                # Every process of a worker job ended and items are left (they crashed, or
                # were stopped): waiting longer would wait forever. A replacement that is
                # being brought up has no process yet, hence the grace window.
                if job.worker is not None and selected and progress.running_nodes == 0:
                    idle_since = idle_since or time.time()
                    if time.time() - idle_since >= _STALL_GRACE_S:
                        fleet.state.add_event("stalled", None, f"job {job.name}: every process ended with "
                                              f"{progress.total - progress.done - progress.failed} item(s) left")
                        break
                else:
                    idle_since = None
            if deadline and time.time() > deadline:
                fleet.state.add_event("timeout", None, f"job {job.name} gave up after {args.timeout:g} s")
                break
            time.sleep(1.0)
    finally:
        if bar:
            bar.stop()
    return {
        "job": job.name,
        "total": progress.total if progress else 0,
        "done": progress.done if progress else 0,
        "failed": progress.failed if progress else 0,
        "replacements": fleet.state.count_events("replaced", since=started) - replacements_start,
        "seconds": round(time.time() - started, 3),
        "ok": ok,
        **({"stopped": stopped} if stopped else {}),
    }


class _HeadWatch:
    """How long the job's progress has been unreadable (the head does not answer or is
    gone, or the cloud API fails past its retries), and when that ends `fleet run`:
    after `monitor.grace`, unless the monitor is bringing a new head (then until it
    has had `ssh.ready_timeout` more). One event per outage, not one per second."""

    def __init__(self, fleet, monitor) -> None:
        self.fleet = fleet
        self.monitor = monitor
        self.since: float | None = None
        self.reported = False

    def answered(self) -> None:
        if self.since is not None and self.reported:
            self.fleet.state.add_event("progress_resumed", None, f"the job's progress answers again after "
                                       f"{time.time() - self.since:.0f} s")
        self.since, self.reported = None, False

    def failed(self, error: FleetError) -> str | None:
        now = time.time()
        if self.since is None:
            self.since = now
        if not self.reported:
            self.reported = True
            self.fleet.state.add_event("progress_error", None, str(error))
            err.print(plain(f"cannot read the job's progress: {error}; waiting up to "
                            f"{self.fleet.spec.monitor.grace:g} s for it", style="yellow"))
        grace = self.fleet.spec.monitor.grace
        if self.monitor.replacing_head():
            grace += self.fleet.spec.ssh.ready_timeout
        if now - self.since < grace:
            return None
        return (f"stopped: the job's progress could not be read for {now - self.since:.0f} s "
                f"(monitor.grace is {self.fleet.spec.monitor.grace:g} s) and no new head is on its way; "
                f"last error: {error}. The job's state stays on the head's shared directory: once the "
                "head is back (`fleet up`), `fleet run` resumes it")


def _settle(fleet, runner, progress) -> None:
    """Every item is done: give the processes a moment to see it and exit, then delete
    the temporary files that writers killed by preemptions left behind."""
    deadline = time.time() + _SETTLE_S
    while progress.running_nodes and time.time() < deadline:
        time.sleep(1.0)
        try:
            progress = runner.progress(fleet.observe())
        except JobError:
            break
    runner.sweep_temporaries(fleet.observe())


def cmd_jobs(args: argparse.Namespace) -> int:
    with _open_fleet(args, quiet=True) as fleet:
        jobs = fleet.state.jobs()
        if args.json:
            print(json.dumps([{"name": j.name, "status": j.status, "summary": j.summary,
                               "created_at": j.created_at} for j in jobs]))
            return 0
        table = Table(title=f"jobs of fleet {fleet.spec.name}")
        for column in ("job", "status", "done", "failed", "total", "started"):
            table.add_column(column)
        for j in jobs:
            table.add_row(j.name, j.status, str(j.summary.get("done", "-")), str(j.summary.get("failed", "-")),
                          str(j.summary.get("total", "-")), time.strftime("%Y-%m-%d %H:%M", time.localtime(j.created_at)))
        out.print(table)
        return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from fleet.jobs import job_from_state

    with _open_fleet(args, quiet=True, stream=True) as fleet:
        job = job_from_state(fleet, args.job)
        runner = _runner(fleet, job)
        head = runner.head(fleet.observe())
        command = runner.log_command(args.node, follow=args.follow, head=head)
        try:
            result = fleet.executor.run([fleet.target(head)], command, stream=True,
                                        timeout=None if args.follow else 120).results[head.name]
        except KeyboardInterrupt:
            return 0
        return 0 if result.ok else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from fleet.jobs import job_from_state

    with _open_fleet(args) as fleet:
        job = job_from_state(fleet, args.job)
        results = _runner(fleet, job).cancel(fleet.observe())
        out.print(f"job {job.name} cancelled on {len(results.results)} node(s); outputs already written stay valid")
        return 0 if results.ok else 1


def cmd_watch(args: argparse.Namespace) -> int:
    from fleet.monitor import Monitor

    with _open_fleet(args) as fleet:
        seen = len(fleet.state.events())
        # Nodes it brings up get the jobs left running (`fleet run --detach`).
        monitor = Monitor(fleet, on_replaced=hand_over(fleet, lambda: running_jobs(fleet)))
        passes = 0
        try:
            while True:
                monitor.reconcile_once()
                for event in fleet.state.events()[seen:]:
                    out.print(plain(f"{time.strftime('%H:%M:%S', time.localtime(event.t))} {event.node or '-'} "
                                    f"{event.kind}: {event.detail}"))
                seen = len(fleet.state.events())
                passes += 1
                if args.passes and passes >= args.passes:
                    return 0
                time.sleep(fleet.spec.monitor.interval)
        except KeyboardInterrupt:
            return 0


def _fetch_job_dir(fleet, runner, cache: Path) -> None:
    """Copy the job's directory from the head into `cache` (replaced whole, atomically)."""
    head = runner.head(fleet.observe())
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=fleet.paths.state_dir))
    try:
        remote = f"{fleet.spec.shared.path.rstrip('/')}/{runner.rel_dir}"
        fleet.executor.get_tree(fleet.target(head), remote, tmp)
        if cache.exists():
            shutil.rmtree(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_report(args: argparse.Namespace) -> int:
    from fleet.jobs import job_from_state
    from fleet.report import build_report, render_terminal, write_html, write_png

    with _open_fleet(args, quiet=True) as fleet:
        job = job_from_state(fleet, args.job)
        runner = _runner(fleet, job)
        cache = fleet.paths.state_dir / "jobs" / job.name
        try:
            _fetch_job_dir(fleet, runner, cache)
        except FleetError as error:
            if not cache.is_dir():
                raise
            fetched = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cache.stat().st_mtime))
            err.print(plain(f"{error}; reporting from the copy fetched at {fetched}"))
        events = [e.to_dict() for e in fleet.state.events()]
        try:
            prices = fleet.hourly_prices({e["node"] for e in events if e.get("node")})
        except FleetError as error:  # no price is no reason to withhold the report
            err.print(plain(f"no prices: {error}"))
            prices = {}
        report = build_report(cache, events=events, prices=prices)
        if args.json:
            print(json.dumps(report.to_json()))
        else:
            render_terminal(report, out)
        if args.html:
            write_html(report, Path(args.html))
            err.print(f"wrote {args.html}")
        if args.png:
            write_png(report, Path(args.png))
            err.print(f"wrote charts to {args.png}")
        return 0
