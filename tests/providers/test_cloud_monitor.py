"""The monitor on the fake clouds, through the real clients:

- zone cool-down: the replacement of a preempted worker meets a zone without capacity
  and lands in the next allowed zone; that zone then cools down (`monitor.zone_cooldown`),
  so the next replacement is not asked of it at all, even though it has capacity again,
  until the cool-down is over (an injected clock);
- a head stopped (GCE host maintenance, an EC2 stop) is started again, keeps its data
  disk, and the worker remounts it at its internal address."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from provider_helpers import CLOUD_RUNTIME, USER, aws_block, gcp_block

from fleet.fleetops import Fleet
from fleet.model import Role
from fleet.monitor import Monitor
from fleet.reconcile import Create
from fleet.spec.models import FleetSpec

pytestmark = pytest.mark.slow

ZONES = ["us-central1-a", "us-central1-b"]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _spec(name: str, fake: Any, port: int, key: Path, connect_timeout: float = 10, cloud: str = "gcp",
          **monitor: float) -> FleetSpec:
    return FleetSpec.model_validate({
        "name": name, "provider": cloud, "workers": {"count": 1},
        "ssh": {"user": USER, "port": port, "key": str(key), "ready_timeout": 60, "connect_timeout": connect_timeout},
        "runtime": CLOUD_RUNTIME, "monitor": {"grace": 30, "backoff": 1, **monitor},
        cloud: gcp_block(fake, zones=ZONES) if cloud == "gcp" else aws_block(),
    })


def _inserts_in(fake: Any, zone: str) -> int:
    return len(fake.requests_matching("POST", rf"/zones/{zone}/instances$"))


def test_a_zone_without_capacity_is_skipped_for_its_cooldown(tmp_path: Path, fleet_key, fake_gce: Any,
                                                              loopback: tuple[str, int]) -> None:
    spec = _spec("zcool", fake_gce, loopback[1], fleet_key[0], zone_cooldown=300)
    clock = Clock()
    with Fleet(spec, tmp_path / "fleet.yaml", clock=clock) as fleet:
        try:
            up = fleet.up()
            assert up.ok, up.failures
            worker = next(n for n in up.nodes if n.role is Role.WORKER)
            assert worker.zone == ZONES[0]
            monitor = Monitor(fleet, clock=clock)

            fake_gce.set_no_capacity(ZONES[0])
            fake_gce.preempt(worker.name)
            report = monitor.reconcile_once()
            assert report.replaced == {worker.name: "zcool-w1-g2"}, report
            [second] = [n for n in fleet.alive() if n.role is Role.WORKER]
            assert second.zone == ZONES[1]
            assert set(fleet.state.stockouts()) == {ZONES[0]}
            assert any(e.kind == "zone_stockout" and ZONES[0] in e.detail for e in fleet.state.events())

            # Capacity is back in zone a, but it is cooling down: the next replacement is
            # asked of zone b only (before, zone a was asked first again, every time).
            fake_gce.set_no_capacity(ZONES[0], on=False)
            asked_a = _inserts_in(fake_gce, ZONES[0])
            clock.now += 60
            fake_gce.preempt(second.name)
            report = monitor.reconcile_once()
            assert report.replaced == {second.name: "zcool-w1-g3"}, report
            assert [n.zone for n in fleet.alive() if n.role is Role.WORKER] == [ZONES[1]]
            assert _inserts_in(fake_gce, ZONES[0]) == asked_a

            # Past the cool-down every zone is asked again, in the spec's order.
            clock.now += 300
            fake_gce.preempt("zcool-w1-g3")
            [create] = fleet.plan(fleet.observe(), {}).of(Create)
            assert create.request.zones is None
        finally:
            fleet.down()


@pytest.mark.parametrize("cloud", ["gcp", "aws"])
def test_a_stopped_head_is_started_with_its_data_and_remounted(tmp_path: Path, fleet_key, loopback: tuple[str, int],
                                                                cloud: str, request: pytest.FixtureRequest) -> None:
    fake = request.getfixturevalue("fake_gce" if cloud == "gcp" else "fake_ec2")
    # sshfs's reconnect under the worker's mount waits up to the connect timeout (its
    # ConnectTimeout) on the stopped head: the monitor's probe of the mount must not.
    spec = _spec(f"hstart{cloud[0]}", fake, loopback[1], fleet_key[0], connect_timeout=20, cloud=cloud)
    with Fleet(spec, tmp_path / "fleet.yaml") as fleet:
        try:
            up = fleet.up()
            assert up.ok, up.failures
            head = next(n for n in up.nodes if n.role is Role.HEAD)
            [worker] = [n.name for n in up.nodes if n.role is Role.WORKER]
            wrote = fleet.exec([head], 'echo kept > "$FLEET_SHARED/keep.txt"')
            assert wrote.ok, wrote.results
            if cloud == "gcp":
                fake.host_maintenance(head.name)  # TERMINATED, disks kept
            else:
                assert fleet.provider.stop([head.name]) == [head.name]  # as EC2 stops an instance
            started = time.monotonic()
            report = Monitor(fleet).reconcile_once()
            took = time.monotonic() - started
            assert report.started == [head.name] and report.replaced == {}, report
            # The worker's remount at the head's internal address worked (a restarted node
            # keeps its MAC, as a cloud's NIC does: the worker's ARP entry stays right).
            assert report.failed == {} and report.brought_forward == [worker], report
            assert took < 15, f"the pass took {took:.1f} s (a probe of the dead mount waited for sshfs)"
            nodes = [n for n in fleet.alive() if n.name == worker]
            read = fleet.exec(nodes, 'cat "$FLEET_SHARED/keep.txt"')
            assert read.results[worker].stdout == "kept\n", read.results
        finally:
            fleet.down()
