"""serving: many callers with single items vs static batches, through `fleet serve`.

A local fleet (head + 2 workers, `monitor.interval` 2 s) serves the real text-embed
model (all-MiniLM-L6-v2; `batch_size` 64, `max_wait_ms` BENCH_MAX_WAIT_MS, default 20) with `fleet serve` in the
foreground (its monitor replaces preempted workers), and the bundled `checksum`
handler (a no-op next to a model) with `fleet serve --detach`. Measured in the same run:

1. static (the reference): the BENCH_ITEMS texts in static batches of 64, sent by two
   threads per server process, so every model always has its next batch waiting:
   `static_items_s`;
2. concurrent: the same texts, each its own `batched_run(text)` from 64 caller threads
   (the client sends the items of concurrent calls together, the servers batch them):
   `concurrent_items_s`, `ratio` (= concurrent / static, goal >= 0.9), per-call latency
   `p50_ms`, `p99_ms`; `static_mean_batch` and `concurrent_mean_batch` are the batch
   sizes the servers ran (64 callers over 2 servers make batches of 32 at most),
   `*_items_per_request` what each request the servers took carried, and
   `*_cpu_ms_per_item` the CPU time per item of this process (`caller`: its threads and
   SSH client) and of the nodes' processes (`nodes`: models, sshd, samplers);
3. path overhead: one thread calling the checksum serving with one 100-byte item,
   `noop_p50_ms`, against `local_p50_ms`, the same handler called in this process; and
   1 and 2 again with that no-op model (BENCH_NOOP_ITEMS items of 100 bytes, default
   4096), where the path is all there is to pay, as with a fast GPU model:
   `noop_static_items_s`, `noop_concurrent_items_s`, `noop_ratio`;
4. failover: 64 callers loop on single items; worker 1 is preempted without notice
   (`fleet preempt`). `lost` (calls without an answer), `answered_twice` (answers
   beyond one per call), `failover_max_latency_s` (kill -> answer, the longest of the
   calls in flight at the kill; goal <= monitor detection (the interval) + 2 s),
   `rejoin_s` (kill -> the first answer from the replacement), `resent`.

Model threads: the two workers of a local fleet share this machine's cores, and each
model process would start torch with a thread per core. Oversubscribed OpenMP threads
spin at every barrier, which costs small batches most: with two threads per model,
batches of 16-23 cost 1.5-2x the CPU per item of batches of 64 here, with one thread
the same (measured: `*_cpu_ms_per_item`). So the model job gets OMP_NUM_THREADS=
BENCH_MODEL_THREADS (default 1: a core per model process, as one model per GPU; empty:
torch's default), the same for both phases.

Env: BENCH_ITEMS (default 1024), BENCH_MAX_WAIT_MS, BENCH_MODEL_THREADS, BENCH_NOOP_ITEMS,
BENCH_KEEP=1 keeps the temporary directory.
Last line: one JSON object with the figures above.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "jobs"))

import psutil
from jobs_fleet import LocalFleet, finish_fleet, fleet_processes, wait_for  # the tests' real local fleet

import fleet
from fleet.serve.registry import ready_nodes
from fleet.worker.handlers.checksum import ChecksumHandler

N_ITEMS = int(os.environ.get("BENCH_ITEMS", "1024"))
MAX_WAIT_MS = float(os.environ.get("BENCH_MAX_WAIT_MS", "20"))
MODEL_THREADS = os.environ.get("BENCH_MODEL_THREADS", "1")  # "": torch's default (all cores)
NOOP_ITEMS = int(os.environ.get("BENCH_NOOP_ITEMS", "4096"))
CALLERS = 64
STATIC_BATCH = 64
INTERVAL = 2.0
SENTENCE = "a fleet of cheap preemptible machines serves one model to many callers at once"


def texts(n: int) -> list[str]:
    words = SENTENCE.split(" ")
    return [f"{i}: " + " ".join(words[(i + k) % len(words)] for k in range(4 + i % 24)) for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def registry(fleet_: LocalFleet, job: str) -> list[dict]:
    records = []
    for path in (fleet_.job_dir(job) / "servers").glob("*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return records


def items_per(lf: LocalFleet, job: str, counter: str,
              before: tuple[int, int] = (0, 0)) -> tuple[tuple[int, int], float]:
    """(items, `counter`) the job's servers counted so far (their /health, seen from their
    nodes: `batches` run or `requests` taken), and the items per one since `before`."""
    items = count = 0
    for record in registry(lf, job):
        health = lf.server_health(record)
        items, count = items + health["items"], count + health[counter]
    since = count - before[1]
    return (items, count), round((items - before[0]) / since, 1) if since else 0.0


class CpuMeter:
    """CPU seconds spent by this process (the caller: threads, SSH client) and by the
    fleet's node processes (servers, sshd sessions, samplers) between two readings: on a
    shared machine, where the time goes per item."""

    def __init__(self, lf: LocalFleet) -> None:
        self.lf = lf
        self.me = psutil.Process()

    def read(self) -> tuple[float, float]:
        mine = self.me.cpu_times()
        nodes = 0.0
        for proc in fleet_processes(self.lf.name, self.lf.root):
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            nodes += times.user + times.system
        return mine.user + mine.system, nodes

    def per_item_ms(self, before: tuple[float, float], items: int) -> dict[str, float]:
        caller, nodes = self.read()
        return {"caller": round((caller - before[0]) * 1000 / items, 2),
                "nodes": round((nodes - before[1]) * 1000 / items, 2)}


def static_run(embed, items: list[str], processes: int) -> float:
    batches = [items[i:i + STATIC_BATCH] for i in range(0, len(items), STATIC_BATCH)]
    started = time.perf_counter()
    with ThreadPoolExecutor(2 * processes) as pool:
        list(pool.map(embed.batched_run, batches))
    return len(items) / (time.perf_counter() - started)


def concurrent_run(embed, items: list[str]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    cursor = iter(items)

    def caller() -> None:
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                return
            t0 = time.perf_counter()
            embed.batched_run(item)
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(items) / (time.perf_counter() - started), latencies


def noop_overhead(noop) -> tuple[float, float]:
    item = os.urandom(100)
    for _ in range(20):
        noop.batched_run(item)
    remote = []
    for _ in range(300):
        t0 = time.perf_counter()
        noop.batched_run(item)
        remote.append(time.perf_counter() - t0)
    handler = ChecksumHandler()
    local = []
    for _ in range(300):
        t0 = time.perf_counter()
        handler.infer([handler.load(item)])
        local.append(time.perf_counter() - t0)
    return statistics.median(remote) * 1000, statistics.median(local) * 1000


def failover(lf: LocalFleet, embed, items: list[str]) -> dict:
    victim, replacement = lf.worker(1), lf.worker(1, 2)
    stop = threading.Event()
    lock = threading.Lock()
    calls: dict[int, list[float]] = {}  # call id -> [started, answered...]
    failures: list[str] = []
    first_from_replacement: list[float] = []
    ids = iter(range(10**9))

    def caller(k: int) -> None:
        i = k
        while not stop.is_set():
            with lock:
                call = next(ids)
                calls[call] = [time.monotonic()]
            try:
                embed.batched_run(items[i % len(items)])
            except Exception as exc:  # noqa: BLE001 - counted as lost
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            with lock:
                calls[call].append(time.monotonic())
            i += CALLERS

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(CALLERS)]
    for thread in threads:
        thread.start()
    time.sleep(3.0)
    resent_before = embed.stats()["resent"]
    killed = time.monotonic()
    lf.cli("preempt", victim, check=True)

    def rejoined() -> bool:
        if embed.stats()["answered_by"].get(replacement, 0) > 0:
            first_from_replacement.append(time.monotonic())
            return True
        return False

    try:
        wait_for(rejoined, 300, f"the replacement {replacement} to answer", step=0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    in_flight = [times for times in calls.values() if times[0] < killed and (len(times) < 2 or times[1] > killed)]
    latencies = [times[1] - killed for times in in_flight if len(times) >= 2]
    return {
        "lost": len([t for t in calls.values() if len(t) < 2]),
        "answered_twice": sum(max(0, len(t) - 2) for t in calls.values()),
        "failover_max_latency_s": round(max(latencies), 3) if latencies else None,
        "in_flight_at_kill": len(in_flight),
        "rejoin_s": round(first_from_replacement[0] - killed, 3) if first_from_replacement else None,
        "resent": embed.stats()["resent"] - resent_before,
        "failover_calls": len(calls),
        "errors": failures[:3],
    }


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    lf = LocalFleet(base / "fleet", workers=2, monitor={"interval": INTERVAL, "grace": 4})
    process = None
    figures: dict = {"items": N_ITEMS, "callers": CALLERS, "workers": 2, "monitor_interval_s": INTERVAL,
                     "model_threads": MODEL_THREADS or "default"}
    try:
        lf.up()
        threads = {"OMP_NUM_THREADS": MODEL_THREADS} if MODEL_THREADS else {}
        embed_job = lf.write_job({"name": "embed", "env": threads,
                                  "serve": {"handler": "text-embed", "batch_size": 64,
                                            "max_wait_ms": MAX_WAIT_MS}})
        noop_job = lf.write_job({"name": "noop",
                                 "serve": {"handler": "checksum", "batch_size": 64, "max_wait_ms": 0}})
        lf.cli("serve", str(noop_job), "--detach", check=True)
        process = lf.popen("serve", str(embed_job))
        workers = {lf.worker(1), lf.worker(2)}
        wait_for(lambda: workers <= ready_nodes(registry(lf, "embed")), 300, "the models to load")
        wait_for(lambda: workers <= ready_nodes(registry(lf, "noop")), 120, "the no-op servers")
        processes = len(registry(lf, "embed"))
        items = texts(N_ITEMS)
        with fleet.connect(lf.spec_path) as f:
            embed = f.serving("embed", timeout=300)
            noop = f.serving("noop", timeout=60)
            static_run(embed, items[:256], processes)  # warm-up: channels open, models warm
            meter = CpuMeter(lf)
            counts, _ = items_per(lf, "embed", "batches")
            taken, _ = items_per(lf, "embed", "requests")
            cpu = meter.read()
            static = static_run(embed, items, processes)
            static_cpu = meter.per_item_ms(cpu, len(items))
            counts, static_batch = items_per(lf, "embed", "batches", counts)
            taken, static_per_request = items_per(lf, "embed", "requests", taken)
            cpu = meter.read()
            concurrent, latencies = concurrent_run(embed, items)
            concurrent_cpu = meter.per_item_ms(cpu, len(items))
            counts, concurrent_batch = items_per(lf, "embed", "batches", counts)
            taken, concurrent_per_request = items_per(lf, "embed", "requests", taken)
            figures.update({
                "static_items_s": round(static, 1),
                "concurrent_items_s": round(concurrent, 1),
                "ratio": round(concurrent / static, 3),
                "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
                "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
                "static_mean_batch": static_batch,
                "concurrent_mean_batch": concurrent_batch,
                "static_items_per_request": static_per_request,
                "concurrent_items_per_request": concurrent_per_request,
                "static_cpu_ms_per_item": static_cpu,
                "concurrent_cpu_ms_per_item": concurrent_cpu,
                "max_wait_ms": MAX_WAIT_MS,
            })
            noop_ms, local_ms = noop_overhead(noop)
            figures.update({"noop_p50_ms": round(noop_ms, 3), "local_p50_ms": round(local_ms, 4)})
            # The same comparison where the model costs nothing (a GPU's regime, seen from
            # the caller): what is left is the path's cost per call and per request.
            small = [os.urandom(100) for _ in range(NOOP_ITEMS)]
            noop_static = static_run(noop, small, len(registry(lf, "noop")))
            noop_concurrent, _ = concurrent_run(noop, small)
            figures.update({"noop_static_items_s": round(noop_static, 1),
                            "noop_concurrent_items_s": round(noop_concurrent, 1),
                            "noop_ratio": round(noop_concurrent / noop_static, 3)})
            print(f"throughput and overhead: {json.dumps(figures)}", file=sys.stderr, flush=True)
            figures.update(failover(lf, embed, items))
    finally:
        if process is not None:
            process.terminate()
            try:
                process.communicate(timeout=90)
            except Exception:  # noqa: BLE001 - the fleet goes down below anyway
                process.kill()
        finish_fleet(lf)
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
