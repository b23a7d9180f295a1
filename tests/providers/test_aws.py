"""AWS provider: in-process moto (`mock_aws`) for what is sent and created, and the fake
EC2 server (moto behind AWS_ENDPOINT_URL, errors injected at its middleware) for zone
failover, limits, throttling, interruptions, dry-run and cleanup after a killed `up`."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from provider_helpers import Sleeps, aws_block, context, fleet_spec, is_test_local, kill_up_midway

from fleet.errors import CapacityError, CredentialsError, QuotaError
from fleet.model import NodeRequest, NodeState, Role, head_name, worker_name
from fleet.providers.aws import API_ATTEMPTS, AwsProvider
from fleet.testing.fake_ec2 import Fault

MUTATING_PREFIXES = (
    "Run",
    "Terminate",
    "Stop",
    "Start",
    "Create",
    "Delete",
    "Import",
    "Authorize",
    "Revoke",
    "Modify",
    "Associate",
    "Request",
    "Cancel",
)


def make(
    tmp_path: Path,
    key: str,
    *,
    port: int = 22,
    sleep: Any = None,
    workers: dict[str, Any] | None = None,
    **aws: Any,
) -> AwsProvider:
    spec = fleet_spec(
        "ta",
        "aws",
        ssh_port=port,
        workers=workers or {"count": 2, "machine": "g4dn.xlarge"},
        aws=aws_block(**aws),
    )
    return AwsProvider(
        context(spec, tmp_path / "state", key), sleep=sleep if sleep is not None else (lambda s: None)
    )


def worker(slot: int, gen: int = 1) -> NodeRequest:
    return NodeRequest(
        name=worker_name("ta", slot, gen),
        role=Role.WORKER,
        slot=slot,
        generation=gen,
        spot=True,
        machine="g4dn.xlarge",
        disk_gb=60,
    )


@pytest.fixture
def moto_in_process(aws_credentials: None) -> Iterator[None]:
    from moto import mock_aws

    with mock_aws():
        yield


def test_security_group_follows_the_caller_to_a_new_address(tmp_path, fleet_key, moto_in_process):
    assert make(tmp_path, fleet_key[1], port=2222, source_ranges=["203.0.113.7/32"]).prepare()
    moved = make(tmp_path, fleet_key[1], port=2222, source_ranges=["203.0.113.99/32", "2001:db8::1/128"])
    changed = moved.prepare()
    assert changed == [
        "security group fleet-ta-ssh now admits 2001:db8::1/128, 203.0.113.99/32 only (was 203.0.113.7/32)"
    ]
    ec2 = boto3.client("ec2", region_name="us-east-1")
    group = ec2.describe_security_groups(GroupNames=["fleet-ta-ssh"])["SecurityGroups"][0]
    ssh = [p for p in group["IpPermissions"] if p["FromPort"] == 2222]
    assert {r["CidrIp"] for p in ssh for r in p["IpRanges"]} == {"203.0.113.99/32"}  # the old one revoked
    assert {r["CidrIpv6"] for p in ssh for r in p["Ipv6Ranges"]} == {"2001:db8::1/128"}
    assert moved.prepare() == []


def test_spot_options_tags_key_pair_and_group_as_created(tmp_path, fleet_key, moto_in_process):
    provider = make(
        tmp_path,
        fleet_key[1],
        port=2222,
        workers={"count": 1, "aws": {"max_price": "0.42"}},
        tags={"team": "nlp"},
        source_ranges=["203.0.113.7/32"],
    )
    created = provider.prepare()
    assert created == ["key pair fleet-ta",
                       "security group fleet-ta-ssh (tcp:2222 from 203.0.113.7/32; tcp from its own members)"]
    head = NodeRequest(
        name=head_name("ta"), role=Role.HEAD, slot=0, generation=1, spot=False, machine="m5.large"
    )
    results = provider.create([worker(1), head])
    assert [r.error for r in results] == [None, None]

    ec2 = boto3.client("ec2", region_name="us-east-1")
    instances = {
        next(t["Value"] for t in i["Tags"] if t["Key"] == "Name"): i
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
    }
    spot = instances["ta-w1-g1"]
    assert spot["InstanceLifecycle"] == "spot" and "InstanceLifecycle" not in instances["ta-head"]
    assert spot["KeyName"] == "fleet-ta" and spot["InstanceType"] == "g4dn.xlarge"
    tags = {t["Key"]: t["Value"] for t in spot["Tags"]}
    assert tags == {
        "team": "nlp",
        "fleet": "ta",
        "Name": "ta-w1-g1",
        "fleet-role": "worker",
        "fleet-slot": "1",
        "fleet-generation": "1",
    }
    volumes = ec2.describe_volumes(Filters=[{"Name": "tag:fleet", "Values": ["ta"]}])["Volumes"]
    roots = [v for v in volumes if {"Key": "fleet-role", "Value": "data"} not in v["Tags"]]
    assert len(roots) == 2 and {v["Size"] for v in roots} == {60, 100}
    [data] = [v for v in volumes if v not in roots]  # the head's data disk, attached, kept on termination
    assert data["Size"] == 100 and [(a["InstanceId"], a["Device"]) for a in data["Attachments"]] == [
        (instances["ta-head"]["InstanceId"], "/dev/sdf")]
    group = ec2.describe_security_groups(GroupNames=["fleet-ta-ssh"])["SecurityGroups"][0]
    internal = [p for p in group["IpPermissions"] if p["UserIdGroupPairs"]]
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"], [g["GroupId"] for g in p["UserIdGroupPairs"]])
            for p in internal] == [("tcp", 0, 65535, [group["GroupId"]])]  # the members reach each other
    assert [p for p in group["IpPermissions"] if not p["UserIdGroupPairs"]] == [
        {
            "IpProtocol": "tcp",
            "FromPort": 2222,
            "ToPort": 2222,
            "IpRanges": [{"CidrIp": "203.0.113.7/32", "Description": "fleet ssh"}],
            "Ipv6Ranges": [],
            "PrefixListIds": [],
            "UserIdGroupPairs": [],
        }
    ]
    assert spot["SecurityGroups"][0]["GroupName"] == "fleet-ta-ssh"
    # What moto ignores (SpotOptions) is checked as sent:
    params = provider.run_params(worker(1))
    assert params["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
            "MaxPrice": "0.42",
        },
    }
    assert [s["ResourceType"] for s in params["TagSpecifications"]] == ["instance", "volume"]
    assert "useradd --create-home" in params["UserData"]
    assert "InstanceMarketOptions" not in provider.run_params(head)


def test_list_maps_states_and_spot_interruptions(tmp_path, fleet_key, moto_in_process):
    provider = make(tmp_path, fleet_key[1])
    provider.prepare()
    provider.create([worker(1), worker(2)])
    nodes = {n.name: n for n in provider.list()}
    assert {n.state for n in nodes.values()} == {NodeState.RUNNING}
    assert nodes["ta-w1-g1"].internal_address and nodes["ta-w1-g1"].slot == 1

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    instance = ec2_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].get_instance(nodes["ta-w1-g1"].provider_id)
    instance.terminate()
    instance.state_reason = StateReason("Server.SpotInstanceTermination: x", "Server.SpotInstanceTermination")
    nodes = {n.name: n for n in provider.list()}
    assert nodes["ta-w1-g1"].state is NodeState.PREEMPTED
    assert nodes["ta-w1-g1"].reason == "Server.SpotInstanceTermination"
    # Deleted by fleet: gone from the list although EC2 still shows it terminated.
    assert provider.delete(["ta-w2-g1"]) and "ta-w2-g1" not in {n.name for n in provider.list()}


def test_missing_credentials_name_how_to_provide_them(tmp_path, fleet_key):
    provider = make(tmp_path, fleet_key[1])
    with pytest.raises(CredentialsError) as caught:
        provider.check()
    assert "aws configure" in str(caught.value) and "AWS_ACCESS_KEY_ID" in str(caught.value)
    spec = fleet_spec("ta", "aws", aws=aws_block(profile="nope"))
    with pytest.raises(CredentialsError, match="profile 'nope'"):
        AwsProvider(context(spec, tmp_path, fleet_key[1])).check()


def test_capacity_errors_move_to_the_next_zone(tmp_path, fleet_key, fake_ec2, loopback):
    fake_ec2.add_fault(Fault(action="RunInstances", code="InsufficientInstanceCapacity", zone="us-east-1a"))
    fake_ec2.add_fault(Fault(action="RunInstances", code="SpotMaxPriceTooLow", zone="us-east-1b"))
    provider = make(
        tmp_path, fleet_key[1], port=loopback[1], zones=["us-east-1a", "us-east-1b", "us-east-1c"]
    )
    provider.prepare()
    results = provider.create([worker(1), worker(2)])
    assert [r.error for r in results] == [None, None]
    assert {r.node.zone for r in results} == {"us-east-1c"}
    zones = [r["params"].get("Placement.AvailabilityZone") for r in fake_ec2.actions("RunInstances")]
    assert zones.count("us-east-1c") == 2


def test_a_request_is_placed_only_in_its_zones_and_its_result_names_the_stockouts(tmp_path, fleet_key, fake_ec2,
                                                                                  loopback):
    fake_ec2.add_fault(Fault(action="RunInstances", code="InsufficientInstanceCapacity", zone="us-east-1c"))
    provider = make(tmp_path, fleet_key[1], port=loopback[1], zones=["us-east-1a", "us-east-1b", "us-east-1c"])
    provider.prepare()
    [result] = provider.create([dataclasses.replace(worker(1), zones=("us-east-1c", "us-east-1b"))])
    assert result.error is None and result.node.zone == "us-east-1b"
    assert result.stockouts == ("us-east-1c",)
    zones = [r["params"].get("Placement.AvailabilityZone") for r in fake_ec2.actions("RunInstances")]
    assert list(dict.fromkeys(zones)) == ["us-east-1c", "us-east-1b"]  # (botocore retries a 500 itself)


@pytest.mark.parametrize("code", ["UnfulfillableCapacity", "MaxSpotInstanceCountExceeded"])
def test_all_zones_out_is_a_capacity_error(tmp_path, fleet_key, fake_ec2, loopback, code):
    fake_ec2.add_fault(Fault(action="RunInstances", code=code))
    provider = make(tmp_path, fleet_key[1], port=loopback[1])
    [result] = provider.create([worker(1)])
    assert isinstance(result.error, CapacityError) and code in str(result.error)
    assert len(fake_ec2.actions("RunInstances")) == 2


@pytest.mark.parametrize("code", ["VcpuLimitExceeded", "InstanceLimitExceeded"])
def test_limits_stop_with_a_clear_error(tmp_path, fleet_key, fake_ec2, loopback, code):
    fake_ec2.add_fault(
        Fault(action="RunInstances", code=code, message="You have requested more vCPU capacity")
    )
    provider = make(tmp_path, fleet_key[1], port=loopback[1])
    results = provider.create([worker(1), worker(2)])
    assert all(isinstance(r.error, QuotaError) and r.error.quota == code for r in results)
    assert code in str(results[0].error) and "Service Quotas" in str(results[0].error)
    assert all(
        r["params"].get("Placement.AvailabilityZone") == "us-east-1a"
        for r in fake_ec2.actions("RunInstances")
    )


def test_throttling_backs_off_and_retries(tmp_path, fleet_key, fake_ec2, loopback, sleeps: Sleeps):
    provider = make(tmp_path, fleet_key[1], port=loopback[1], sleep=sleeps)
    # botocore's standard mode tries each call API_ATTEMPTS times; what still fails goes
    # through our backoff (its sleeps are the injected ones), then botocore's again.
    fake_ec2.add_fault(Fault(action="RunInstances", code="RequestLimitExceeded", times=API_ATTEMPTS))
    [result] = provider.create([worker(1)])
    assert result.error is None and len(sleeps) == 1
    assert len(fake_ec2.actions("RunInstances")) == API_ATTEMPTS + 1
    fake_ec2.add_fault(Fault(action="DescribeInstances", code="RequestLimitExceeded", times=API_ATTEMPTS))
    assert [n.name for n in provider.list()] == ["ta-w1-g1"] and len(sleeps) == 2


def test_5xx_and_read_timeouts_are_ridden_out(tmp_path, fleet_key, fake_ec2, loopback, sleeps: Sleeps):
    provider = make(tmp_path, fleet_key[1], port=loopback[1], sleep=sleeps, api_timeout=1.0)
    fake_ec2.add_fault(Fault(action="DescribeInstances", code="InternalError", times=API_ATTEMPTS))
    assert provider.list() == [] and len(sleeps) == 1
    # Answers later than aws.api_timeout: botocore's ReadTimeoutError, which escaped as a
    # traceback; now botocore retries it, then our backoff does.
    calls = len(fake_ec2.actions("DescribeInstances"))
    fake_ec2.add_fault(Fault(action="DescribeInstances", code="-", delay=1.3, times=API_ATTEMPTS))
    assert provider.list() == [] and len(sleeps) == 2
    assert len(fake_ec2.actions("DescribeInstances")) == calls + API_ATTEMPTS + 1


def test_interruption_detected_through_the_server(tmp_path, fleet_key, fake_ec2, loopback):
    provider = make(tmp_path, fleet_key[1], port=loopback[1])
    provider.prepare()
    provider.create([worker(1), worker(2)])
    fake_ec2.wait_booted()
    node = next(n for n in provider.list() if n.name == "ta-w1-g1")
    assert is_test_local(node.address) and is_test_local(node.internal_address)
    fake_ec2.interrupt("ta-w1-g1")
    nodes = {n.name: n for n in provider.list()}
    assert nodes["ta-w1-g1"].state is NodeState.PREEMPTED
    assert nodes["ta-w1-g1"].reason == "Server.SpotInstanceTermination"
    assert nodes["ta-w2-g1"].state is NodeState.RUNNING
    assert fake_ec2.state()["backing_nodes"] == ["ta-w2-g1"]


def test_no_made_up_address_leaves_the_fake(tmp_path, fleet_key, fake_ec2, loopback):
    provider = make(tmp_path, fleet_key[1], port=loopback[1])
    provider.prepare()
    provider.create([worker(1)])
    fake_ec2.wait_booted()
    raw = boto3.client("ec2", region_name="us-east-1").describe_instances()
    assert raw["Reservations"]
    for reservation in raw["Reservations"]:
        for instance in reservation["Instances"]:
            assert is_test_local(instance["PublicIpAddress"]) and is_test_local(instance["PrivateIpAddress"])


def test_dry_run_plan_makes_no_mutating_call(tmp_path, fleet_key, fake_ec2, loopback):
    provider = make(tmp_path, fleet_key[1], port=loopback[1])
    planned = provider.plan(
        [worker(1), NodeRequest(name="ta-head", role=Role.HEAD, slot=0, generation=1, spot=False)]
    )
    assert planned[0].machine == "g4dn.xlarge" and planned[0].spot
    assert planned[0].price_source == "AWS spot price history" and planned[0].price_per_hour is not None
    assert planned[1].machine == "m5.large" and planned[1].price_source.startswith("bundled table")
    actions = [r["action"] for r in fake_ec2.actions()]
    assert actions == ["DescribeSpotPriceHistory"]
    assert not [a for a in actions if a.startswith(MUTATING_PREFIXES)]


def test_credentials_never_appear_in_errors_or_output(tmp_path, fleet_key, fake_ec2, loopback, capsys):
    fake_ec2.add_fault(
        Fault(action="RunInstances", code="AuthFailure", message="AWS was not able to validate")
    )
    provider = make(tmp_path, fleet_key[1], port=loopback[1])
    [result] = provider.create([worker(1)])
    assert isinstance(result.error, CredentialsError)
    text = str(result.error) + repr(result.error) + capsys.readouterr().out
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text


def test_destroy_all_after_a_killed_up_leaves_nothing(tmp_path, fleet_key, fake_ec2, loopback):
    spec = fleet_spec("ta", "aws", ssh_port=loopback[1], workers={"count": 6}, aws=aws_block())
    kill_up_midway(
        spec, "fleet.providers.aws:AwsProvider", fleet_key[1], max_parallel=1,
        started=lambda: len(fake_ec2.actions("RunInstances")) >= 2,
    )
    time.sleep(0.5)  # a RunInstances already received completes at the server
    state = fake_ec2.state()
    assert state["key_pairs"] and state["security_groups"] and state["instances"]
    report = make(tmp_path, fleet_key[1], port=loopback[1]).destroy_all()
    assert report.errors == []
    state = fake_ec2.state()
    assert [i for i in state["instances"] if i["state"] != "terminated"] == []
    assert state["security_groups"] == [] and state["key_pairs"] == [] and state["backing_nodes"] == []


def test_up_copes_with_pending_instances_without_an_address(tmp_path, fleet_key, fake_ec2, loopback):
    """EC2 answers run_instances with pending instances that have no public address yet;
    `up` lists again until they have one, then sets them up and mounts."""
    from fleet.fleetops import Fleet

    fake_ec2.boot_delay = 1.5
    spec = fleet_spec("tp", "aws", ssh_port=loopback[1], workers={"count": 1}, aws=aws_block())
    spec = spec.model_copy(update={"ssh": spec.ssh.model_copy(update={"ready_timeout": 60, "key": str(fleet_key[0])})})
    created = []
    with Fleet(spec, tmp_path / "fleet.yaml") as fleet:
        original = fleet.provider.create

        def create(requests):
            results = original(requests)
            created.extend(r.node for r in results)
            return results

        fleet.provider.create = create  # type: ignore[method-assign]
        try:
            result = fleet.up()
            assert result.ok, result.failures
            assert created and all(n.state is NodeState.PENDING and not n.address for n in created), created
            assert sorted(n.name for n in result.nodes) == ["tp-head", "tp-w1-g1"]
            assert all(is_test_local(n.address) for n in result.nodes)
            mounted = fleet.exec([n for n in result.nodes if n.role is Role.WORKER], 'mountpoint -q "$FLEET_SHARED"')
            assert mounted.ok, mounted.results
        finally:
            fleet.down()
