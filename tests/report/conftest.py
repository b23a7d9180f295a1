"""Fixtures for the report tests: real processes (workloads, the real sampler) that are
always cleaned up, and the recorded scenarios of tests/report/data/."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
DATA = HERE / "data"
WORKLOADS = HERE / "workloads.py"


class Processes:
    """Starts processes in their own process group; kills what is left at teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
        process = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **kwargs,
        )
        self.started.append(process)
        return process

    def sampler(
        self, out: Path, node: str, pid: int | None = None, interval: float = 0.5
    ) -> subprocess.Popen[bytes]:
        args = [
            sys.executable,
            "-m",
            "fleet.worker.sampler",
            "--out",
            str(out),
            "--node",
            node,
            "--interval",
            str(interval),
        ]
        if pid is not None:
            args += ["--pid", str(pid)]
        return self.start(args)

    def cleanup(self) -> None:
        for process in self.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.cleanup()


@pytest.fixture
def run_workload(processes: Processes, tmp_path: Path) -> Callable[..., Path]:
    """Run a synthetic process (workloads.py MODE ARGS) on a node named NODE with the
    real sampler watching it (the sampler stops by itself when it exits); returns the
    job directory."""

    def run(mode: str, *args: str, node: str = "w1") -> Path:
        job = tmp_path / "jobs" / f"synthetic-{mode}"
        (job / "metrics").mkdir(parents=True, exist_ok=True)
        workload = processes.start([sys.executable, str(WORKLOADS), mode, *args])
        sampler = processes.sampler(job / "metrics" / f"{node}.jsonl", node, pid=workload.pid)
        _, err = workload.communicate(timeout=120)
        assert workload.returncode == 0, err.decode()
        _, err = sampler.communicate(timeout=30)
        assert sampler.returncode == 0, err.decode()
        return job

    return run


@pytest.fixture
def run_worker_job(processes: Processes, tmp_path: Path) -> Callable[..., Path]:
    """Run the real worker (`python -m fleet.worker JOB_DIR`) on a job of `items` small
    files with the handler and worker settings given, on a node named NODE, with the
    real sampler watching it; returns the job directory once both have exited."""

    def run(name: str, items: int, node: str = "w1", **worker: Any) -> Path:
        shared = tmp_path / "shared"
        for i in range(items):
            path = shared / "inputs" / name / f"f{i:05d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"item {i}\n")
        job = shared / "jobs" / name
        (job / "metrics").mkdir(parents=True, exist_ok=True)
        spec = {
            "name": name,
            "worker": {
                "inputs": f"inputs/{name}/*.txt",
                "outputs": f"outputs/{name}",
                "device": "cpu",
                **worker,
            },
        }
        (job / "job.yaml").write_text(json.dumps(spec))  # JSON is YAML
        worker_process = processes.start([sys.executable, "-m", "fleet.worker", str(job), "--node", node])
        sampler = processes.sampler(job / "metrics" / f"{node}.jsonl", node, pid=worker_process.pid)
        _, err = worker_process.communicate(timeout=240)
        assert worker_process.returncode == 0, err.decode()
        _, err = sampler.communicate(timeout=30)
        assert sampler.returncode == 0, err.decode()
        return job

    return run


def _scenario(name: str) -> tuple[Path, list[dict[str, Any]], dict[str, float]]:
    base = DATA / name
    return (
        base,
        json.loads((base / "events.json").read_text()),
        json.loads((base / "prices.json").read_text()),
    )


@pytest.fixture
def recorded() -> Callable[[str], tuple[Path, list[dict[str, Any]], dict[str, float]]]:
    """recorded(name) -> (job dir, events, prices) of a scenario in tests/report/data/."""
    return _scenario
