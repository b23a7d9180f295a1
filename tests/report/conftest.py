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
    """Run one workload on a node named NODE with the real sampler watching it (the
    sampler stops by itself when the workload exits); returns the job directory."""

    def run(mode: str, seconds: float, *extra: str, node: str = "w1") -> Path:
        job = tmp_path / "jobs" / f"synthetic-{mode}"
        (job / "metrics").mkdir(parents=True, exist_ok=True)
        if mode in ("cpu", "starved"):
            args = [str(job), node, str(seconds)]
        else:
            args = [str(seconds), *extra]
        workload = processes.start([sys.executable, str(WORKLOADS), mode, *args])
        sampler = processes.sampler(job / "metrics" / f"{node}.jsonl", node, pid=workload.pid)
        _, err = workload.communicate(timeout=seconds + 60)
        assert workload.returncode == 0, err.decode()
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
