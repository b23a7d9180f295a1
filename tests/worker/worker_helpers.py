"""Helpers shared by the worker tests: job directories, corpora, running workers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def make_job(shared: Path, name: str, worker: dict[str, Any], **top: Any) -> Path:
    """Write shared/jobs/<name>/job.yaml with a `worker:` section (and other keys)."""
    job_dir = shared / "jobs" / name
    job_dir.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "nodes": "workers", **top, "worker": worker}
    (job_dir / "job.yaml").write_text(yaml.safe_dump(spec))
    return job_dir


def write_files(
    base: Path, count: int, *, per_dir: int = 50, text: Callable[[int], str] | None = None
) -> list[Path]:
    """count small text files under base/dNN/fNNNNN.txt; returns their paths."""
    paths = []
    for i in range(count):
        path = base / f"d{i // per_dir:02d}" / f"f{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text(i) if text else f"item {i}\n")
        paths.append(path)
    return paths


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def visible_files(root: Path) -> list[Path]:
    """Files under root whose path has no hidden component."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out)


def hidden_files(root: Path) -> list[Path]:
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        out.extend(Path(dirpath) / f for f in filenames if f.startswith("."))
    return out


def assert_checksum_outputs(inputs_base: Path, outputs: Path, inputs: list[Path]) -> None:
    """Exactly one complete, correct .sha256 output per input, nothing else."""
    expected = {outputs / (str(p.relative_to(inputs_base)) + ".sha256"): p for p in inputs}
    found = visible_files(outputs)
    assert sorted(found) == sorted(expected), (
        f"missing {sorted(set(expected) - set(found))[:5]}, extra {sorted(set(found) - set(expected))[:5]}"
    )
    for out, src in expected.items():
        assert out.read_text() == sha256_hex(src.read_bytes()) + "\n", out


def metric_lines(job_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((job_dir / "metrics").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rows.append(json.loads(line))
    return rows


def done_chunk_counts(job_dir: Path) -> dict[str, int]:
    """How many times each chunk was reported done, over all workers' metrics."""
    counts: dict[str, int] = {}
    for row in metric_lines(job_dir):
        if row["kind"] == "chunk" and row["outcome"] == "done":
            counts[row["chunk"]] = counts.get(row["chunk"], 0) + 1
    return counts


def chunk_ids(job_dir: Path) -> list[str]:
    return [c["id"] for c in json.loads((job_dir / "chunks.json").read_text())["chunks"]]


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("FLEET_NODE_NAME", None)
    env.update(extra)
    return env


def start_worker(job_dir: Path, *args: str, log: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    """`python -m fleet.worker JOB_DIR ARGS` in its own process group."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "fleet.worker", str(job_dir), *args],
        stdout=out,
        stderr=subprocess.STDOUT if log else subprocess.PIPE,
        env=worker_env(**env),
        cwd=REPO,
        start_new_session=True,
    )


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.worker", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=worker_env(**env),
        cwd=REPO,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
