"""Benchmark `sampler_overhead`: what the node sampler costs.

1. The sampler's own CPU at 1 Hz over 60 s (goal: under 1% of one core), measured from
   the kernel's accounting of the sampler process (`wait4` rusage: user + system,
   interpreter start-up and imports included), while it watches a busy job with
   `--pid` (so the process-tree path is measured too). The steady state (start-up
   excluded) is reported next to it.
2. A CPU-bound job's throughput with and without sampling (goal: ratio >= 0.99): the
   job (sha256 over 64 KiB blocks, one process, the reference) runs throughout; 5 s
   windows with the sampler running and with it paused (SIGSTOP) alternate in ABBA
   order, so that drift in the machine's load cancels out; `throughput_ratio` is the
   median over adjacent window pairs of items/s with / without (robust to a burst of
   outside load in one window), `ratio_of_means` the plain comparison.

Runs as `.venv/bin/python benchmarks/sampler_overhead.py [--seconds 60] [--window 10]`;
the last line of output is one JSON object:
{"cpu_pct_one_core", "throughput_ratio", ...}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def _job(counter: multiprocessing.sharedctypes.Synchronized, stop: multiprocessing.synchronize.Event) -> None:
    """The reference workload: hash 64 KiB blocks as fast as one core allows."""
    block = os.urandom(65536)
    done = 0
    while not stop.is_set():
        for _ in range(50):
            hashlib.sha256(block).digest()
        done += 50
        counter.value = done


def _sampler(out: Path, pid: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleet.worker.sampler",
            "--out",
            str(out),
            "--interval",
            "1",
            "--node",
            "bench",
            "--pid",
            str(pid),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _stop(process: subprocess.Popen[bytes]) -> float:
    """SIGTERM, reap, and return the process's CPU seconds (user + system)."""
    process.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(
            f"sampler exited {process.returncode}: {process.stderr.read().decode() if process.stderr else ''}"
        )
    return usage.ru_utime + usage.ru_stime


def _wait_lines(path: Path, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    raise SystemExit(f"the sampler wrote fewer than {count} lines in {timeout} s")


def measure_cpu(job_pid: int, seconds: float, workdir: Path) -> dict[str, float]:
    out = workdir / "cpu.jsonl"
    sampler = _sampler(out, job_pid)
    started = time.monotonic()
    _wait_lines(out, 1)  # the info line: start-up is over
    after_startup = time.monotonic()
    cpu_at_startup = sum(psutil.Process(sampler.pid).cpu_times()[:2])
    time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    wall = time.monotonic() - started
    cpu = _stop(sampler)
    samples = sum(1 for line in out.read_text().splitlines() if '"kind":"sample"' in line)
    return {
        "cpu_pct_one_core": 100.0 * cpu / wall,
        "cpu_pct_steady": 100.0 * (cpu - cpu_at_startup) / (time.monotonic() - after_startup),
        "startup_cpu_s": cpu_at_startup,
        "samples": samples,
        "wall_s": wall,
    }


def measure_throughput(
    counter: multiprocessing.sharedctypes.Synchronized, job_pid: int, window: float, pairs: int, workdir: Path
) -> dict[str, object]:
    """Items/s of the job in windows with the sampler running and windows with it
    paused (SIGSTOP: it does nothing at all), in ABBA order. One sampler process serves
    every window, so its start-up (reported apart) does not blur the comparison."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    sequence: list[float] = []
    sampler = _sampler(workdir / "throughput.jsonl", job_pid)
    _wait_lines(workdir / "throughput.jsonl", 1)
    try:
        for index in range(2 * pairs):
            sampling = index % 4 in (1, 2)  # A B B A A B B A ...
            sampler.send_signal(signal.SIGCONT if sampling else signal.SIGSTOP)
            before, t0 = counter.value, time.perf_counter()
            time.sleep(window)
            after, t1 = counter.value, time.perf_counter()
            rates[sampling].append((after - before) / (t1 - t0))
            sequence.append(rates[sampling][-1])
    finally:
        sampler.send_signal(signal.SIGCONT)
    _stop(sampler)
    without, with_ = statistics.mean(rates[False]), statistics.mean(rates[True])
    # Adjacent windows (A B, B A, ...) ran under the same outside load: the median of
    # their ratios is robust to a burst of load from other processes in one window.
    paired = [
        sequence[i + 1] / sequence[i] if i % 4 == 0 else sequence[i] / sequence[i + 1]
        for i in range(0, len(sequence) - 1, 2)
    ]
    return {
        "throughput_ratio": statistics.median(paired),
        "ratio_of_means": with_ / without,
        "items_s_without": without,
        "items_s_with": with_,
        "windows_without": [round(r) for r in rates[False]],
        "windows_with": [round(r) for r in rates[True]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="sampler CPU measurement (default 60)")
    parser.add_argument("--window", type=float, default=5.0, help="throughput window in s (default 5)")
    parser.add_argument("--pairs", type=int, default=8, help="windows of each kind (default 8)")
    args = parser.parse_args()

    counter = multiprocessing.Value("q", 0, lock=False)
    stop = multiprocessing.Event()
    job = multiprocessing.Process(target=_job, args=(counter, stop), daemon=True)
    job.start()
    try:
        time.sleep(1.0)  # let the job reach its pace
        with tempfile.TemporaryDirectory(prefix="sampler-bench-") as tmp:
            workdir = Path(tmp)
            cpu = measure_cpu(job.pid, args.seconds, workdir)
            print(
                f"sampler CPU over {cpu['wall_s']:.0f} s at 1 Hz: {cpu['cpu_pct_one_core']:.3f}% of one core "
                f"(steady state {cpu['cpu_pct_steady']:.3f}%, start-up {cpu['startup_cpu_s']:.2f} s CPU, "
                f"{cpu['samples']} samples)"
            )
            throughput = measure_throughput(counter, job.pid, args.window, args.pairs, workdir)
            print(
                f"job items/s without sampling {throughput['items_s_without']:.1f} "
                f"{throughput['windows_without']}, with {throughput['items_s_with']:.1f} "
                f"{throughput['windows_with']}: ratio {throughput['throughput_ratio']:.4f} (median of adjacent "
                f"pairs; ratio of means {throughput['ratio_of_means']:.4f})"
            )
    finally:
        stop.set()
        job.join(timeout=10)
        if job.is_alive():
            job.kill()
    result = {
        "cpu_pct_one_core": round(cpu["cpu_pct_one_core"], 4),
        "throughput_ratio": round(float(throughput["throughput_ratio"]), 4),
        "cpu_pct_steady": round(cpu["cpu_pct_steady"], 4),
        "startup_cpu_s": round(cpu["startup_cpu_s"], 3),
        "items_s_without": round(float(throughput["items_s_without"]), 1),
        "items_s_with": round(float(throughput["items_s_with"]), 1),
        "ratio_of_means": round(float(throughput["ratio_of_means"]), 4),
        "reference": "the same CPU-bound job without a sampler, in alternating windows of the same run",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
