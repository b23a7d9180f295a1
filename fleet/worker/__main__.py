"""`python -m fleet.worker JOB_DIR` / `fleet-worker JOB_DIR`: the worker's command line.

    fleet-worker JOB_DIR [--node NAME] [--device auto|cpu|cuda|cuda:N] [--processes auto|N]
    fleet-worker JOB_DIR --init      freeze the chunk list and exit (idempotent)
    fleet-worker JOB_DIR --status    print one JSON object: {"total", "done", "failed",
                                     "chunks", "chunks_done", "claimed", "frozen"}

Runs until no work is left and exits 0 (also after SIGTERM/SIGINT: graceful stop).
Exit 2 on a fatal problem (bad job.yaml, inputs that match nothing, ...), with a
one-line message and no traceback; exit 1 when the worker failed at run time.

`--processes auto` starts one worker process per visible CUDA GPU, or per MIG slice
(each bound by UUID in its own CUDA_VISIBLE_DEVICES, see `fleet.worker.gpus`; started
with spawn: never a fork after CUDA is initialised), and one process, in-process, on a
CPU-only node. The parent forwards SIGTERM/SIGINT to its children, and restarts a child
that fails (a GPU error exits 3: its CUDA context is broken, a fresh process gets a new
one; a crash dies of a signal) up to 3 times with a pause of 1, 2, 4 s; after that it
exits non-zero, and the node's launcher reports the node. A user error (exit 2) is not
retried. Exit codes: 0 done, 1 failed at run time, 2 bad job, 3 the GPU failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from typing import Any

from fleet.worker.errors import WorkerError
from fleet.worker.layout import JobLayout, load_worker_config
from fleet.worker.runner import run_child

PROG = "fleet-worker"
MAX_RESTARTS = 3  # per process slot
RESTART_PAUSE_S = 1.0  # doubled at each restart of the same slot ($FLEET_WORKER_RESTART_PAUSE_S)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run the bundled batch worker on a job directory."
    )
    parser.add_argument("job_dir", metavar="JOB_DIR", help="the job's directory on the shared filesystem")
    parser.add_argument("--node", help="this node's name (default: $FLEET_NODE_NAME, else the hostname)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the job's)")
    parser.add_argument("--processes", default="auto", help="auto (one per GPU) or a number (default auto)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--init", action="store_true", help="freeze the chunk list and exit")
    action.add_argument("--status", action="store_true", help="print the job's progress as JSON and exit")
    return parser


def _visible_gpus() -> list[str]:
    """Identifiers to put in each child's CUDA_VISIBLE_DEVICES (UUIDs, in PCI order)."""
    from fleet.worker.gpus import visible_units

    return visible_units()


def _process_plan(processes: str, device: str, uses_device: bool) -> tuple[int, list[str]]:
    """(number of processes, GPU id per process or [] for none)."""
    if processes != "auto":
        try:
            count = int(processes)
        except ValueError:
            raise WorkerError(f"--processes: expected 'auto' or a number, got {processes!r}") from None
        if count < 1 or count > 1024:
            raise WorkerError(f"--processes: {count} is out of range (1..1024)")
        gpus = _visible_gpus() if uses_device and device in ("auto", "cuda") else []
        return count, [gpus[i % len(gpus)] for i in range(count)] if gpus else []
    if not uses_device or device == "cpu" or device.startswith("cuda:"):
        return 1, []
    gpus = _visible_gpus()
    return max(1, len(gpus)), gpus


def _restart_pause_s() -> float:
    try:
        return max(0.0, float(os.environ.get("FLEET_WORKER_RESTART_PAUSE_S", RESTART_PAUSE_S)))
    except ValueError:
        return RESTART_PAUSE_S


def _run_processes(job_dir: str, node: str, device: str | None, count: int, gpus: list[str]) -> int:
    """Run `count` children and restart one that fails (a broken GPU exits 3, a crash
    dies of a signal), up to MAX_RESTARTS times each with a growing pause; a user error
    (exit 2) is not retried. Returns 0 when every child finished cleanly."""
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start(proc: int) -> Any:
        child = context.Process(
            target=run_child,
            args=(job_dir, node, proc, gpus[proc] if gpus else None, device, count),
            name=f"fleet-worker-{proc}",
        )
        child.start()
        return child

    running: dict[int, Any] = {}
    restarts = dict.fromkeys(range(count), 0)
    due: dict[int, float] = {}  # proc -> when to restart it
    codes: dict[int, int] = {}

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        due.clear()
        for child in list(running.values()):
            if child.pid is not None and child.exitcode is None:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for proc in range(count):
            running[proc] = start(proc)
        while running or due:
            now = time.monotonic()
            for proc, when in list(due.items()):
                if when <= now and not stopping:
                    del due[proc]
                    running[proc] = start(proc)
            timeout = min([max(0.0, when - now) for when in due.values()] + [1.0])
            multiprocessing.connection.wait([child.sentinel for child in running.values()], timeout)
            for proc, child in list(running.items()):
                if child.exitcode is None:
                    continue
                del running[proc]
                code = child.exitcode
                codes[proc] = code
                where = f" (GPU {gpus[proc]})" if gpus else ""
                if code == 0 or code == WorkerError.exit_code or stopping:
                    continue
                if restarts[proc] >= MAX_RESTARTS:
                    print(
                        f"{PROG}: process {proc}{where} failed {restarts[proc] + 1} times "
                        f"(last exit {code}); giving up on it",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                restarts[proc] += 1
                pause = _restart_pause_s() * 2 ** (restarts[proc] - 1)
                print(
                    f"{PROG}: process {proc}{where} exited {code}; restarting it in {pause:g} s "
                    f"({restarts[proc]}/{MAX_RESTARTS})",
                    file=sys.stderr,
                    flush=True,
                )
                due[proc] = time.monotonic() + pause
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    final = [codes.get(proc, 0) for proc in range(count)]
    return 0 if all(code == 0 for code in final) else max(1, *[abs(c) for c in final])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        layout = JobLayout.at(args.job_dir)
        if not layout.job_dir.is_dir():
            raise WorkerError(f"{layout.job_dir}: no such job directory")
        if args.status:
            from fleet.worker.claims import job_status
            from fleet.worker.inputs import load_chunk_list

            chunks = load_chunk_list(layout)
            per_chunk = None if chunks is None else {c.id: c.items for c in chunks.chunks}
            print(json.dumps(job_status(layout, per_chunk)))
            return 0
        config = load_worker_config(layout)
        if args.device is not None:
            import re

            from fleet.worker.config import DEVICE_PATTERN

            if not re.fullmatch(DEVICE_PATTERN, args.device):
                raise WorkerError(f"--device: expected auto, cpu, cuda or cuda:N, got {args.device!r}")
        from fleet.worker.inputs import freeze

        layout.make_dirs()
        chunks = freeze(layout, config)
        if args.init:
            print(json.dumps({"chunks": len(chunks.chunks), "total": chunks.total, "mode": chunks.mode}))
            return 0
        from fleet.worker.handlers import load_handler
        from fleet.worker.runner import node_name, run_worker

        node = node_name(args.node)
        uses_device = getattr(load_handler(config.handler, config.handler_options), "uses_device", True)
        count, gpus = _process_plan(args.processes, args.device or config.device, uses_device)
        if count == 1 and not gpus:  # CPU: in this process (a GPU's child can be restarted)
            summary = run_worker(layout.job_dir, node=node, device=args.device)
            return 1 if summary.get("reason") == "error" else 0
        return _run_processes(str(layout.job_dir), node, args.device, count, gpus)
    except WorkerError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; FLEET_DEBUG=1 for the traceback
        if os.environ.get("FLEET_DEBUG"):
            traceback.print_exc()
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
