"""tiny_items: 100,000 tiny items with `checksum`, worker vs. a naive process pool.

Worker: one `fleet.worker` process (run in this process) on a job in records mode: ten
local files of 10,000 short lines each, the bundled `checksum` handler, default
batching (batch_size 64, chunks of 10,000 records). Its rate is items / wall time of
the whole run (claims, reading, batching, hashing, writing each chunk's rows and index,
done markers); freezing the chunk list (job creation, once) is timed apart.

Naive baseline (the seed's case): the same lines read into memory and sent to a
process pool (one process per CPU) one item at a time, one future per item, the
digests gathered and written to one file.

Last line: {"items_s", "naive_items_s", "ratio", ...}. Goal: items_s >= 50,000 per worker
process; ratio = items_s / naive_items_s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_ITEMS = int(os.environ.get("BENCH_ITEMS", "100000"))
N_FILES = 10


def digest(item: str) -> str:
    return hashlib.sha256(item.encode()).hexdigest()


def naive(lines: list[str], out: Path) -> float:
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = [pool.submit(digest, line) for line in lines]
        results = [future.result() for future in futures]
    out.write_text("\n".join(results) + "\n")
    return len(lines) / (time.perf_counter() - started)


def bundled_worker_rate(root: Path, n_items: int = N_ITEMS) -> tuple[float, float, float, list[str]]:
    """The bundled worker (in this process) in records mode with `checksum` on `n_items`
    lines in N_FILES files under `root`: (items/s, worker seconds, freeze seconds, lines).
    Also the reference of benchmarks/ray_fleet.py (Ray's tiny tasks on the same items)."""
    from fleet.worker.inputs import freeze
    from fleet.worker.layout import JobLayout, load_worker_config
    from fleet.worker.runner import run_worker

    shared = root / "shared"
    (shared / "tiny").mkdir(parents=True)
    per_file = n_items // N_FILES
    lines: list[str] = []
    for f in range(N_FILES):
        part = [f"item-{f}-{i}" for i in range(per_file)]
        lines.extend(part)
        (shared / "tiny" / f"part{f:02d}.txt").write_text("\n".join(part) + "\n")
    job = shared / "jobs" / "tiny"
    job.mkdir(parents=True)
    worker = {"handler": "checksum", "mode": "records", "inputs": "tiny/*.txt", "outputs": "out/tiny"}
    (job / "job.yaml").write_text(yaml.safe_dump({"name": "tiny", "worker": worker}))

    layout = JobLayout.at(job)
    started = time.perf_counter()
    freeze(layout, load_worker_config(layout))
    freeze_s = time.perf_counter() - started

    started = time.perf_counter()
    summary = run_worker(job, node="bench", install_signal_handlers=False)
    worker_s = time.perf_counter() - started
    if summary["items"] != len(lines) or summary["failed"]:
        raise SystemExit(f"worker processed {summary['items']} items, {summary['failed']} failed")
    chunks = json.loads((job / "chunks.json").read_text())["chunks"]
    rows = sum(len((shared / "out" / "tiny" / f"{c['id']}.sha256").read_text().split()) for c in chunks)
    if rows != len(lines):
        raise SystemExit(f"the worker wrote {rows} rows for {len(lines)} items")
    return len(lines) / worker_s, worker_s, freeze_s, lines


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    try:
        items_s, worker_s, freeze_s, lines = bundled_worker_rate(root)
        naive_items_s = naive(lines, root / "naive.txt")
        print(
            json.dumps(
                {
                    "items_s": round(items_s, 1),
                    "naive_items_s": round(naive_items_s, 1),
                    "ratio": round(items_s / naive_items_s, 1),
                    "items": N_ITEMS,
                    "worker_seconds": round(worker_s, 3),
                    "freeze_seconds": round(freeze_s, 3),
                    "naive_pool_processes": os.cpu_count(),
                    "batch_size": 64,
                }
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
