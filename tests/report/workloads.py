"""Synthetic workloads with a known bottleneck, run as real processes by the report tests.

    python workloads.py cpu     JOB_DIR NODE SECONDS   # worker loop whose compute is busy hashing
    python workloads.py starved JOB_DIR NODE SECONDS   # worker loop fed by a throttled reader
    python workloads.py idle    SECONDS                # a process that does nothing
    python workloads.py spin    SECONDS NPROC          # a `run:` job: NPROC busy processes, no timings

The worker loops have the shape of the bundled worker's pipeline (a reader thread fills
a bounded prefetch queue, the compute loop takes batches from it, a writer finishes
them) and record their stage timings with the worker's own `WorkerMetrics`, so the
metric lines are exactly the ones the bundled worker writes.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue
import sys
import threading
import time
from pathlib import Path

from fleet.worker.metrics import JsonLinesLog, WorkerMetrics

BATCH = 16


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    data = b"x" * 4096
    while time.perf_counter() < end:
        data = hashlib.sha256(data).digest() * 128


def worker_loop(job_dir: Path, node: str, seconds: float, read_delay_s: float, compute_s: float) -> None:
    log = JsonLinesLog(job_dir / "metrics" / f"{node}.worker0.jsonl", flush_interval=0.5)
    metrics = WorkerMetrics(log, node=node, proc=0, device="cpu")
    metrics.start(handler="synthetic", mode="files", batch_size=BATCH, job=job_dir.name)
    items: queue.Queue[tuple[bytes, float]] = queue.Queue(maxsize=4 * BATCH)
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            if read_delay_s:
                time.sleep(read_delay_s)  # throttled storage: each read takes this long
            item = b"item" * 64
            try:
                items.put((item, time.perf_counter() - started), timeout=0.2)
            except queue.Full:
                continue

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch: list[tuple[bytes, float]] = []
        waited_from = time.perf_counter()
        while len(batch) < BATCH and time.monotonic() < deadline:
            try:
                batch.append(items.get(timeout=0.05))
            except queue.Empty:
                continue
        wait_s = time.perf_counter() - waited_from
        if not batch:
            continue
        started = time.perf_counter()
        if compute_s:
            _busy(compute_s)
        for item, _ in batch:
            hashlib.sha256(item).hexdigest()
        compute = time.perf_counter() - started
        metrics.batch(
            items=len(batch),
            read_s=sum(load for _, load in batch),
            wait_s=wait_s,
            compute_s=compute,
            write_s=0.0005,
        )
    stop.set()
    metrics.stop("done")


def _spin_forever(seconds: float) -> None:
    _busy(seconds)


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "cpu":
        worker_loop(Path(argv[1]), argv[2], float(argv[3]), read_delay_s=0.0, compute_s=0.25)
    elif mode == "starved":
        worker_loop(Path(argv[1]), argv[2], float(argv[3]), read_delay_s=0.02, compute_s=0.0)
    elif mode == "idle":
        time.sleep(float(argv[1]))
    elif mode == "spin":
        seconds, count = float(argv[1]), int(argv[2])
        workers = [multiprocessing.Process(target=_spin_forever, args=(seconds,)) for _ in range(count)]
        for process in workers:
            process.start()
        for process in workers:
            process.join()
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
