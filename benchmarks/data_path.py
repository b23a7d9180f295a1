"""data_path: files-mode `checksum` over sshfs, io: mount and io: bulk, against tar over SSH.

A real OpenSSH server on loopback serves the "head" directory; the worker (run in this
process, as `fleet.worker.runner.run_worker`) reaches it only through a real sshfs
mount. The head's packer (`fleet.worker.packer`, a subprocess working on the head's
local directory, as `fleet run` starts it on the head) is started before the timed
window like `fleet run` starts it at `prepare`, and packs `--window` chunks ahead.
The reference: the same files as one `tar -cf -` stream over the same SSH server,
read to the end, in the same run (files/s and MB/s of the transport).

Corpora: (a) small: BENCH_SMALL (10,000) files of 400 B; (b) large: BENCH_LARGE (2,000)
files of 100 KB. Each measured BENCH_ROUNDS (3) times, interleaved with its tar
reference; figures are medians. A worker run counts from the call to the job's end:
claims, reading, hashing, writing every output, done markers. The chunk list is frozen
beforehand (`fleet run` does it at `prepare`).

Last line: {"small_items_s", "small_tar_files_s", "small_ratio", "large_mb_s",
"large_tar_mb_s", "large_ratio", "mount_small_items_s", ...}. Goals: small_ratio >= 0.5,
large_ratio >= 0.7.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _sshfs import sshd_head

SMALL = int(os.environ.get("BENCH_SMALL", "10000"))
LARGE = int(os.environ.get("BENCH_LARGE", "2000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CHUNK = int(os.environ.get("BENCH_CHUNK", "500"))
MOUNT_SMALL = int(os.environ.get("BENCH_MOUNT_SMALL", "2000"))  # io: mount is slow: a subset


def write_corpus(base: Path, count: int, size: int) -> int:
    payload = os.urandom(size)
    for i in range(count):
        path = base / f"d{i // 1000:03d}" / f"f{i:06d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload[: size - 8] + i.to_bytes(8, "big"))
    return count * size


def tar_reference(mount, head_dir: Path, count: int, nbytes: int) -> tuple[float, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        mount.ssh_argv(f"tar -C {head_dir} -cf - ."), capture_output=True, check=True, timeout=600
    )
    seconds = time.perf_counter() - started
    assert len(proc.stdout) >= nbytes
    return count / seconds, nbytes / seconds / 1e6


def make_job(shared: Path, name: str, corpus: str, io: str) -> Path:
    job = shared / "jobs" / name
    job.mkdir(parents=True)
    spec = {
        "name": name,
        "worker": {
            "handler": "checksum",
            "inputs": f"{corpus}/**/*.bin",
            "outputs": f"out/{name}",
            "chunk_size": CHUNK,
            "batch_size": 256,
            "io": io,
        },
    }
    (job / "job.yaml").write_text(yaml.safe_dump(spec))
    return job


def run_job(shared: Path, view: Path, name: str, corpus: str, io: str, expected: int) -> float:
    from fleet.worker.inputs import freeze
    from fleet.worker.layout import JobLayout, load_worker_config
    from fleet.worker.runner import run_worker

    job = make_job(shared, name, corpus, io)
    layout = JobLayout.at(job)
    freeze(layout, load_worker_config(layout))
    packer = None
    if io == "bulk":
        packer = subprocess.Popen(
            [sys.executable, "-P", "-m", "fleet.worker.packer", str(job)],
            stdout=sys.stderr,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 30
        while not (job / "bulk" / "packer.json").exists():
            assert time.monotonic() < deadline and packer.poll() is None, "the packer did not start"
            time.sleep(0.01)
        time.sleep(0.5)  # as at `fleet run`: the packer has its window ready before workers start
    try:
        started = time.perf_counter()
        summary = run_worker(view / "jobs" / name, node=f"bench-{name}", install_signal_handlers=False)
        seconds = time.perf_counter() - started
    finally:
        if packer is not None:
            try:
                packer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                packer.kill()
                packer.wait()
    assert summary["items"] == expected and summary["failed"] == 0, summary
    outputs = sum(len(files) for _, _, files in os.walk(shared / "out" / name))
    assert outputs == expected, (outputs, expected)
    return expected / seconds


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-data-path-"))
    shared = work / "head"
    (shared / "jobs").mkdir(parents=True)
    try:
        small_bytes = write_corpus(shared / "small", SMALL, 400)
        large_bytes = write_corpus(shared / "large", LARGE, 100_000)
        write_corpus(shared / "small_mount", MOUNT_SMALL, 400)
        with sshd_head() as mount:
            view = mount(shared, work / "mnt")
            figures: dict[str, list[float]] = {k: [] for k in ("small", "small_tar", "large", "large_tar", "mount")}
            for r in range(ROUNDS):
                figures["small_tar"].append(tar_reference(mount, shared / "small", SMALL, small_bytes)[0])
                figures["small"].append(run_job(shared, view, f"small{r}", "small", "bulk", SMALL))
                figures["large_tar"].append(tar_reference(mount, shared / "large", LARGE, large_bytes)[1])
                rate = run_job(shared, view, f"large{r}", "large", "bulk", LARGE)
                figures["large"].append(rate * 100_000 / 1e6)
                figures["mount"].append(run_job(shared, view, f"mount{r}", "small_mount", "mount", MOUNT_SMALL))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(key: str) -> float:
        return statistics.median(figures[key])

    small_ratios = [a / b for a, b in zip(figures["small"], figures["small_tar"])]
    large_ratios = [a / b for a, b in zip(figures["large"], figures["large_tar"])]
    print(
        json.dumps(
            {
                "small_items_s": round(med("small"), 1),
                "small_tar_files_s": round(med("small_tar"), 1),
                "small_ratio": round(statistics.median(small_ratios), 3),
                "large_mb_s": round(med("large"), 2),
                "large_tar_mb_s": round(med("large_tar"), 2),
                "large_ratio": round(statistics.median(large_ratios), 3),
                "mount_small_items_s": round(med("mount"), 1),
                "small_ratios": [round(x, 3) for x in small_ratios],
                "large_ratios": [round(x, 3) for x in large_ratios],
                "mount_runs_items_s": [round(x, 1) for x in figures["mount"]],
                "small_files": SMALL,
                "large_files": LARGE,
                "mount_files": MOUNT_SMALL,
                "chunk_size": CHUNK,
                "rounds": ROUNDS,
            }
        )
    )


if __name__ == "__main__":
    main()
