"""`fleet serve JOB.yaml [--detach]`: serve a model on the fleet's nodes.

The job (a job.yaml with a `serve:` section) goes through the job machinery of
`fleet.jobs` like any other: it is submitted to the shared dir, and the launcher starts
`python -m fleet.worker.serve` on every selected node, detached from the SSH session,
beside the sampler (so `fleet report` covers it) and the preemption-notice watcher.
`fleet jobs`, `fleet logs` and `fleet cancel` work on it as on a batch job.

In the foreground the command waits until every node has loaded its model, then runs
the monitor: preempted workers are replaced and the replacements get the server.
Ctrl-C (or SIGTERM) stops the monitor and the servers, which finish what they hold.
`--detach` returns once the servers are started; programs call them with
`fleet.connect(...).serving(name)`.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

from fleet.cli_base import err, out
from fleet.cli_base import open_fleet as _open_fleet
from fleet.cli_jobs import end_monitor, job_monitor
from fleet.errors import JobError, UsageError
from fleet.spec.loader import load_job_spec

_POLL_S = 1.0


def register(add) -> None:
    sub = add("serve", cmd_serve, "serve a model (job.yaml with `serve:`) on the fleet; call it with fleet.connect")
    sub.add_argument("job")
    sub.add_argument("--detach", action="store_true", help="start the servers and return at once")
    sub.add_argument("--ready-timeout", type=float, default=600.0,
                     help="give up when the models are not loaded after this many seconds (exit 1)")


def wait_ready(fleet, runner, *, timeout: float) -> set[str]:
    """Block until every selected node has each model process loaded; raise JobError when
    a node's launcher ended (the server failed) or `timeout` passes."""
    from fleet.serve.registry import read_registry, ready_nodes

    deadline = time.monotonic() + timeout
    while True:
        nodes = fleet.observe()
        wanted = {n.name for n in runner.selected(nodes)}
        ready = ready_nodes(read_registry(runner, runner.head(nodes))) & wanted
        if wanted and ready == wanted:
            return ready
        progress = runner.progress(nodes)
        failed = [name for name in progress.failed_nodes if name in wanted]
        if failed:
            raise JobError(f"the server of {runner.job.name} failed on {', '.join(sorted(failed))}",
                           hint=f"`fleet logs {runner.job.name}` shows why")
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(wanted - ready)) or "every node"
            raise JobError(f"the model of {runner.job.name} is not loaded on {missing} after {timeout:g} s",
                           hint=f"`fleet logs {runner.job.name}` shows what the servers do")
        time.sleep(_POLL_S)


def cmd_serve(args: argparse.Namespace) -> int:
    from fleet.jobs import JobRunner

    job = load_job_spec(Path(args.job))
    if job.serve is None:
        raise UsageError(f"{args.job}: job {job.name!r} has no `serve:` section",
                         hint="batch jobs (`worker:` or `run:`) run with `fleet run`")
    with _open_fleet(args) as fleet:
        runner = JobRunner(fleet, job)
        nodes = fleet.observe()
        state = runner.submit(nodes)
        runner.prepare(nodes)
        first = runner.start(fleet.alive(nodes), all_nodes=nodes)
        for result in first.results.values():
            if not result.ok:
                err.print(f"{result.node}: could not start: {result.describe()}", style="red", markup=False)
        fleet.state.set_job_status(job.name, "serving")
        if args.detach:
            out.print(f"serving {job.name} started ({state}); call it with fleet.connect(...).serving({job.name!r}); "
                      f"stop it with `fleet cancel {job.name}`")
            return 0

        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        monitor, thread = job_monitor(fleet, runner)
        cancelled = False
        try:
            ready = wait_ready(fleet, runner, timeout=args.ready_timeout)
            out.print(f"serving {job.name} on {len(ready)} node(s): {', '.join(sorted(ready))}; "
                      "Ctrl-C stops it", markup=False)
            thread.start()
            while not stop.wait(_POLL_S * 5):
                try:
                    if runner.progress(fleet.observe()).cancelled:
                        cancelled = True
                        break
                except JobError as error:
                    fleet.state.add_event("progress_error", None, str(error))
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            end_monitor(monitor, thread)
            if not cancelled:
                runner.cancel(fleet.observe())
                fleet.state.set_job_status(job.name, "stopped")
                err.print(f"serving {job.name} stopped", markup=False)
        return 0
