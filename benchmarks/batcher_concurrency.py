"""batcher_concurrency: 64 threads submitting single items vs. the same items in static batches.

The work is the real model: all-MiniLM-L6-v2 (`SentenceTransformer.encode`) on short
texts, CPU. Static: one thread encodes the texts in fixed batches of 64. Concurrent:
64 caller threads each submit their texts one at a time to a `DynamicBatcher`
(max_batch_size 64, max_wait_ms 10) and wait for each result before the next; every
submit -> result latency is recorded. Both run the model in a non-main thread.

The machine is shared, so static and concurrent runs alternate (S C S C ... S) and each
concurrent run is compared with the mean of the static runs around it; `ratio` is the
median of those ratios, the items/s are totals.

`simulated_*`: the same comparison with a batch function that does not use the CPU
(sleeps 4 ms + 0.1 ms per item, like an accelerator that likes big batches), which
isolates the batcher's own cost (64 threads, futures, wake-ups) from the machine's
noisy CPU.

Last line: {"static_items_s", "concurrent_items_s", "ratio", "p50_ms", "p99_ms", ...}.
Goal: ratio >= 0.9.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CALLERS = 64
PER_CALLER = int(os.environ.get("BENCH_PER_CALLER", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SIM_PER_CALLER = 40
BATCH = 64
WORDS = [
    "fleet",
    "worker",
    "node",
    "chunk",
    "lease",
    "batch",
    "model",
    "vector",
    "shared",
    "disk",
    "preempt",
    "spot",
    "queue",
    "result",
]


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(n)]


def in_thread(fn) -> float:
    """Run fn in a fresh thread; its wall time."""
    out: list[float] = []

    def run() -> None:
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out[0]


def model_batch(model):
    def run_batch(batch: list[str]) -> list:
        return list(model.encode(batch, batch_size=len(batch), show_progress_bar=False))

    return run_batch


def simulated_batch(batch: list[str]) -> list:
    time.sleep(0.004 + 0.0001 * len(batch))
    return [len(text) for text in batch]


def static(run_batch, texts: list[str]) -> float:
    def run() -> None:
        for start in range(0, len(texts), BATCH):
            run_batch(texts[start : start + BATCH])

    return len(texts) / in_thread(run)


def concurrent(run_batch, texts: list[str], latencies: list[float]) -> float:
    from fleet.worker.batcher import DynamicBatcher

    per_caller = [texts[i::CALLERS] for i in range(CALLERS)]
    lock = threading.Lock()
    batcher = DynamicBatcher(run_batch, max_batch_size=BATCH, max_wait_ms=10)
    start_gate = threading.Barrier(CALLERS + 1)

    def caller(mine: list[str]) -> None:
        local = []
        start_gate.wait()
        for text in mine:
            sent = time.perf_counter()
            batcher.submit(text).result()
            local.append(time.perf_counter() - sent)
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=caller, args=(mine,)) for mine in per_caller]
    for thread in threads:
        thread.start()
    start_gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    batcher.close()
    return len(texts) / elapsed


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from sentence_transformers import SentenceTransformer

    from fleet.worker.handlers.text_embed import default_model_path

    model = SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)
    texts = make_texts(CALLERS * PER_CALLER, seed=5)
    in_thread(lambda: model.encode(texts[:128], batch_size=BATCH, show_progress_bar=False))  # warm up
    real = compare(model_batch(model), texts, ROUNDS)
    simulated = compare(simulated_batch, make_texts(CALLERS * SIM_PER_CALLER, seed=6), 3)
    print(
        json.dumps(
            {
                **real,
                "callers": CALLERS,
                "items_per_round": len(texts),
                **{f"simulated_{key}": value for key, value in simulated.items()},
            }
        )
    )


def compare(run_batch, texts: list[str], rounds: int) -> dict:
    statics = [static(run_batch, texts)]
    concurrents: list[float] = []
    ratios: list[float] = []
    latencies: list[float] = []
    for _ in range(rounds):
        concurrents.append(concurrent(run_batch, texts, latencies))
        statics.append(static(run_batch, texts))
        ratios.append(concurrents[-1] / ((statics[-2] + statics[-1]) / 2))
    latencies.sort()
    n = len(texts)
    return {
        "static_items_s": round(n * len(statics) / sum(n / s for s in statics), 2),
        "concurrent_items_s": round(n * len(concurrents) / sum(n / c for c in concurrents), 2),
        "ratio": round(statistics.median(ratios), 3),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
        "ratios": [round(r, 3) for r in ratios],
    }


if __name__ == "__main__":
    main()
