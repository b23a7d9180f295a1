"""Provider-side security and idempotency on the fake clouds: creates carry an
idempotency token (a retried RunInstances whose reply was lost makes no second
instance), and every cloud node's host key reaches fleet through a channel the cloud
vouches for (GCE guest attributes, EC2 console output) before the first connection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from provider_helpers import CLOUD_RUNTIME, USER, Sleeps, aws_block, context, fleet_spec, gcp_block

from fleet.fleetops import Fleet
from fleet.model import NodeRequest, Role, worker_name
from fleet.providers.aws import AwsProvider
from fleet.providers.gcp import GcpProvider
from fleet.spec.loader import load_fleet_spec
from fleet.testing.fake_ec2 import Fault


def _request(fleet: str, slot: int = 1) -> NodeRequest:
    return NodeRequest(name=worker_name(fleet, slot, 1), role=Role.WORKER, slot=slot, generation=1, spot=True,
                       machine="g4dn.xlarge", disk_gb=60)


def test_a_run_instances_retried_after_a_lost_reply_makes_one_instance(
    tmp_path: Path, fleet_key: tuple[Path, str], fake_ec2: Any, loopback: tuple[str, int], sleeps: Sleeps
) -> None:
    spec = fleet_spec("tk", "aws", ssh_port=loopback[1], aws=aws_block())
    provider = AwsProvider(context(spec, tmp_path / "state", fleet_key[1]), sleep=sleeps)
    # EC2 did the work, then the reply was lost to throttling: the client (botocore's
    # standard retry mode) retries with the same token.
    fake_ec2.add_fault(Fault(action="RunInstances", code="RequestLimitExceeded", times=1, after=True))
    [result] = provider.create([_request("tk")])
    assert result.error is None
    calls = fake_ec2.actions("RunInstances")
    assert len(calls) == 2 and calls[0]["params"]["ClientToken"] == calls[1]["params"]["ClientToken"]
    live = [i for i in fake_ec2.state()["instances"] if i["state"] != "terminated"]
    assert [i["tags"]["Name"] for i in live] == ["tk-w1-g1"]
    provider.destroy_all()


def test_every_gce_insert_carries_a_request_id_that_the_server_dedupes(
    tmp_path: Path, fleet_key: tuple[Path, str], fake_gce: Any, loopback: tuple[str, int]
) -> None:
    spec = fleet_spec("tg", "gcp", ssh_port=loopback[1], gcp=gcp_block(fake_gce))
    provider = GcpProvider(context(spec, tmp_path / "state", fleet_key[1]), sleep=lambda s: None)
    try:
        [first, second] = provider.create([_request("tg", 1), _request("tg", 2)])
        assert first.error is None and second.error is None
        inserts = fake_gce.requests_matching("POST", r"/instances$")
        ids = [r["query"].get("requestId") for r in inserts]
        assert len(ids) == 2 and all(ids) and ids[0] != ids[1]
        # The same request id again (a retry whose reply was lost): the same operation,
        # not a second instance nor an "already exists" error.
        body = dict(inserts[0]["body"])
        again = fake_gce.insert_instance("test-project", "us-central1-a", body, ids[0])
        assert again["targetLink"].endswith("/" + body["name"])
        assert sorted(i["name"] for i in fake_gce.state()["instances"]) == ["tg-w1-g1", "tg-w2-g1"]
    finally:
        provider.destroy_all()


@pytest.mark.slow
@pytest.mark.parametrize("cloud", ["gcp", "aws"])
def test_a_node_answering_with_another_key_than_the_vouched_one_is_refused_on_first_contact(
    cloud: str, request: pytest.FixtureRequest, tmp_path: Path, loopback: tuple[str, int]
) -> None:
    fake = request.getfixturevalue("fake_gce" if cloud == "gcp" else "fake_ec2")
    name = f"hk{cloud[0]}"
    block = {"gcp": gcp_block(fake)} if cloud == "gcp" else {"aws": aws_block()}
    spec_path = tmp_path / "fleet.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": name, "provider": cloud, "workers": {"count": 2},
        "ssh": {"user": USER, "port": loopback[1], "ready_timeout": 60}, "runtime": CLOUD_RUNTIME, **block,
    }))
    impostor = worker_name(name, 2, 1)
    fake.vouch_false_host_key(impostor)
    with Fleet(load_fleet_spec(spec_path), spec_path) as fleet:
        try:
            result = fleet.up()
            assert sorted(n.name for n in result.nodes) == [f"{name}-head", worker_name(name, 1, 1)]
            assert list(result.failures) == [impostor]
            assert "not the one its provider vouches for" in result.failures[impostor]
            # Nothing was pinned for it, and the others are pinned to the vouched keys.
            store = fleet.executor.known_hosts
            assert store.get(impostor) is None
            backing = fake.backing_node if cloud == "gcp" else (lambda n: fake.nodes[fake.instance_id_of(n)])
            for node in result.nodes:
                assert store.get(node.name) == backing(node.name).host_key_line
            # The impostor never got past the key exchange: no login, no command, no mount key.
            log = backing(impostor).sshd_log.read_text()
            assert "Accepted publickey" not in log
            assert not (backing(impostor).home / ".fleet" / "mount_key").exists()
        finally:
            fleet.down()
