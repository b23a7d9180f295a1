"""The head's data disk on the fake clouds, through the real clients: a head gets the
fleet's data disk (a GCE persistent disk with auto_delete off, an EBS volume with
DeleteOnTermination off), its files outlive the head, a new head attaches it again in
its zone, a stopped head is started with it, and `destroy_all` deletes it unless asked
to keep it, also without any memory of `create`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from provider_helpers import aws_block, context, fleet_spec, gcp_block, ssh_run

from fleet.model import DATA_MOUNT, Node, NodeRequest, NodeState, Role, head_name
from fleet.providers.base import Provider

HEAD = NodeRequest(name=head_name("td"), role=Role.HEAD, slot=0, generation=1, spot=False)
# The head's data directory as its programs find it: loopback nodes are told, others mount it.
DATA = f'"${{FLEET_DATA_DIR:-{DATA_MOUNT}}}"'


# An isolated head (the fakes' default as root) booted the provider's startup script,
# which found the disk mounted and said so in /etc/fleet/data.
MOUNTED = (f'if [ -n "${{FLEET_DATA_DIR:-}}" ]; then echo loopback; '
           f"else mountpoint -q {DATA_MOUNT} && cat /etc/fleet/data; fi")


def expected_mount(fake: Any) -> str:
    return f"{DATA_MOUNT}\n" if fake.isolated else "loopback\n"


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
    host_key = provider.vouched_host_keys([head], timeout=60)[head.name]
    return ssh_run(head.address or "", head.port, key, host_key, command), host_key


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
    _, key_before = on_head(provider, head, fleet_key[0], "true")
    fake_gce.host_maintenance(HEAD.name)
    assert next(n for n in provider.list() if n.name == HEAD.name).state is NodeState.TERMINATED
    assert provider.start([HEAD.name]) == [f"instance {HEAD.name} (us-central1-b)"]
    head = wait_running(provider)
    out, key_after = on_head(provider, head, fleet_key[0], f"cat {DATA}/shared/a.txt")
    assert (out, key_after) == ("kept\n", key_before)
    assert provider.start([HEAD.name]) == []  # running: nothing to start
    assert provider.stop([HEAD.name]) == [f"instance {HEAD.name} (us-central1-b)"]
    assert next(n for n in provider.list() if n.name == HEAD.name).state is NodeState.TERMINATED


def test_gce_destroy_all_keeps_the_data_disk_only_when_asked(tmp_path, fleet_key, fake_gce, loopback):
    provider = gce(tmp_path, fleet_key[1], fake_gce, loopback[1])
    provider.prepare()
    create_head(provider)
    kept = gce(tmp_path, fleet_key[1], fake_gce, loopback[1]).destroy_all(keep_data=True)  # no memory of create
    assert kept.errors == [] and [line.split(" (")[0] for line in kept.kept] == ["disk td-data"]
    assert "gcloud compute disks delete td-data --zone us-central1-a" in (kept.kept_hint or "")
    assert [d["name"] for d in fake_gce.state()["disks"]] == ["td-data"]
    assert fake_gce.state()["instances"] == []
    report = gce(tmp_path, fleet_key[1], fake_gce, loopback[1]).destroy_all()
    assert report.errors == [] and "disk td-data (us-central1-a)" in report.deleted
    assert fake_gce.state()["disks"] == [] and not fake_gce.disk_dir("us-central1-a", "td-data").exists()
