"""The fake clouds as strict as the clouds: isolated backing nodes booted by the
instance's startup script (EC2 user data, GCE startup-script metadata), with the
security groups / firewall rules enforced on the fleet's bridge.

What the cloud would drop is dropped: a worker's mount of the head needs the fleet's
intra-fleet rule (a self-referencing security group on AWS, a tag-to-tag firewall rule
on GCP, where a custom network has no allow-internal); without it the mount fails
within the connect timeout with an error naming the rule, with it the mount works."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from provider_helpers import CLOUD_RUNTIME, USER, aws_block, gcp_block

from fleet.bringup import BringUp
from fleet.fleetops import Fleet, UpResult
from fleet.model import Role
from fleet.providers.localns import missing_for_namespaces
from fleet.spec.models import FleetSpec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_for_namespaces() is not None,
                       reason=f"isolated nodes need root and their tools: {missing_for_namespaces()}"),
]
CONNECT_TIMEOUT = 3


@pytest.fixture
def isolated_ec2(tmp_path: Path, aws_credentials: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from fleet.testing.fake_ec2 import FakeEc2

    fake = FakeEc2(nodes_root=tmp_path / "ec2-nodes", ssh_port=22, isolation="namespaces",
                   caller_address="127.0.0.1", boot_delay=0.5).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", fake.endpoint)
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def isolated_gce(tmp_path: Path) -> Iterator[Any]:
    from fleet.testing.fake_gce import FakeGce

    fake = FakeGce(nodes_root=tmp_path / "gce-nodes", ssh_port=22, isolation="namespaces",
                   caller_address="127.0.0.1").start()
    try:
        yield fake
    finally:
        fake.stop()
        shutil.rmtree(tmp_path / "gce-nodes", ignore_errors=True)


def _fleet(tmp_path: Path, key: tuple[Path, str], provider: str, block: dict[str, Any]) -> Fleet:
    spec = FleetSpec.model_validate({
        "name": f"iso{provider[0]}", "provider": provider, "workers": {"count": 1},
        "ssh": {"user": USER, "port": 22, "key": str(key[0]), "connect_timeout": CONNECT_TIMEOUT,
                "ready_timeout": 60},
        "runtime": CLOUD_RUNTIME,
        provider: block,
    })
    return Fleet(spec, tmp_path / "fleet.yaml")


def _remount(fleet: Fleet) -> tuple[UpResult, float]:
    """Unmount the worker's shared directory, then mount it again as `up` does."""
    nodes = fleet.alive()
    head = next(n for n in nodes if n.role is Role.HEAD)
    workers = [n for n in nodes if n.role is Role.WORKER]
    unmounted = fleet.exec(workers, 'fusermount3 -u -z "$FLEET_SHARED" || umount -l "$FLEET_SHARED"')
    assert unmounted.ok, unmounted.results
    result = UpResult()
    started = time.monotonic()
    BringUp(fleet).mount_shared(head, workers, result)
    return result, time.monotonic() - started


def _check_mounted(fleet: Fleet) -> None:
    workers = [n for n in fleet.alive() if n.role is Role.WORKER]
    mounted = fleet.exec(workers, 'mountpoint -q "$FLEET_SHARED" && ls "$FLEET_SHARED" >/dev/null')
    assert mounted.ok, mounted.results


def test_ec2_mount_needs_the_self_referencing_group(tmp_path, fleet_key, isolated_ec2) -> None:
    with _fleet(tmp_path, fleet_key, "aws", aws_block()) as fleet:
        try:
            up = fleet.up()
            assert up.ok, up.failures
            assert all(n.address and n.address.startswith("10.250.") for n in up.nodes), up.nodes
            _check_mounted(fleet)  # the provider added the intra-fleet rule
            ec2 = boto3.client("ec2", region_name="us-east-1")
            group = ec2.describe_security_groups(GroupNames=[fleet.provider.group_name])["SecurityGroups"][0]
            own = [p for p in group["IpPermissions"]
                   if any(pair["GroupId"] == group["GroupId"] for pair in p.get("UserIdGroupPairs", []))]
            assert own, group["IpPermissions"]
            # Without it (as every fleet had before), the security group drops the worker's
            # connection to the head's private address: a per-node error naming the rule.
            ec2.revoke_security_group_ingress(GroupId=group["GroupId"], IpPermissions=own)
            result, elapsed = _remount(fleet)
            worker = f"{fleet.spec.name}-w1-g1"
            assert worker in result.failures, result
            assert "self-referencing" in result.failures[worker] and fleet.provider.group_name in result.failures[worker]
            assert elapsed < CONNECT_TIMEOUT + 30, elapsed  # the connect timeout, plus a loaded machine
            again = fleet.up()  # puts the rule back
            assert again.ok, again.failures
            _check_mounted(fleet)
        finally:
            fleet.down()
    assert not isolated_ec2.state()["backing_nodes"]


def test_gce_mount_needs_the_fleet_tag_rule(tmp_path, fleet_key, isolated_gce) -> None:
    with _fleet(tmp_path, fleet_key, "gcp", gcp_block(isolated_gce)) as fleet:
        try:
            up = fleet.up()
            assert up.ok, up.failures
            _check_mounted(fleet)
            internal = isolated_gce.firewalls[fleet.provider.internal_firewall_name]
            assert internal["sourceTags"] == internal["targetTags"] == [fleet.provider.network_tag]
            # A network without allow-internal and without the fleet's rule drops the mount.
            del isolated_gce.firewalls[fleet.provider.internal_firewall_name]
            isolated_gce.apply_policy()
            result, elapsed = _remount(fleet)
            worker = f"{fleet.spec.name}-w1-g1"
            assert worker in result.failures, result
            assert fleet.provider.internal_firewall_name in result.failures[worker]
            assert elapsed < CONNECT_TIMEOUT + 30, elapsed
            again = fleet.up()
            assert again.ok, again.failures
            _check_mounted(fleet)
        finally:
            fleet.down()
