"""provider_scale: 1,000 workers through the GCP and AWS providers against the fakes.

For each cloud: the fake runs as its own process without backing sshd
(`python -m fleet.testing.fake_gce --no-backing`, `python -m fleet.testing.fake_ec2
--no-backing`), and this process is the control plane: it creates N workers, lists
them, has the fake preempt 50 of them (GCE: STOP action, so they stay listed;
EC2: spot interruption) and times the one poll that must find all 50, then deletes
everything. API calls are counted at the fake. Reference measured in the same run:
a naive monitor that asks about each node costs N calls per poll; the ratio says how
much cheaper the label/tag list is. Peak RSS is this process's (the fakes excluded).

    .venv/bin/python benchmarks/provider_scale.py [--nodes 1000] [--aws-nodes 250] [--preempt 50]

AWS runs 250 nodes by default: moto evaluates a tag filter by scanning every tag of
every instance, so one DescribeInstances costs O(instances x tags) in the fake itself
(about 30 s per call at 1,000 instances on 2 shared cores), which would measure moto,
not the provider. `--aws-nodes 1000` runs the full size (several minutes).

Last line: one JSON object with create_s, list_s, detect_s, delete_s, calls_per_poll,
zones, peak_rss_mb (top level: the worse of the two clouds) and the per-cloud figures
under "gcp" and "aws".
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:9")
os.environ.setdefault("GCE_METADATA_IP", "127.0.0.1:9")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

from fleet.model import NodeRequest, NodeState, Role, worker_name
from fleet.providers.base import Provider, ProviderContext
from fleet.providers.localnode import free_port, generate_ed25519_keypair
from fleet.spec.models import FleetSpec

FLEET = "scale"
GCP_ZONES = ["us-central1-a", "us-central1-b", "us-central1-c"]


def start_fake(module: str, *extra: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port("127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), "--no-backing", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if "serving on" not in line:
        proc.kill()
        raise SystemExit(f"{module} did not start: {line!r}")
    return proc, line.strip().rsplit(" ", 1)[-1]


def control(endpoint: str, action: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body or {}).encode()
    method = "POST" if body is not None else "GET"
    request = urllib.request.Request(
        f"{endpoint}/_fake/{action}",
        data=data if body is not None else None,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def requests_count(endpoint: str) -> int:
    return len(control(endpoint, "requests"))


def measure(provider: Provider, endpoint: str, nodes: int, preempt: int, interrupt: Any) -> dict[str, Any]:
    requests = [
        NodeRequest(name=worker_name(FLEET, slot, 1), role=Role.WORKER, slot=slot, generation=1, spot=True)
        for slot in range(1, nodes + 1)
    ]
    provider.prepare()
    started = time.perf_counter()
    results = provider.create(requests)
    create_s = time.perf_counter() - started
    failed = [r for r in results if r.error is not None]
    if failed:
        raise SystemExit(f"{len(failed)} creations failed, first: {failed[0].error}")

    started = time.perf_counter()
    listed = provider.list()
    list_s = time.perf_counter() - started
    assert len(listed) == nodes, len(listed)

    victims = [r.name for r in requests[:: max(1, nodes // preempt)][:preempt]]
    for name in victims:
        interrupt(name)
    before = requests_count(endpoint)
    started = time.perf_counter()
    polled = provider.list()
    detect_s = time.perf_counter() - started
    calls = requests_count(endpoint) - before
    found = {n.name for n in polled if n.state is NodeState.PREEMPTED}
    assert found == set(victims), (len(found), len(victims))

    started = time.perf_counter()
    provider.destroy_all()
    delete_s = time.perf_counter() - started
    assert provider.list() == []
    return {
        "create_s": round(create_s, 2),
        "list_s": round(list_s, 3),
        "detect_s": round(detect_s, 3),
        "delete_s": round(delete_s, 2),
        "calls_per_poll": calls,
        "reference_calls_per_poll_per_node_get": nodes,
        "calls_ratio_vs_reference": round(calls / nodes, 4),
        "nodes": nodes,
        "preempted": preempt,
    }


def run_gcp(ctx_args: dict[str, Any], nodes: int, preempt: int) -> dict[str, Any]:
    from fleet.providers.gcp import GcpProvider

    proc, endpoint = start_fake("fleet.testing.fake_gce")
    try:
        spec = FleetSpec.model_validate(
            {
                "name": FLEET,
                "provider": "gcp",
                "workers": {"count": nodes, "gcp": {"instance_termination_action": "STOP"}},
                "gcp": {
                    "project": "bench",
                    "zones": GCP_ZONES,
                    "api_endpoint": endpoint,
                    "source_ranges": ["127.0.0.0/8"],
                },
            }
        )
        provider = GcpProvider(ProviderContext(spec=spec, **ctx_args), max_parallel=16)
        figures = measure(
            provider, endpoint, nodes, preempt, lambda name: control(endpoint, "preempt", {"name": name})
        )
        provider.close()
        return {**figures, "zones": len(GCP_ZONES)}
    finally:
        proc.terminate()
        proc.wait(30)


def run_aws(ctx_args: dict[str, Any], nodes: int, preempt: int) -> dict[str, Any]:
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    proc, endpoint = start_fake("fleet.testing.fake_ec2")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        from fleet.providers.aws import AwsProvider

        spec = FleetSpec.model_validate(
            {
                "name": FLEET,
                "provider": "aws",
                "workers": {"count": nodes},
                "aws": {
                    "region": "us-east-1",
                    "zones": ["us-east-1a", "us-east-1b"],
                    "ami": "ami-03cf127a",
                    "source_ranges": ["127.0.0.0/8"],
                },
            }
        )
        provider = AwsProvider(ProviderContext(spec=spec, **ctx_args), max_parallel=8, live_prices=False)
        figures = measure(
            provider,
            endpoint,
            nodes,
            preempt,
            lambda name: control(endpoint, "interrupt", {"instance": name}),
        )
        provider.close()
        return {**figures, "zones": 1}  # one region: one describe_instances per poll
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--aws-nodes", type=int, default=250, help="moto's tag filter is O(n^2): see above")
    parser.add_argument("--preempt", type=int, default=50)
    parser.add_argument("--only", choices=["gcp", "aws"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="provider-scale-"))
    public_key = generate_ed25519_keypair(tmp / "key", "bench")
    ctx_args = {"state_dir": tmp, "public_key": public_key, "ssh_user": getpass.getuser()}
    result: dict[str, Any] = {}
    sizes = {"gcp": args.nodes, "aws": args.aws_nodes}
    for cloud, run in (("gcp", run_gcp), ("aws", run_aws)):
        if args.only in (None, cloud):
            preempt = min(args.preempt, sizes[cloud])
            result[cloud] = run(ctx_args, sizes[cloud], preempt)
            print(f"{cloud}: {result[cloud]}", flush=True)
    clouds = [result[c] for c in ("gcp", "aws") if c in result]
    peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary = {
        key: max(c[key] for c in clouds)
        for key in ("create_s", "list_s", "detect_s", "delete_s", "calls_per_poll", "zones")
    }
    summary["peak_rss_mb"] = peak_rss_mb
    summary["peak_rss_goal_mb"] = 300
    summary["note"] = "top-level figures: the worse of the clouds run; calls counted at the fake"
    print(json.dumps({**summary, **result}))


if __name__ == "__main__":
    main()
