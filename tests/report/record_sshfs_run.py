"""Records tests/report/data/small_files_sshfs/: a real run, not synthetic figures.

`checksum` in files mode (io: mount) over 3,000 small files through a real sshfs mount
of a real sshd on loopback (benchmarks/_sshfs.py), the real sampler watching the worker
(`--pid`), on the 2-core CI machine: the case where the CPU counters say cpu-bound
although the reads and writes through the mount hold the worker back.

    PYTHONPATH=. python tests/report/record_sshfs_run.py [FILES] [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
NODE = "sf-w1-g1"


def main() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _sshfs import sshd_head

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "data" / "small_files_sshfs"
    work = Path(tempfile.mkdtemp(prefix="record-sshfs-"))
    shared = work / "head"
    job = shared / "jobs" / "smallfiles"
    job.mkdir(parents=True)
    for i in range(count):
        path = shared / "corpus" / f"d{i // 500:02d}" / f"f{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(200).hex().encode())
    worker = {"handler": "checksum", "inputs": "corpus/**/*.txt", "outputs": "out", "io": "mount", "device": "cpu"}
    (job / "job.yaml").write_text(yaml.safe_dump({"name": "smallfiles", "worker": worker}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        with sshd_head() as mount:
            view = mount(shared, work / "mnt")
            run = subprocess.Popen(
                [sys.executable, "-m", "fleet.worker", str(view / "jobs" / "smallfiles"), "--node", NODE], env=env
            )
            sampler = subprocess.Popen(
                [sys.executable, "-m", "fleet.worker.sampler", "--out", str(job / "metrics" / f"{NODE}.jsonl"),
                 "--node", NODE, "--interval", "0.5", "--pid", str(run.pid)],
                env=env,
            )
            assert run.wait(timeout=600) == 0 and sampler.wait(timeout=30) == 0
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for name in ("metrics", "done"):
            shutil.copytree(job / name, out / name)
        shutil.copy(job / "chunks.json", out / "chunks.json")
        lines = (out / "metrics" / f"{NODE}.worker0.jsonl").read_text().splitlines()
        first = min(json.loads(line)["t"] for line in lines)
        steps = ((0, "requested"), (10, "running"), (20, "ssh_ready"), (40, "setup_done"), (50, "mounted"),
                 (59, "working"))
        events = [{"t": first - 60 + dt, "node": NODE, "kind": kind, "detail": ""} for dt, kind in steps]
        (out / "events.json").write_text(json.dumps(events, indent=0) + "\n")
        (out / "prices.json").write_text("{}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"recorded {count} items in {out} ({time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
