"""One real local fleet (head + 2 workers) serving two models for the tests of a module:

- `embed`: the bundled text-embed handler (the real all-MiniLM-L6-v2), started with
  `fleet serve` in the foreground, so its monitor replaces preempted workers and gives
  the replacements the server;
- `slow`: the test plugin's slow checksum (`jobs_plugins:slow_checksum`, 0.4 s per
  item), started with `fleet serve --detach`, for deadlines and draining.

The fixture stops the foreground `fleet serve`, then `fleet down`s the fleet and sweeps
what could be left, also when a test failed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBS_TESTS = REPO / "tests" / "jobs"
if str(JOBS_TESTS) not in sys.path:
    sys.path.insert(0, str(JOBS_TESTS))

from jobs_fleet import LocalFleet, finish_fleet, wait_for

from fleet.serve.registry import ready_nodes

# The nodes import the package under test (and the test plugins) from this checkout.
NODE_ENV = {"PYTHONPATH": f"{REPO}:{JOBS_TESTS}"}
SLOW_DELAY_S = 0.4


@dataclass
class ServedFleet:
    fleet: LocalFleet
    process: subprocess.Popen[str]

    def registry(self, job: str) -> list[dict]:
        import json

        records = []
        for path in (self.fleet.job_dir(job) / "servers").glob("*.json"):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return records

    def wait_ready(self, job: str, nodes: set[str], timeout: float = 120) -> None:
        wait_for(lambda: nodes <= ready_nodes(self.registry(job)), timeout, f"{job} ready on {sorted(nodes)}")

    def log(self, job: str, node: str) -> str:
        path = self.fleet.job_dir(job) / "logs" / f"{node}.log"
        return path.read_text() if path.exists() else ""


def _stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.terminate()
    try:
        out, err = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return out + err


@pytest.fixture(scope="module")
def served_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedFleet]:
    fleet = LocalFleet(tmp_path_factory.mktemp("served"), workers=2, monitor={"interval": 1, "grace": 4})
    process = None
    try:
        fleet.up()
        embed = fleet.write_job({"name": "embed", "env": NODE_ENV,
                                 "serve": {"handler": "text-embed", "batch_size": 64, "max_wait_ms": 10}})
        slow = fleet.write_job({"name": "slow", "env": NODE_ENV,
                                "serve": {"handler": "jobs_plugins:slow_checksum", "batch_size": 4,
                                          "max_wait_ms": 20, "handler_options": {"delay_s": SLOW_DELAY_S}}})
        fleet.cli("serve", str(slow), "--detach", check=True)
        process = fleet.popen("serve", str(embed))
        served = ServedFleet(fleet, process)
        workers = {fleet.worker(1), fleet.worker(2)}
        served.wait_ready("slow", workers)
        served.wait_ready("embed", workers, timeout=180)
        yield served
    finally:
        try:
            if process is not None:
                _stop(process)
        finally:
            finish_fleet(fleet)
