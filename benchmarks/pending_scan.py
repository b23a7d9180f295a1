"""pending_scan: 100,000 inputs, half done, over sshfs: how long to find what is pending.

Setup (on the head's side of the mount, i.e. the local directory a real OpenSSH server
on loopback serves): 100,000 input files in 100 directories, a job frozen into 1,000
chunks of 100, and half of the chunks done (their 50,000 outputs and done markers).

Scan (what a worker does, over a fresh sshfs mount): read chunks.json, list done/ and
claims/, and derive the pending chunks and items (`fleet.worker.claims.scan`).
Per-file check (the naive way, over another fresh mount): does each input's output
exist (one stat per input).

Last line: {"scan_s", "per_file_s", "ratio", ...}. Goal: scan_s <= 2 and ratio >= 20.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _sshfs import sshd_head

N_FILES = int(os.environ.get("BENCH_FILES", "100000"))
PER_DIR = 1000
CHUNK = 100


def build(shared: Path) -> Path:
    from fleet.worker.inputs import freeze
    from fleet.worker.layout import JobLayout, load_worker_config

    for d in range((N_FILES + PER_DIR - 1) // PER_DIR):
        folder = shared / "corpus" / f"d{d:03d}"
        folder.mkdir(parents=True)
        for i in range(d * PER_DIR, min(N_FILES, (d + 1) * PER_DIR)):
            with open(folder / f"f{i:06d}.txt", "wb") as handle:
                handle.write(b"x")
    job = shared / "jobs" / "scan"
    job.mkdir(parents=True)
    worker = {"handler": "checksum", "inputs": "corpus/**/*.txt", "outputs": "out", "chunk_size": CHUNK}
    (job / "job.yaml").write_text(yaml.safe_dump({"name": "scan", "worker": worker}))
    layout = JobLayout.at(job)
    layout.make_dirs()
    chunks = freeze(layout, load_worker_config(layout))
    for chunk in chunks.chunks[::2]:  # every other chunk is done: outputs + marker
        for rel in chunks.chunk_files(chunk):
            out = shared / "out" / f"{rel}.sha256"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"0\n")
        (layout.done / chunk.id).write_text(json.dumps({"items": chunk.items, "failed": 0}))
    return job


def pending_by_scan(job: Path) -> tuple[int, int]:
    """What a worker does: chunks.json + two listings -> pending chunks and items."""
    from fleet.worker.claims import scan
    from fleet.worker.inputs import load_chunk_list
    from fleet.worker.layout import JobLayout

    layout = JobLayout.at(job)
    chunks = load_chunk_list(layout)
    look = scan(layout)
    pending = [c for c in chunks.chunks if c.id not in look.done and c.id not in look.claimed]
    return len(pending), sum(c.items for c in pending)


def pending_by_stat(shared_view: Path, rels: list[str]) -> int:
    out = shared_view / "out"
    return sum(1 for rel in rels if not os.path.exists(out / f"{rel}.sha256"))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    try:
        shared = root / "shared"
        started = time.perf_counter()
        job = build(shared)
        build_s = time.perf_counter() - started
        rels = json.loads((job / "chunks.json").read_text())["files"]
        with sshd_head() as mount:
            scanned = mount(shared, root / "mnt-scan")
            started = time.perf_counter()
            pending_chunks, pending_items = pending_by_scan(scanned / "jobs" / "scan")
            scan_s = time.perf_counter() - started

            checked = mount(shared, root / "mnt-stat")
            started = time.perf_counter()
            pending_stat = pending_by_stat(checked, rels)
            per_file_s = time.perf_counter() - started
        if pending_items != pending_stat or pending_items != N_FILES // 2:
            raise SystemExit(f"disagreement: scan {pending_items} pending, per-file {pending_stat}")
        print(
            json.dumps(
                {
                    "scan_s": round(scan_s, 3),
                    "per_file_s": round(per_file_s, 3),
                    "ratio": round(per_file_s / scan_s, 1),
                    "files": N_FILES,
                    "pending_items": pending_items,
                    "pending_chunks": pending_chunks,
                    "chunks": N_FILES // CHUNK,
                    "chunks_json_bytes": (job / "chunks.json").stat().st_size,
                    "setup_s": round(build_s, 1),
                }
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
