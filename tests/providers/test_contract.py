"""One contract for every provider (libcloud's idea): local, fake GCE, fake EC2.

create -> list shows it RUNNING with an address -> SSH reaches the very node (its host
key checked) -> preempt -> list shows PREEMPTED (or it is gone) -> delete ->
destroy_all leaves nothing: no instance, firewall rule, security group, key pair, and
no backing sshd.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from provider_helpers import aws_block, context, fleet_spec, gcp_block, is_test_local, ssh_run

from fleet.model import NodeRequest, NodeState, Role, worker_name
from fleet.providers.base import Provider

pytestmark = pytest.mark.slow


@dataclass
class Harness:
    provider: Provider
    host_key: Callable[[str], str]  # what the node's sshd really presents
    leftovers: Callable[[], list[str]]  # anything of the fleet still existing


def _local(tmp_path: Path, key: str, loopback: tuple[str, int], request: pytest.FixtureRequest) -> Harness:
    try:
        from fleet.providers.local import LocalProvider
    except ImportError:
        pytest.skip("fleet/providers/local.py (the orchestrator's) is not there yet")
    from fleet.providers.localnode import LocalNode

    root = tmp_path / "local"
    spec = fleet_spec("ctl", "local", local={"root": str(root), "address": loopback[0]})
    provider = LocalProvider(context(spec, tmp_path / "state", key))

    def host_key(name: str) -> str:
        return next(n.host_key_line for n in LocalNode.list(root, "ctl") if n.name == name)

    def leftovers() -> list[str]:
        return [n.name for n in LocalNode.list(root, "ctl") if n.is_running()]

    return Harness(provider, host_key, leftovers)


def _gcp(tmp_path: Path, key: str, loopback: tuple[str, int], request: pytest.FixtureRequest) -> Harness:
    from fleet.providers.gcp import GcpProvider

    fake = request.getfixturevalue("fake_gce")
    spec = fleet_spec("ctg", "gcp", ssh_port=loopback[1], gcp=gcp_block(fake))
    provider = GcpProvider(context(spec, tmp_path / "state", key), sleep=lambda s: None)

    def leftovers() -> list[str]:
        state = fake.state()
        return (
            [f"instance {i['name']}" for i in state["instances"]]
            + [f"firewall {f}" for f in state["firewalls"]]
            + [f"disk {d['name']}" for d in state["disks"]]
            + [f"sshd {n}" for n in state["backing_nodes"]]
        )

    return Harness(provider, lambda name: fake.backing_node(name).host_key_line, leftovers)


def _aws(tmp_path: Path, key: str, loopback: tuple[str, int], request: pytest.FixtureRequest) -> Harness:
    from fleet.providers.aws import AwsProvider

    fake = request.getfixturevalue("fake_ec2")
    spec = fleet_spec("cta", "aws", ssh_port=loopback[1], aws=aws_block())
    provider = AwsProvider(context(spec, tmp_path / "state", key), sleep=lambda s: None)

    def host_key(name: str) -> str:
        return fake.nodes[fake.instance_id_of(name)].host_key_line

    def leftovers() -> list[str]:
        state = fake.state()
        return (
            [f"instance {i['id']}" for i in state["instances"] if i["state"] != "terminated"]
            + [f"security group {g}" for g in state["security_groups"]]
            + [f"key pair {k}" for k in state["key_pairs"]]
            + [f"sshd {n}" for n in state["backing_nodes"]]
        )

    return Harness(provider, host_key, leftovers)


@pytest.fixture(params=["local", "gcp", "aws"])
def harness(
    request: pytest.FixtureRequest, tmp_path: Path, fleet_key: tuple[Path, str], loopback: tuple[str, int]
) -> Iterator[Harness]:
    make = {"local": _local, "gcp": _gcp, "aws": _aws}[request.param]
    made = make(tmp_path, fleet_key[1], loopback, request)
    try:
        yield made
    finally:
        made.provider.destroy_all()
        made.provider.close()


def _wait_state(
    provider: Provider, name: str, states: set[NodeState], *, gone_ok: bool = False, timeout: float = 30.0
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        node = next((n for n in provider.list() if n.name == name), None)
        if (node is None and gone_ok) or (node is not None and node.state in states):
            return node
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: {node} never reached {states}")
        time.sleep(0.2)


def test_lifecycle(harness: Harness, fleet_key: tuple[Path, str]) -> None:
    provider = harness.provider
    assert provider.prepare() is not None
    requests = [
        NodeRequest(
            name=worker_name(provider.spec.name, slot, 1),
            role=Role.WORKER,
            slot=slot,
            generation=1,
            spot=True,
        )
        for slot in (1, 2)
    ]
    results = provider.create(requests)
    assert [r.error for r in results] == [None, None]

    for request in requests:
        node = _wait_state(provider, request.name, {NodeState.RUNNING})
        assert is_test_local(node.address), node
        assert node.role is Role.WORKER and node.generation == 1 and node.spot
        out = ssh_run(node.address, node.port, fleet_key[0], harness.host_key(node.name), "echo reached")
        assert out.strip() == "reached"

    victim, survivor = requests[0].name, requests[1].name
    provider.preempt(victim)
    node = _wait_state(provider, victim, {NodeState.PREEMPTED}, gone_ok=True)
    assert node is None or node.state is NodeState.PREEMPTED
    assert next(n for n in provider.list() if n.name == survivor).state is NodeState.RUNNING

    deleted = provider.delete([survivor])
    assert any(survivor in line for line in deleted)
    _wait_state(provider, survivor, set(), gone_ok=True)

    report = provider.destroy_all()
    assert report.errors == []
    assert [n for n in provider.list()] == []
    assert harness.leftovers() == []
    # Idempotent: a second pass finds nothing and fails on nothing.
    again = provider.destroy_all()
    assert again.errors == [] and [line for line in again.deleted if line.startswith("instance")] == []
