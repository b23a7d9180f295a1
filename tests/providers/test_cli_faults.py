"""`fleet run` on the fake GCE rides out the API's transient faults: while it follows a
job, the follower's and the monitor's list calls meet 503s and an answer later than
`gcp.api_timeout` (injected at the HTTP level, through the fake's fault switch); the
run ends as if nothing happened, without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from provider_helpers import USER, gcp_block

from fleet.fleetops import Fleet
from fleet.spec.loader import load_fleet_spec

pytestmark = pytest.mark.slow


def _fleet(spec: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet", args[0], "-f", str(spec), *args[1:]], check=False,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ), cwd=spec.parent)


def _wait_consumed(fake: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while fake.faults.http_faults > 0:
        assert time.monotonic() < deadline, "the injected faults were never met"
        time.sleep(0.1)


def _wait_working(spec: Path, job: str, timeout: float) -> None:
    with Fleet(load_fleet_spec(spec), spec) as fleet:
        deadline = time.monotonic() + timeout
        while not any(e.kind == "working" and job in e.detail for e in fleet.state.events()):
            assert time.monotonic() < deadline, f"job {job} never started"
            time.sleep(0.2)


def test_fleet_run_rides_out_503s_and_a_read_timeout(tmp_path: Path, fake_gce: Any, loopback: tuple[str, int]) -> None:
    spec = tmp_path / "fleet.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "ridegce", "provider": "gcp", "workers": {"count": 1},
        "ssh": {"user": USER, "port": loopback[1], "ready_timeout": 60},
        "runtime": {"install": False}, "monitor": {"interval": 1, "grace": 20},
        "gcp": gcp_block(fake_gce, api_timeout=1.0),
    }))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "ride", "nodes": "workers", "run": "sleep 8; echo ridden"}))
    try:
        assert (up := _fleet(spec, "up")).returncode == 0, up.stderr
        run = subprocess.Popen([sys.executable, "-m", "fleet", "run", "-f", str(spec), str(job), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        try:
            _wait_working(spec, "ride", 60)  # following now: the faults meet `fleet run`'s loop
            fake_gce.set_http_fault(3, status=503, path_contains="/aggregated/")
            _wait_consumed(fake_gce, 30)
            fake_gce.set_http_fault(1, delay=1.5, path_contains="/aggregated/")
            _wait_consumed(fake_gce, 30)
            stdout, stderr = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
        assert run.returncode == 0, stderr
        assert "Traceback" not in stderr
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert (summary["total"], summary["done"], summary["failed"]) == (1, 1, 0)
    finally:
        fake_gce.reset_faults()
        down = _fleet(spec, "down", "--yes")
        assert down.returncode == 0, down.stderr
