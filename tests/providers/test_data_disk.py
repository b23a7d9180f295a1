"""The head's data disk on the fake clouds, through the real clients: a head gets the
fleet's data disk (a GCE persistent disk with auto_delete off, an EBS volume with
DeleteOnTermination off), its files outlive the head, a new head attaches it again in
its zone, a stopped head is started with it, and `destroy_all` deletes it unless asked
to keep it, also without any memory of `create`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from provider_helpers import aws_block, context, fleet_spec, gcp_block, is_test_local, ssh_run

from fleet.model import DATA_MOUNT, Node, NodeRequest, NodeState, Role, head_name
from fleet.providers.base import Provider
from fleet.providers.localns import missing_for_namespaces

HEAD = NodeRequest(name=head_name("td"), role=Role.HEAD, slot=0, generation=1, spot=False)
# The head's data directory as its programs find it: loopback nodes are told, others mount it.
DATA = f'"${{FLEET_DATA_DIR:-{DATA_MOUNT}}}"'


# An isolated head (the fakes' default as root) booted the provider's startup script,
# which found the disk mounted and said so in /etc/fleet/data.
MOUNTED = (f'if [ -n "${{FLEET_DATA_DIR:-}}" ]; then echo loopback; '
           f"else mountpoint -q {DATA_MOUNT} && cat /etc/fleet/data; fi")


def expected_mount(fake: Any) -> str:
    return f"{DATA_MOUNT}\n" if fake.isolated else "loopback\n"


def stop_start_keeps_the_disk_and_host_key(provider: Provider, head: Node, key: Path, stop: Callable[[], Any],
                                           how: str) -> Node:
    """Stop the head with `stop`; `start` boots it again with its disk and host key."""
    _, key_before = on_head(provider, head, key, "true")
    stop()
    assert next(n for n in provider.list() if n.name == HEAD.name).state is NodeState.TERMINATED, how
    assert provider.start([HEAD.name]) == [HEAD.name]  # the names of the nodes started
    head = wait_running(provider)
    out, key_after = on_head(provider, head, key, f"cat {DATA}/shared/a.txt")
    assert (out, key_after) == ("kept\n", key_before)
    assert provider.start([HEAD.name]) == []  # running: nothing to start
    return head


def create_head(provider: Provider) -> Node:
    [result] = provider.create([HEAD])
    assert result.error is None, result.error
    return wait_running(provider)


def wait_running(provider: Provider, timeout: float = 90) -> Node:
    deadline = time.monotonic() + timeout
    while True:
        head = next((n for n in provider.list() if n.name == HEAD.name), None)
        if head is not None and head.state is NodeState.RUNNING and head.address:
            return head
        assert time.monotonic() < deadline, f"head not running: {head}"
        time.sleep(0.1)


def on_head(provider: Provider, head: Node, key: Path, command: str) -> tuple[str, str]:
    """(stdout of `command` on the head, the host key the provider vouched for)."""
    assert is_test_local(head.address), head  # never a fake's made-up address
    host_key = provider.vouched_host_keys([head], timeout=60)[head.name]
    return ssh_run(head.address or "", head.port, key, host_key, command), host_key


# -- local ----------------------------------------------------------------------------------
@pytest.fixture(params=["loopback", "namespaces"])
def local(request: pytest.FixtureRequest, tmp_path: Path, fleet_key: tuple[Path, str]) -> Iterator[Provider]:
    from fleet.providers.local import LocalProvider

    if request.param == "namespaces" and (reason := missing_for_namespaces()):
        pytest.skip(reason)
    spec = fleet_spec("td", "local", workers={"count": 0},
                      local={"root": str(tmp_path / "nodes"), "isolation": request.param})
    provider = LocalProvider(context(spec, tmp_path / "state", fleet_key[1]))
    try:
        yield provider
    finally:
        provider.destroy_all()


def test_local_data_dir_outlives_the_head_and_a_stop(local, fleet_key):
    head = create_head(local)
    out, _ = on_head(local, head, fleet_key[0], f"mkdir -p {DATA}/shared && echo kept > {DATA}/shared/a.txt "
                     f"&& {MOUNTED}")
    assert out == (f"{DATA_MOUNT}\n" if local.isolation == "namespaces" else "loopback\n")
    data = local.root / "td" / ".data"  # the fleet's, outside the head's own directory
    assert (data / "shared" / "a.txt").read_text() == "kept\n"

    def stop() -> None:
        assert local.stop([HEAD.name]) == [HEAD.name]

    head = stop_start_keeps_the_disk_and_host_key(local, head, fleet_key[0], stop, "stopped")

    local.delete([HEAD.name])
    assert not (local.root / "td" / HEAD.name).exists() and (data / "shared" / "a.txt").exists()
    head = create_head(local)
    assert on_head(local, head, fleet_key[0], f"cat {DATA}/shared/a.txt")[0] == "kept\n"

    kept = local.destroy_all(keep_data=True)
    assert kept.kept == [f"local data disk {data}"] and data.is_dir() and local.list() == []
    report = local.destroy_all()
    assert f"local data disk {data}" in report.deleted and not (local.root / "td").exists()


# -- GCE ------------------------------------------------------------------------------------
def gce(tmp_path: Path, key: str, fake: Any, port: int) -> Provider:
    from fleet.providers.gcp import GcpProvider

    spec = fleet_spec("td", "gcp", ssh_port=port, workers={"count": 0},
                      head={"data_disk_gb": 20}, gcp=gcp_block(fake))
    return GcpProvider(context(spec, tmp_path / "state", key), sleep=lambda s: None)


def test_gce_data_disk_outlives_the_head_follows_its_zone_and_survives_a_stop(
        tmp_path, fleet_key, fake_gce, loopback):
    provider = gce(tmp_path, fleet_key[1], fake_gce, loopback[1])
    provider.prepare()
    fake_gce.set_no_capacity("us-central1-a")  # the first head (and its disk) land in zone b
    head = create_head(provider)
    assert head.zone == "us-central1-b"
    [disk] = [d for d in fake_gce.state()["disks"] if d["name"] == "td-data"]
    assert (disk["zone"], disk["labels"]["fleet-role"], disk["users"]) == (
        "us-central1-b", "data", [fake_gce.instance("td-head")["selfLink"]])
    [insert] = [r["body"] for r in fake_gce.requests_matching("POST", r"/zones/us-central1-b/instances$")]
    [attached] = [d for d in insert["disks"] if not d.get("boot")]
    assert attached["autoDelete"] is False and attached["deviceName"] == "fleet-data"
    assert attached["source"].endswith("/zones/us-central1-b/disks/td-data")
    assert "google-fleet-data" in next(i["value"] for i in insert["metadata"]["items"]
                                       if i["key"] == "startup-script")
    out, _ = on_head(provider, head, fleet_key[0], f"mkdir -p {DATA}/shared && echo kept > {DATA}/shared/a.txt "
                     f"&& cat {DATA}/shared/a.txt && {MOUNTED}")
    assert out == "kept\n" + expected_mount(fake_gce)

    # Deleted: the disk stays, unattached; a new head goes to the disk's zone (a has room again).
    provider.delete([HEAD.name])
    assert [d["users"] for d in fake_gce.state()["disks"] if d["name"] == "td-data"] == [[]]
    fake_gce.set_no_capacity("us-central1-a", False)
    head = create_head(provider)
    assert head.zone == "us-central1-b"
    assert on_head(provider, head, fleet_key[0], f"cat {DATA}/shared/a.txt")[0] == "kept\n"

    # Host maintenance stops the head (TERMINATED); `start` boots it with its disk and host key.
    head = stop_start_keeps_the_disk_and_host_key(
        provider, head, fleet_key[0], lambda: fake_gce.host_maintenance(HEAD.name), "host maintenance")
    assert provider.stop([HEAD.name]) == [HEAD.name]
    assert next(n for n in provider.list() if n.name == HEAD.name).state is NodeState.TERMINATED


def test_gce_destroy_all_keeps_the_data_disk_only_when_asked(tmp_path, fleet_key, fake_gce, loopback):
    provider = gce(tmp_path, fleet_key[1], fake_gce, loopback[1])
    provider.prepare()
    head = create_head(provider)
    on_head(provider, head, fleet_key[0], f"mkdir -p {DATA}/shared && echo kept > {DATA}/shared/a.txt")
    kept = gce(tmp_path, fleet_key[1], fake_gce, loopback[1]).destroy_all(keep_data=True)  # no memory of create
    assert kept.errors == [] and [line.split(" (")[0] for line in kept.kept] == ["disk td-data"]
    assert "gcloud compute disks delete td-data --zone us-central1-a" in (kept.kept_hint or "")
    assert [d["name"] for d in fake_gce.state()["disks"]] == ["td-data"]
    assert fake_gce.state()["instances"] == []
    # The next fleet's head attaches the kept disk.
    provider = gce(tmp_path, fleet_key[1], fake_gce, loopback[1])
    provider.prepare()
    head = create_head(provider)
    assert on_head(provider, head, fleet_key[0], f"cat {DATA}/shared/a.txt")[0] == "kept\n"
    report = gce(tmp_path, fleet_key[1], fake_gce, loopback[1]).destroy_all()
    assert report.errors == [] and "disk td-data (us-central1-a)" in report.deleted
    assert fake_gce.state()["disks"] == [] and not fake_gce.disk_dir("us-central1-a", "td-data").exists()


# -- EC2 ------------------------------------------------------------------------------------
def ec2(tmp_path: Path, key: str, port: int) -> Provider:
    from fleet.providers.aws import AwsProvider

    spec = fleet_spec("td", "aws", ssh_port=port, workers={"count": 0}, head={"data_disk_gb": 20},
                      aws=aws_block())
    return AwsProvider(context(spec, tmp_path / "state", key), sleep=lambda s: None, live_prices=False)


def data_volumes(fake: Any) -> list[Any]:
    from fleet.testing.fake_ec2 import _moto_backend

    backend = _moto_backend(fake.region)
    return [v for v in backend.volumes.values()
            if {t["key"]: t["value"] for t in backend.describe_tags(filters={"resource-id": [v.id]})}
            .get("fleet-role") == "data"]


def test_ec2_data_volume_outlives_the_head_follows_its_zone_and_survives_a_stop(
        tmp_path, fleet_key, fake_ec2, loopback):
    from fleet.testing.fake_ec2 import Fault

    provider = ec2(tmp_path, fleet_key[1], loopback[1])
    provider.prepare()
    fake_ec2.add_fault(Fault("RunInstances", "InsufficientInstanceCapacity", zone="us-east-1a"))
    head = create_head(provider)
    assert head.zone == "us-east-1b"
    [volume] = data_volumes(fake_ec2)  # the blank one made for us-east-1a was deleted with its zone
    assert volume.zone.name == "us-east-1b" and volume.attachment.instance.id == head.provider_id
    [mapping] = [m for d, m in volume.attachment.instance.block_device_mapping.items() if d == "/dev/sdf"]
    assert mapping.delete_on_termination is False
    assert head.labels["fleet-data-volume"] == volume.id
    out, _ = on_head(provider, head, fleet_key[0], f"mkdir -p {DATA}/shared && echo kept > {DATA}/shared/a.txt "
                     f"&& cat {DATA}/shared/a.txt && {MOUNTED}")
    assert out == "kept\n" + expected_mount(fake_ec2)

    # Terminated: the volume stays; a new head goes to its zone, though us-east-1a has room again.
    provider.delete([HEAD.name])
    fake_ec2.clear_faults()
    head = create_head(provider)
    assert head.zone == "us-east-1b" and [v.id for v in data_volumes(fake_ec2)] == [volume.id]
    assert on_head(provider, head, fleet_key[0], f"cat {DATA}/shared/a.txt")[0] == "kept\n"

    # Stopped (as EC2 stops an instance) and started: the same disk and host key.
    def stop() -> None:
        assert provider.stop([HEAD.name]) == [HEAD.name]

    stop_start_keeps_the_disk_and_host_key(provider, head, fleet_key[0], stop, "EC2 stop")


def test_ec2_attach_refuses_a_volume_in_use_or_in_another_zone(tmp_path, fleet_key, fake_ec2, loopback):
    import boto3
    import botocore.exceptions

    fake_ec2.backing = False  # no sshd behind these instances: only the API is under test
    client = boto3.client("ec2", region_name="us-east-1", endpoint_url=fake_ec2.endpoint)
    run = {"ImageId": "ami-03cf127a", "MinCount": 1, "MaxCount": 1}
    first = client.run_instances(**run, Placement={"AvailabilityZone": "us-east-1a"})["Instances"][0]["InstanceId"]
    other = client.run_instances(**run, Placement={"AvailabilityZone": "us-east-1b"})["Instances"][0]["InstanceId"]
    volume = client.create_volume(AvailabilityZone="us-east-1a", Size=10)["VolumeId"]
    with pytest.raises(botocore.exceptions.ClientError, match="InvalidVolume.ZoneMismatch"):
        client.attach_volume(VolumeId=volume, InstanceId=other, Device="/dev/sdf")
    client.attach_volume(VolumeId=volume, InstanceId=first, Device="/dev/sdf")
    with pytest.raises(botocore.exceptions.ClientError, match="VolumeInUse"):
        client.attach_volume(VolumeId=volume, InstanceId=first, Device="/dev/sdg")


def test_ec2_destroy_all_keeps_the_data_volume_only_when_asked(tmp_path, fleet_key, fake_ec2, loopback):
    provider = ec2(tmp_path, fleet_key[1], loopback[1])
    provider.prepare()
    head = create_head(provider)
    on_head(provider, head, fleet_key[0], f"mkdir -p {DATA}/shared && echo kept > {DATA}/shared/a.txt")
    [volume] = data_volumes(fake_ec2)
    kept = ec2(tmp_path, fleet_key[1], loopback[1]).destroy_all(keep_data=True)  # no memory of create
    assert kept.errors == [] and [line.split(" (")[0] for line in kept.kept] == [f"volume {volume.id}"]
    assert f"aws ec2 delete-volume --volume-id {volume.id}" in (kept.kept_hint or "")
    assert [v.id for v in data_volumes(fake_ec2)] == [volume.id] and volume.attachment is None
    # The next fleet's head attaches the kept volume.
    provider = ec2(tmp_path, fleet_key[1], loopback[1])
    provider.prepare()
    head = create_head(provider)
    assert on_head(provider, head, fleet_key[0], f"cat {DATA}/shared/a.txt")[0] == "kept\n"
    report = ec2(tmp_path, fleet_key[1], loopback[1]).destroy_all()
    assert report.errors == [] and f"volume {volume.id}" in report.deleted
    assert data_volumes(fake_ec2) == [] and not fake_ec2.disk_dir(volume.id).exists()
