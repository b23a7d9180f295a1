"""The reconciler's decisions (`fleet.reconcile.plan`), pure: observed nodes, records and
probes made up here, an injected clock, no SSH and no provider."""

from __future__ import annotations

import dataclasses

import pytest

from fleet.model import Node, NodeState, Role, head_name, worker_name
from fleet.reconcile import (
    BringForward,
    Create,
    Delete,
    Exhausted,
    Lost,
    Plan,
    Probe,
    Start,
    next_generation,
    plan,
)
from fleet.spec.models import FleetSpec
from fleet.state import NodeRecord

NOW = 1_000_000.0
FLEET = "rc"
HEAD = head_name(FLEET)


def spec(workers: int = 2, **monitor: float) -> FleetSpec:
    return FleetSpec.model_validate({"name": FLEET, "provider": "local", "workers": {"count": workers},
                                     "monitor": {"grace": 30, "backoff": 5, **monitor}})


def node(name: str, state: NodeState = NodeState.RUNNING, *, slot: int | None = None, generation: int = 1,
         spot: bool = False) -> Node:
    role = Role.HEAD if name == HEAD else Role.WORKER
    if slot is None:
        slot = 0 if role == Role.HEAD else int(name.split("-w")[1].split("-")[0])
    return Node(name=name, fleet=FLEET, role=role, state=state, slot=slot, generation=generation,
                address="127.0.0.1", port=2222, spot=spot, provider_id=f"id-{name}")


def record(of: Node | str, step: str | None = None, **fields: object) -> NodeRecord:
    if isinstance(of, str):
        of = node(of, slot=int(of.split("-w")[1].split("-")[0]) if of != HEAD else 0,
                  generation=int(of.rsplit("-g", 1)[1]) if of != HEAD else 1)
    base = {"name": of.name, "role": of.role.value, "slot": of.slot, "generation": of.generation, "state": of.state.value,
                "address": of.address, "port": of.port, "zone": "local", "spot": of.spot, "provider_id": of.provider_id,
                "setup_done": True, "mounted": of.role == Role.WORKER, "created_at": NOW - 100, "updated_at": NOW - 100,
                "gone": False, "step": step or ("exported" if of.role == Role.HEAD else "mounted")}
    return NodeRecord(**{**base, **fields})  # type: ignore[arg-type]


def w(slot: int, generation: int = 1) -> str:
    return worker_name(FLEET, slot, generation)


def healthy_fleet(workers: int = 2) -> tuple[list[Node], list[NodeRecord]]:
    nodes = [node(HEAD), *[node(w(s)) for s in range(1, workers + 1)]]
    return nodes, [record(n) for n in nodes]


def ok_probes(nodes: list[Node]) -> dict[str, Probe]:
    return {n.name: Probe(ssh=True, mounted=True if n.role == Role.WORKER else None) for n in nodes}


def creates(result: Plan) -> list[str]:
    return [c.request.name for c in result.of(Create)]


def forwards(result: Plan) -> list[str]:
    return [f.node.name for f in result.of(BringForward)]


def test_a_healthy_fleet_needs_nothing() -> None:
    nodes, records = healthy_fleet()
    assert plan(spec(), nodes, records, ok_probes(nodes), NOW).actions == []


def test_one_liveness_rule_unreachable_is_lost_only_after_the_grace_of_failing_probes() -> None:
    nodes, records = healthy_fleet()
    nodes[1] = dataclasses.replace(nodes[1], state=NodeState.UNREACHABLE)  # e.g. GCE REPAIRING
    probes = ok_probes(nodes) | {w(1): Probe(ssh=False)}
    within = [*records[:1], record(nodes[1], unreachable_since=NOW - 29), records[2]]
    assert plan(spec(), nodes, within, probes, NOW).actions == []
    past = [*records[:1], record(nodes[1], unreachable_since=NOW - 30), records[2]]
    result = plan(spec(), nodes, past, probes, NOW)
    assert [(a.name, a.kind) for a in result.of(Lost)] == [(w(1), "unreachable")]
    assert [d.node.name for d in result.of(Delete)] == [w(1)]
    assert creates(result) == [w(1, 2)] and result.of(Create)[0].replaces == (w(1),)
    # The same node and record with a probe that answers, or with no probe at all (`up`): alive.
    assert plan(spec(), nodes, past, ok_probes(nodes), NOW).of(Create) == []
    assert plan(spec(), nodes, past, None, NOW).of(Create) == []


def test_a_preempted_worker_is_replaced_by_the_next_generation_of_its_slot() -> None:
    nodes, records = healthy_fleet()
    nodes[2] = dataclasses.replace(nodes[2], state=NodeState.PREEMPTED, spot=True)
    # A generation recorded earlier (its record survives) counts: no name is ever reused.
    records.append(record(w(2, 3), gone=True, state="PREEMPTED"))
    result = plan(spec(), nodes, records, ok_probes(nodes), NOW)
    assert creates(result) == [w(2, 4)]
    assert [(a.name, a.kind) for a in result.of(Lost)] == [(w(2), "preempted")]
    assert next_generation(Role.WORKER, 2, nodes, records) == 4


def test_a_failed_replacement_backs_off_doubling_on_the_clock() -> None:
    nodes, records = healthy_fleet(1)
    nodes = nodes[:1]  # w1 vanished; its replacement g2 failed 5 s ago (retry at NOW)
    records = [records[0], record(w(1), gone=True), record(w(1, 2), gone=True, failures=1, retry_at=NOW)]
    assert plan(spec(1), nodes, records, ok_probes(nodes), NOW - 0.1).of(Create) == []
    again = plan(spec(1), nodes, records, ok_probes(nodes), NOW).of(Create)
    assert [c.request.name for c in again] == [w(1, 3)] and again[0].attempt == 2 and again[0].replacement
    # `up` is the user asking now: no back-off.
    assert creates(plan(spec(1), nodes, records, None, NOW - 0.1)) == [w(1, 3)]


def test_max_replacements_bounds_the_creates_of_a_pass_and_says_so() -> None:
    nodes, records = healthy_fleet(3)
    nodes = [nodes[0], nodes[1]]  # w2 and w3 vanished
    result = plan(spec(3), nodes, records, ok_probes(nodes), NOW, replacements_left=1)
    assert creates(result) == [w(2, 2)]
    assert len(result.of(Exhausted)) == 1 and "max_replacements" in result.of(Exhausted)[0].detail
    assert [a.name for a in result.of(Lost)] == [w(2), w(3)]


def test_two_vanished_slots_in_one_pass_are_both_replaced_each_naming_its_own() -> None:
    nodes, records = healthy_fleet(3)
    nodes = [nodes[0], nodes[2]]  # w1 and w3 gone from the provider's list
    result = plan(spec(3), nodes, records, ok_probes(nodes), NOW)
    assert creates(result) == [w(1, 2), w(3, 2)]
    assert [c.stands_for for c in result.of(Create)] == [w(1), w(3)]
    assert sorted(a.name for a in result.of(Lost)) == [w(1), w(3)]


ZONES = ["europe-west4-a", "europe-west4-b", "europe-west4-c"]


def cloud_spec(cloud: str = "gcp", workers: int = 2, cooldown: float = 300) -> FleetSpec:
    block = ({"project": "p", "zones": ZONES} if cloud == "gcp"
             else {"region": "eu-west-1", "ami": "ami-1", "zones": ["eu-west-1a"], "subnets": ZONES})
    return FleetSpec.model_validate({"name": FLEET, "provider": cloud, "workers": {"count": workers}, cloud: block,
                                     "monitor": {"grace": 30, "backoff": 5, "zone_cooldown": cooldown}})


@pytest.mark.parametrize("cloud", ["gcp", "aws"])
def test_a_zone_without_capacity_is_avoided_for_its_cooldown_then_tried_again(cloud: str) -> None:
    nodes, records = healthy_fleet()
    nodes[2] = dataclasses.replace(nodes[2], state=NodeState.PREEMPTED, spot=True)
    ran_out = {ZONES[0]: NOW - 10}  # a create found no capacity there 10 s ago
    result = plan(cloud_spec(cloud), nodes, records, ok_probes(nodes), NOW, stockouts=ran_out)
    assert creates(result) == [w(2, 2)]
    assert result.of(Create)[0].request.zones == (ZONES[1], ZONES[2])  # AWS: the subnets
    # The cool-down over, every zone again, in the spec's order (None: the provider's own).
    later = plan(cloud_spec(cloud), nodes, records, ok_probes(nodes), NOW + 290, stockouts=ran_out)
    assert [c.request.zones for c in later.of(Create)] == [None]
    # No cool-down: no zone is avoided.
    assert plan(cloud_spec(cloud, cooldown=0), nodes, records, ok_probes(nodes), NOW,
                stockouts=ran_out).of(Create)[0].request.zones is None


def test_with_every_zone_cooling_down_the_one_that_ran_out_longest_ago_comes_first() -> None:
    nodes, records = healthy_fleet()
    gone = nodes[1:]  # the head is lost too: its replacement avoids the zones the same way
    ran_out = {ZONES[0]: NOW - 5, ZONES[1]: NOW - 60, ZONES[2]: NOW - 30, "elsewhere-1": NOW - 1}
    result = plan(cloud_spec(), gone, records, ok_probes(gone), NOW, stockouts=ran_out)
    assert [(c.request.name, c.request.zones) for c in result.of(Create)] == [(HEAD, (ZONES[1], ZONES[2], ZONES[0]))]
    partly = plan(cloud_spec(), gone, records, ok_probes(gone), NOW, stockouts={ZONES[1]: NOW - 1})
    assert partly.of(Create)[0].request.zones == (ZONES[0], ZONES[2])
    # The local provider has no zones: nothing to avoid.
    assert plan(spec(), gone, records, ok_probes(gone), NOW, stockouts=ran_out).of(Create)[0].request.zones is None


@pytest.mark.parametrize("state", [NodeState.TERMINATED, NodeState.PREEMPTED])
def test_a_stopped_head_is_started_never_deleted(state: NodeState) -> None:
    nodes, records = healthy_fleet()
    nodes[0] = dataclasses.replace(nodes[0], state=state)  # GCE TERMINATED after host maintenance
    for probes in (ok_probes(nodes[1:]), None):  # the monitor and `up` alike
        result = plan(spec(), nodes, records, probes, NOW)
        assert [s.node.name for s in result.of(Start)] == [HEAD]
        assert result.of(Delete) == [] and creates(result) == []
        assert [(a.name, a.kind, a.gone) for a in result.of(Lost)] == [(HEAD, "stopped", False)]
        # The workers remount the head once it is back.
        assert set(forwards(result)) == {w(1), w(2)}
    # Once recorded as stopped, a start that failed backs off.
    stopped = [record(nodes[0], state=state.value, failures=1, retry_at=NOW + 5), *records[1:]]
    assert plan(spec(), nodes, stopped, ok_probes(nodes[1:]), NOW).actions == []


def test_a_lost_head_is_replaced_and_every_worker_remounts_it() -> None:
    nodes, records = healthy_fleet()
    gone = nodes[1:]  # deleted (or its spot VM reclaimed) outside fleet
    result = plan(spec(), gone, records, ok_probes(gone), NOW)
    assert creates(result) == [HEAD] and result.of(Create)[0].replacement
    assert [(a.name, a.kind) for a in result.of(Lost)] == [(HEAD, "terminated")]
    assert set(forwards(result)) == {w(1), w(2)}
    assert plan(spec(), gone, records, ok_probes(gone), NOW, replacements_left=0).of(Create) == []
    # A head that stops answering past the grace is lost too: deleted, then replaced.
    silent = [record(nodes[0], unreachable_since=NOW - 31), *records[1:]]
    result = plan(spec(), nodes, silent, ok_probes(nodes) | {HEAD: Probe(ssh=False)}, NOW)
    assert [d.node.name for d in result.of(Delete)] == [HEAD] and creates(result) == [HEAD]


def test_a_live_node_whose_record_is_behind_is_brought_forward() -> None:
    nodes, records = healthy_fleet()
    # w1: its export failed during its replacement (record stops at setup_done, backing off).
    behind = record(nodes[1], "setup_done", failed_step="setup_done", last_error="export failed",
                    failures=1, retry_at=NOW + 5)
    # w2: its create timed out after the VM existed (the record never saw it come up).
    created_late = record(nodes[2], "requested", gone=True, state="TERMINATED")
    records = [records[0], behind, created_late]
    early = plan(spec(), nodes, records, ok_probes(nodes), NOW)
    assert forwards(early) == [w(2)] and early.of(Create) == []
    result = plan(spec(), nodes, records, ok_probes(nodes), NOW + 5)
    assert forwards(result) == [w(1), w(2)] and result.of(Create) == [] and result.of(Delete) == []
    assert result.of(BringForward)[0].attempt == 2
    # Not while the head itself cannot be mounted.
    head_down = [record(nodes[0], "setup_done", failures=1, retry_at=NOW + 60), behind, created_late]
    assert plan(spec(), nodes, head_down, ok_probes(nodes), NOW + 5).actions == []


def test_a_worker_whose_mount_died_is_brought_forward() -> None:
    nodes, records = healthy_fleet()
    probes = ok_probes(nodes) | {w(2): Probe(ssh=True, mounted=False)}
    result = plan(spec(), nodes, records, probes, NOW)
    assert forwards(result) == [w(2)] and "mount" in result.of(BringForward)[0].reason


def test_up_brings_every_live_node_forward_and_creates_what_is_missing() -> None:
    nodes, records = healthy_fleet(3)
    result = plan(spec(3), nodes[:3], records[:3], None, NOW)
    assert forwards(result) == [HEAD, w(1), w(2)] and creates(result) == [w(3)]
    assert not result.of(Create)[0].replacement or result.of(Create)[0].replaces == ()
    fresh = plan(spec(2), [], [], None, NOW)
    assert creates(fresh) == [HEAD, w(1), w(2)] and not any(c.replacement for c in fresh.of(Create))


def test_an_existing_head_is_brought_up_never_started_or_replaced() -> None:
    existing = FleetSpec.model_validate({"name": FLEET, "provider": "local", "workers": {"count": 1},
                                         "head": {"host": "127.0.0.1", "host_key": "ssh-ed25519 AAAA"}})
    head = node(HEAD)
    result = plan(existing, [head], [], None, NOW)
    assert forwards(result) == [HEAD] and creates(result) == [w(1)]
    silent = plan(existing, [head, node(w(1))], [record(head, unreachable_since=NOW - 99), record(w(1))],
                  {HEAD: Probe(ssh=False), w(1): Probe(ssh=True, mounted=True)}, NOW)
    assert silent.of(Create) == [] and silent.of(Delete) == [] and silent.of(Start) == []
