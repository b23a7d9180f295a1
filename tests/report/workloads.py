"""Synthetic processes for the report tests (jobs with worker timings run the real
worker instead: see conftest.run_worker_job).

    python workloads.py idle SECONDS         # a process that does nothing
    python workloads.py spin SECONDS NPROC   # a `run:` job: NPROC busy processes, no timings
"""

from __future__ import annotations

import hashlib
import multiprocessing
import sys
import time


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    data = b"x" * 4096
    while time.perf_counter() < end:
        data = hashlib.sha256(data).digest() * 128


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "idle":
        time.sleep(float(argv[1]))
    elif mode == "spin":
        seconds, count = float(argv[1]), int(argv[2])
        workers = [multiprocessing.Process(target=_busy, args=(seconds,)) for _ in range(count)]
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
