"""`python -m fleet.worker JOB_DIR` / `fleet-worker JOB_DIR`: the worker's command line.

    fleet-worker JOB_DIR [--node NAME] [--device auto|cpu|cuda|cuda:N] [--processes auto|N]
    fleet-worker JOB_DIR --init      freeze the chunk list and exit (idempotent)
    fleet-worker JOB_DIR --status    print one JSON object: {"total", "done", "failed",
                                     "chunks", "chunks_done", "claimed", "frozen"}

Runs until no work is left and exits 0 (also after SIGTERM/SIGINT: graceful stop).
Exit 2 on a fatal problem (bad job.yaml, inputs that match nothing, ...), with a
one-line message and no traceback; exit 1 when the worker failed at run time.

`--processes auto` starts one worker process per visible CUDA GPU (each with its own
CUDA_VISIBLE_DEVICES, started with spawn: never a fork after CUDA is initialised), and
one process on a CPU-only node. The parent forwards SIGTERM/SIGINT to its children.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import traceback
from typing import Any

from fleet.worker.errors import WorkerError
from fleet.worker.layout import JobLayout, load_worker_config
from fleet.worker.runner import run_child

PROG = "fleet-worker"


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
    """Identifiers to put in each child's CUDA_VISIBLE_DEVICES."""
    try:
        import torch
    except ImportError:
        return []
    count = torch.cuda.device_count()
    listed = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return listed[:count]
    return [str(i) for i in range(count)]


def _process_plan(processes: str, device: str, uses_device: bool) -> tuple[int, list[str]]:
    """(number of processes, GPU id per process or [] for none)."""
    if processes != "auto":
        try:
            count = int(processes)
        except ValueError:
            raise WorkerError(f"--processes: expected 'auto' or a number, got {processes!r}") from None
        if count < 1 or count > 1024:
            raise WorkerError(f"--processes: {count} is out of range (1..1024)")
        gpus = _visible_gpus() if uses_device and device in ("auto", "cuda") and count > 1 else []
        return count, [gpus[i % len(gpus)] for i in range(count)] if gpus else []
    if not uses_device or device == "cpu" or device.startswith("cuda:"):
        return 1, []
    gpus = _visible_gpus()
    if len(gpus) <= 1:
        return 1, []
    return len(gpus), gpus


def _run_processes(job_dir: str, node: str, device: str | None, count: int, gpus: list[str]) -> int:
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(
            target=run_child,
            args=(job_dir, node, i, gpus[i] if gpus else None, device),
            name=f"fleet-worker-{i}",
        )
        for i in range(count)
    ]

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.start()
        for child in children:
            child.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [child.exitcode or 0 for child in children]
    return 0 if all(code == 0 for code in codes) else max(1, *[abs(c) for c in codes])


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
        if count == 1:
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
