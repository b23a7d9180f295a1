"""End to end through the CLI on the fake clouds: `fleet up --dry-run`, `up`, `exec`,
`preempt`, `down` as a user runs them (`python -m fleet`), against the fake GCE and the
fake EC2 with real sshd nodes behind every instance and sshfs mounts of the head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from provider_helpers import USER, aws_block, gcp_block

# loopback until the node runtime (issue 10) lands: the flow runs a job with the bundled worker.
pytestmark = [pytest.mark.slow, pytest.mark.loopback_backing]

MUTATING_GCE = ("POST", "DELETE", "PATCH", "PUT")
MUTATING_EC2 = ("Run", "Terminate", "Stop", "Create", "Delete", "Import", "Authorize")


def fleet(spec: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args[:1], "-f", str(spec), *args[1:]],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
        cwd=spec.parent,
    )


@pytest.fixture(params=["gcp", "aws"])
def cloud(request: pytest.FixtureRequest, tmp_path: Path, loopback: tuple[str, int]) -> dict[str, Any]:
    if request.param == "gcp":
        fake = request.getfixturevalue("fake_gce")
        block = {"gcp": gcp_block(fake)}
        mutating = lambda: [r for r in fake.requests if r["method"] in MUTATING_GCE]
        live = lambda: [i["name"] for i in fake.state()["instances"]]
        backing = lambda: fake.state()["backing_nodes"]
        leftovers = lambda: fake.state()["firewalls"] + [d["name"] for d in fake.state()["disks"]]
    else:
        fake = request.getfixturevalue("fake_ec2")
        block = {"aws": aws_block()}
        mutating = lambda: [r for r in fake.actions() if r["action"].startswith(MUTATING_EC2)]
        live = lambda: [
            i["tags"].get("Name") for i in fake.state()["instances"] if i["state"] != "terminated"
        ]
        backing = lambda: fake.state()["backing_nodes"]
        leftovers = lambda: fake.state()["security_groups"] + fake.state()["key_pairs"]
    name = f"e2e{request.param[0]}"
    spec = {
        "name": name,
        "provider": request.param,
        "workers": {"count": 2},
        "ssh": {"user": USER, "port": loopback[1], "ready_timeout": 60},
        **block,
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(spec))
    return {
        "spec": path,
        "name": name,
        "fake": fake,
        "mutating": mutating,
        "live": live,
        "backing": backing,
        "leftovers": leftovers,
        "kind": request.param,
    }


def test_up_exec_preempt_down_through_the_cli(cloud: dict[str, Any]) -> None:
    spec, name = cloud["spec"], cloud["name"]
    try:
        dry = fleet(spec, "up", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert cloud["mutating"]() == [] and cloud["live"]() == []

        up = fleet(spec, "up", "--json")
        assert up.returncode == 0, up.stderr + up.stdout
        assert sorted(json.loads(up.stdout.strip().splitlines()[-1])["nodes"]) == sorted(
            [f"{name}-head", f"{name}-w1-g1", f"{name}-w2-g1"]
        )

        # Every node answers as itself (the fakes' sshd carry the node's name) and the
        # workers see the head's shared directory through sshfs.
        done = fleet(spec, "exec", "--json", "--", "echo $FLEET_LOCAL_NODE_NAME")
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout.strip().splitlines()[-1])["results"]
        assert {r["node"]: r["stdout"].strip() for r in results} == {r["node"]: r["node"] for r in results}
        mounted = fleet(spec, "exec", "--nodes", "workers", "--json", "--", "mount | grep -c fuse.sshfs")
        assert mounted.returncode == 0, mounted.stderr + mounted.stdout

        # A job runs on the cloud fleet, and its report prices the node-hours.
        job = spec.parent / "job.yaml"
        job.write_text(yaml.safe_dump({
            "name": "sums",
            "python": sys.executable,
            "prepare": ['mkdir -p "$FLEET_SHARED/data" && for i in $(seq 1 40); do echo "item $i" > "$FLEET_SHARED/data/$i.txt"; done'],
            "worker": {"handler": "checksum", "inputs": "data/*.txt", "outputs": "sums", "chunk_size": 10},
        }))
        ran = fleet(spec, "run", str(job), "--json")
        assert ran.returncode == 0, ran.stderr + ran.stdout
        summary = json.loads(ran.stdout.strip().splitlines()[-1])
        assert (summary["total"], summary["done"], summary["failed"]) == (40, 40, 0)
        report = fleet(spec, "report", "sums", "--json")
        assert report.returncode == 0, report.stderr + report.stdout
        cost = json.loads(report.stdout.strip().splitlines()[-1])["cost"]
        assert set(cost["per_node_usd"]) == {f"{name}-head", f"{name}-w1-g1", f"{name}-w2-g1"}, cost
        assert cost["usd"] > 0 and cost["usd_per_1000_items"] > 0 and cost["unpriced_nodes"] == []

        victim = f"{name}-w1-g1"
        preempt = fleet(spec, "preempt", victim)
        assert preempt.returncode == 0, preempt.stderr
        assert victim not in cloud["backing"]()
    finally:
        down = fleet(spec, "down", "--yes")
    assert down.returncode == 0, down.stderr + down.stdout
    assert cloud["live"]() == [] and cloud["backing"]() == [] and cloud["leftovers"]() == []
    # The head is gone with its shared directory; the report still reads the copy it
    # fetched last time, and says so.
    after = fleet(spec, "report", "sums", "--json")
    assert after.returncode == 0, after.stderr + after.stdout
    assert "reporting from the copy fetched at" in after.stderr
    assert json.loads(after.stdout.strip().splitlines()[-1])["fleet"]["items"] == 40
