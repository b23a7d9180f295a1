"""GCP provider against the fake Compute Engine: what is sent, zone failover, quota,
rate limits, preemption, credentials, dry-run, and cleanup after a killed `up`."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
from provider_helpers import USER, Sleeps, context, fleet_spec, gcp_block, is_test_local, kill_up_midway

from fleet.errors import CapacityError, CredentialsError, ProviderError, QuotaError
from fleet.model import Accelerator, NodeRequest, NodeState, Role, head_name, worker_name
from fleet.providers.gcp import GcpProvider

MUTATING = ("POST", "DELETE", "PATCH", "PUT")


def make(
    tmp_path: Path,
    key: str,
    fake: Any,
    port: int,
    *,
    sleep: Any = None,
    workers: dict[str, Any] | None = None,
    **gcp: Any,
) -> GcpProvider:
    spec = fleet_spec("tg", "gcp", ssh_port=port, workers=workers, gcp=gcp_block(fake, **gcp))
    return GcpProvider(
        context(spec, tmp_path / "state", key), sleep=sleep if sleep is not None else (lambda s: None)
    )


def worker(slot: int, *, gpu: bool = True, gen: int = 1) -> NodeRequest:
    return NodeRequest(
        name=worker_name("tg", slot, gen),
        role=Role.WORKER,
        slot=slot,
        generation=gen,
        spot=True,
        accelerators=Accelerator("nvidia-tesla-t4", 2) if gpu else None,
        disk_gb=50,
    )


def inserts(fake: Any) -> list[dict[str, Any]]:
    return fake.requests_matching("POST", r"/zones/[^/]+/instances$")


def test_spot_gpu_fields_labels_and_metadata_as_sent(tmp_path, fleet_key, fake_gce, loopback):
    provider = make(
        tmp_path,
        fleet_key[1],
        fake_gce,
        loopback[1],
        workers={"count": 1, "gcp": {"instance_termination_action": "STOP"}},
        labels={"team": "nlp"},
    )
    [result] = provider.create([worker(1)])
    assert result.error is None
    body = inserts(fake_gce)[0]["body"]
    assert body["scheduling"] == {
        "provisioningModel": "SPOT",
        "instanceTerminationAction": "STOP",
        "automaticRestart": False,
        "onHostMaintenance": "TERMINATE",
    }
    assert body["guestAccelerators"] == [
        {"acceleratorCount": 2, "acceleratorType": "zones/us-central1-a/acceleratorTypes/nvidia-tesla-t4"}
    ]
    assert body["labels"] == {
        "team": "nlp",
        "fleet": "tg",
        "fleet-role": "worker",
        "fleet-slot": "1",
        "fleet-generation": "1",
    }
    assert body["tags"] == {"items": ["fleet-tg"]}
    disk = body["disks"][0]
    assert disk["boot"] and disk["autoDelete"]
    assert int(disk["initializeParams"]["diskSizeGb"]) == 50
    assert disk["initializeParams"]["sourceImage"].startswith("projects/debian-cloud/")
    metadata = {item["key"]: item["value"] for item in body["metadata"]["items"]}
    assert metadata["ssh-keys"] == f"{USER}:{fleet_key[1]}"
    assert "useradd --create-home" in metadata["startup-script"]
    assert "sshfs" in metadata["startup-script"]


def test_head_is_on_demand_and_legacy_preemptible(tmp_path, fleet_key, fake_gce, loopback):
    provider = make(
        tmp_path,
        fleet_key[1],
        fake_gce,
        loopback[1],
        workers={"count": 1, "gcp": {"provisioning_model": "PREEMPTIBLE"}},
    )
    head = NodeRequest(name=head_name("tg"), role=Role.HEAD, slot=0, generation=1, spot=False)
    results = provider.create([head, worker(1, gpu=False)])
    assert [r.error for r in results] == [None, None]
    bodies = {r["body"]["name"]: r["body"] for r in inserts(fake_gce)}
    assert bodies["tg-head"].get("scheduling", {}) == {}
    assert bodies["tg-w1-g1"]["scheduling"]["preemptible"] is True
    nodes = {n.name: n for n in provider.list()}
    assert nodes["tg-head"].role is Role.HEAD and not nodes["tg-head"].spot
    assert nodes["tg-w1-g1"].spot


def test_firewall_opens_only_the_ssh_port_to_the_given_ranges(tmp_path, fleet_key, fake_gce, loopback):
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1], source_ranges=["203.0.113.7/32"])
    created = provider.prepare()
    assert created and "fleet-tg-ssh" in created[0]
    rule = fake_gce.firewalls["fleet-tg-ssh"]
    assert rule["sourceRanges"] == ["203.0.113.7/32"]
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": [str(loopback[1])]}]
    assert rule["targetTags"] == ["fleet-tg"]
    assert provider.prepare() == []  # idempotent


def test_default_source_range_is_the_detected_caller_address(tmp_path, fleet_key, fake_gce, loopback):
    spec = fleet_spec("tg", "gcp", ssh_port=loopback[1], gcp={**gcp_block(fake_gce), "source_ranges": None})
    provider = GcpProvider(context(spec, tmp_path, fleet_key[1]), detect_address=lambda: "198.51.100.23")
    provider.prepare()
    assert fake_gce.firewalls["fleet-tg-ssh"]["sourceRanges"] == ["198.51.100.23/32"]


def test_firewall_follows_the_caller_to_a_new_address(tmp_path, fleet_key, fake_gce, loopback):
    spec = fleet_spec("tg", "gcp", ssh_port=loopback[1], gcp={**gcp_block(fake_gce), "source_ranges": None})
    GcpProvider(context(spec, tmp_path, fleet_key[1]), detect_address=lambda: "198.51.100.23").prepare()
    moved = GcpProvider(context(spec, tmp_path, fleet_key[1]), detect_address=lambda: "198.51.100.99")
    changed = moved.prepare()
    assert changed and "198.51.100.99/32 only" in changed[0] and "was 198.51.100.23/32" in changed[0]
    rule = fake_gce.firewalls["fleet-tg-ssh"]
    assert rule["sourceRanges"] == ["198.51.100.99/32"]  # the old address no longer admitted
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": [str(loopback[1])]}]  # the rest unchanged
    assert moved.prepare() == []


def test_capacity_error_moves_to_the_next_zone_and_remembers_it(tmp_path, fleet_key, fake_gce, loopback):
    fake_gce.set_no_capacity("us-central1-a")
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1], zones=["us-central1-a", "us-central1-b"])
    results = provider.create([worker(slot, gpu=False) for slot in (1, 2, 3)])
    assert [r.error for r in results] == [None, None, None]
    assert {r.node.zone for r in results} == {"us-central1-b"}
    zones = [r["path"].split("/zones/")[1].split("/")[0] for r in inserts(fake_gce)]
    # Every request in flight may hit the empty zone once; after that it is skipped.
    assert zones.count("us-central1-a") <= 3 and zones.count("us-central1-b") == 3


def test_a_request_is_placed_only_in_its_zones_and_its_result_names_the_stockouts(tmp_path, fleet_key, fake_gce,
                                                                                  loopback):
    # The reconciler's zone cool-down: it asks for the zones not cooling down, in order.
    fake_gce.set_no_capacity("us-central1-b")
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1],
                    zones=["us-central1-a", "us-central1-b", "us-central1-c"])
    request = dataclasses.replace(worker(1, gpu=False), zones=("us-central1-b", "us-central1-c"))
    [result] = provider.create([request])
    assert result.error is None and result.node.zone == "us-central1-c"
    assert result.stockouts == ("us-central1-b",)
    assert [r["path"].split("/zones/")[1].split("/")[0] for r in inserts(fake_gce)] == ["us-central1-b",
                                                                                         "us-central1-c"]
    [failed] = provider.create([dataclasses.replace(worker(2, gpu=False), zones=("us-central1-b",))])
    assert isinstance(failed.error, CapacityError) and failed.stockouts == ("us-central1-b",)


def test_every_zone_without_capacity_is_a_capacity_error(tmp_path, fleet_key, fake_gce, loopback):
    for zone in ("us-central1-a", "us-central1-b"):
        fake_gce.set_no_capacity(zone)
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1])
    [result] = provider.create([worker(1)])
    assert isinstance(result.error, CapacityError)
    assert "us-central1-a, us-central1-b" in str(result.error)
    assert "ZONE_RESOURCE_POOL_EXHAUSTED" not in result.error.message or "no capacity" in result.error.message


def test_quota_error_names_the_quota_and_stops(tmp_path, fleet_key, fake_gce, loopback):
    fake_gce.set_quota_exceeded("GPUS_ALL_REGIONS")
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1])
    results = provider.create([worker(1), worker(2)])
    errors = [r.error for r in results]
    assert all(isinstance(e, QuotaError) for e in errors)
    assert errors[0].quota == "GPUS_ALL_REGIONS"
    assert "GPUS_ALL_REGIONS" in str(errors[0]) and "every region" in str(errors[0])
    # A quota error is not a capacity error: the second zone is never tried.
    assert all("/zones/us-central1-b/" not in r["path"] for r in inserts(fake_gce))


def test_regional_quota_is_named(tmp_path, fleet_key, fake_gce, loopback):
    fake_gce.set_quota_exceeded("NVIDIA_T4_GPUS", zone="us-central1-a")
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1])
    [result] = provider.create([worker(1)])
    assert isinstance(result.error, QuotaError) and result.error.quota == "NVIDIA_T4_GPUS"
    assert "NVIDIA_T4_GPUS" in str(result.error)


def test_rate_limits_back_off_and_retry(tmp_path, fleet_key, fake_gce, loopback, sleeps: Sleeps):
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1], sleep=sleeps)
    fake_gce.set_rate_limit(3, path_contains="/instances")
    [result] = provider.create([worker(1, gpu=False)])
    assert result.error is None
    assert len(sleeps) == 3 and all(0 < s <= 32 for s in sleeps)
    assert sleeps[2] > sleeps[0] * 1.0  # grows (jitter keeps each within [d/2, d])
    fake_gce.set_rate_limit(2, path_contains="/aggregated/")
    assert [n.name for n in provider.list()] == ["tg-w1-g1"]
    assert len(sleeps) == 5


def test_a_503_is_transient_except_an_inserts_exhausted_zone(tmp_path, fleet_key, fake_gce, loopback, sleeps: Sleeps):
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1], sleep=sleeps, zones=["us-central1-a", "us-central1-b"])
    # A list() that meets 503s and a 500 retries them (a 503 was "no capacity" before, for a list).
    fake_gce.set_http_fault(3, status=503, path_contains="/aggregated/")
    assert provider.list() == [] and len(sleeps) == 3
    fake_gce.set_http_fault(1, status=500, path_contains="/aggregated/")
    assert provider.list() == [] and len(sleeps) == 4
    # Only an insert's 503 that says the zone is out of resources moves to the next zone.
    fake_gce.set_http_fault(1, status=503, path_contains="/zones/us-central1-a/instances",
                            message="The zone 'us-central1-a' does not have enough resources available")
    [result] = provider.create([worker(1, gpu=False)])
    assert result.error is None and len(sleeps) == 4
    assert {i["name"]: i["zone"] for i in fake_gce.state()["instances"]} == {"tg-w1-g1": "us-central1-b"}


def test_a_read_timeout_is_ridden_out(tmp_path, fleet_key, fake_gce, loopback, sleeps: Sleeps):
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1], sleep=sleeps, api_timeout=1.0)
    fake_gce.set_http_fault(1, delay=1.5, path_contains="/aggregated/")
    assert provider.list() == [] and len(sleeps) == 1


def test_after_the_retry_budget_a_clear_error(tmp_path, fleet_key, fake_gce, loopback, sleeps: Sleeps):
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1], sleep=sleeps)
    fake_gce.set_http_fault(1000, status=503, path_contains="/aggregated/")
    with pytest.raises(ProviderError) as caught:
        provider.list()
    assert type(caught.value) is ProviderError
    assert "503" in caught.value.message and "still failing after 8 attempt(s)" in caught.value.message
    assert len(sleeps) == 7


def test_preemption_detected_and_confirmed_by_the_operation(tmp_path, fleet_key, fake_gce, loopback):
    provider = make(
        tmp_path,
        fleet_key[1],
        fake_gce,
        loopback[1],
        workers={"count": 2, "gcp": {"instance_termination_action": "STOP"}},
    )
    provider.create([worker(1, gpu=False), worker(2, gpu=False)])
    fake_gce.preempt("tg-w1-g1")
    nodes = {n.name: n for n in provider.list()}
    assert nodes["tg-w1-g1"].state is NodeState.PREEMPTED
    assert nodes["tg-w1-g1"].reason == "compute.instances.preempted"
    assert nodes["tg-w2-g1"].state is NodeState.RUNNING
    assert not fake_gce.backing_node("tg-w1-g1").is_running()
    # A user stop of a Spot VM (no preempted operation) is still PREEMPTED, but unconfirmed.
    provider.preempt("tg-w2-g1")
    nodes = {n.name: n for n in provider.list()}
    assert nodes["tg-w2-g1"].state is NodeState.PREEMPTED and nodes["tg-w2-g1"].reason == "spot VM TERMINATED"


def test_non_spot_terminated_is_terminated(tmp_path, fleet_key, fake_gce, loopback):
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1])
    provider.create([NodeRequest(name="tg-head", role=Role.HEAD, slot=0, generation=1, spot=False)])
    provider.preempt("tg-head")  # an on-demand VM is stopped
    [node] = provider.list()
    assert node.state is NodeState.TERMINATED


def test_list_is_one_call_independent_of_node_count(tmp_path, fleet_key, fake_gce, loopback):
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1])
    provider.create([worker(slot, gpu=False) for slot in range(1, 6)])
    before = len(fake_gce.requests)
    assert len(provider.list()) == 5
    calls = fake_gce.requests[before:]
    assert [(c["method"], c["path"].split("/")[-1]) for c in calls] == [("GET", "instances")]
    assert calls[0]["query"]["filter"] == 'labels.fleet = "tg"'


def test_dry_run_plan_makes_no_mutating_call(tmp_path, fleet_key, fake_gce, loopback):
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1])
    planned = provider.plan(
        [worker(1), NodeRequest(name="tg-head", role=Role.HEAD, slot=0, generation=1, spot=False)]
    )
    assert (
        planned[0].spot
        and planned[0].machine == "n1-standard-4"
        and planned[0].accelerators == "2x nvidia-tesla-t4"
    )
    assert planned[0].price_per_hour == pytest.approx(0.04 + 2 * 0.14)
    assert planned[0].price_source.startswith("bundled table 20")
    assert planned[1].price_per_hour == pytest.approx(0.134)
    assert [r for r in fake_gce.requests if r["method"] in MUTATING] == []


def test_missing_credentials_name_how_to_provide_them(tmp_path, fleet_key):
    spec = fleet_spec(
        "tg", "gcp", gcp={"project": "p", "zones": ["us-central1-a"], "source_ranges": ["127.0.0.0/8"]}
    )
    provider = GcpProvider(context(spec, tmp_path, fleet_key[1]))
    with pytest.raises(CredentialsError) as caught:
        provider.check()
    assert "gcloud auth application-default login" in str(caught.value)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(caught.value)


def test_anonymous_credentials_only_for_a_loopback_http_endpoint(tmp_path, fleet_key):
    from fleet.providers.gcp import is_loopback_http, resolve_credentials

    assert is_loopback_http("http://127.0.0.1:8080") and is_loopback_http("http://localhost:1")
    assert not is_loopback_http("https://127.0.0.1:8080") and not is_loopback_http("http://10.0.0.1:80")
    assert type(resolve_credentials("http://127.0.0.1:9")).__name__ == "AnonymousCredentials"
    with pytest.raises(CredentialsError):
        resolve_credentials("http://compute.internal.example:80")


def test_destroy_all_removes_instances_in_any_state_leftover_disks_and_the_rule(
    tmp_path, fleet_key, fake_gce, loopback
):
    provider = make(
        tmp_path,
        fleet_key[1],
        fake_gce,
        loopback[1],
        workers={"count": 2, "gcp": {"instance_termination_action": "STOP"}},
    )
    provider.prepare()
    provider.create([worker(1, gpu=False), worker(2, gpu=False)])
    fake_gce.preempt("tg-w1-g1")  # TERMINATED, disk kept
    # A disk left behind by an instance that is gone (auto-delete off, e.g. by hand).
    fake_gce.disks[("us-central1-a", "tg-orphan")] = {
        "name": "tg-orphan",
        "zone": "zones/us-central1-a",
        "labels": {"fleet": "tg"},
        "users": [],
        "selfLink": "https://www.googleapis.com/compute/v1/projects/test-project/zones/us-central1-a/disks/tg-orphan",
    }
    report = GcpProvider(provider.context, sleep=lambda s: None).destroy_all()  # no memory of `create`
    assert report.errors == []
    assert {line.split(" (")[0] for line in report.deleted} == {
        "instance tg-w1-g1",
        "instance tg-w2-g1",
        "disk tg-orphan",
        "firewall rule fleet-tg-ssh",
        "firewall rule fleet-tg-internal",
    }
    state = fake_gce.state()
    assert state["instances"] == [] and state["disks"] == [] and state["firewalls"] == []
    assert state["backing_nodes"] == []


def test_destroy_all_after_a_killed_up_leaves_nothing(tmp_path, fleet_key, fake_gce, loopback):
    """`up` killed in the middle of creating, and no local state: `down` finds it all."""
    spec = fleet_spec("tg", "gcp", ssh_port=loopback[1], workers={"count": 6}, gcp=gcp_block(fake_gce))
    kill_up_midway(
        spec, "fleet.providers.gcp:GcpProvider", fleet_key[1], max_parallel=2,
        started=lambda: len(fake_gce.state()["instances"]) >= 2,
    )
    while fake_gce.state()["in_flight"]:
        time.sleep(0.05)
    assert fake_gce.firewalls and fake_gce.instances  # something was left behind
    report = make(tmp_path, fleet_key[1], fake_gce, loopback[1]).destroy_all()
    assert report.errors == []
    state = fake_gce.state()
    assert state["instances"] == [] and state["firewalls"] == [] and state["disks"] == []
    assert state["backing_nodes"] == []


def test_an_instance_stages_before_it_runs_and_gets_its_external_address_once_booted(
    tmp_path, fleet_key, fake_gce, loopback
):
    import threading

    fake_gce.boot_delay = 1.0
    provider = make(tmp_path, fleet_key[1], fake_gce, loopback[1], workers={"count": 1})
    provider.prepare()
    seen: list[tuple[str, str | None]] = []
    creating = threading.Thread(target=lambda: provider.create([worker(1, gpu=False)]))
    creating.start()
    deadline = time.monotonic() + 60
    while creating.is_alive() or (time.monotonic() < deadline and (not seen or seen[-1][0] != "RUNNING")):
        resource = fake_gce.instance("tg-w1-g1")
        if resource is not None:
            configs = resource.get("networkInterfaces", [{}])[0].get("accessConfigs", [{}])
            state = (resource["status"], configs[0].get("natIP") if configs else None)
            if not seen or seen[-1] != state:
                seen.append(state)
        time.sleep(0.02)
    creating.join()
    statuses = [status for status, _ in seen]
    assert "STAGING" in statuses and statuses[-1] == "RUNNING", seen
    assert all(nat is None for status, nat in seen if status != "RUNNING"), seen
    assert is_test_local(seen[-1][1]), seen
    node = next(n for n in provider.list() if n.name == "tg-w1-g1")
    assert node.state is NodeState.RUNNING and node.address == seen[-1][1]
