"""The monitor's decisions, one `reconcile_once` at a time, against a real local fleet
and an injected clock (no real waiting for grace periods or back-off delays)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from jobs_fleet import LocalFleet

from fleet.fleetops import Fleet
from fleet.monitor import Monitor
from fleet.spec.loader import load_fleet_spec


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def open_fleet() -> Iterator:
    opened: list[Fleet] = []

    def open_(local: LocalFleet) -> Fleet:
        fleet = Fleet(load_fleet_spec(local.spec_path), local.spec_path)
        opened.append(fleet)
        return fleet

    yield open_
    for fleet in opened:
        fleet.close()


def _kinds(fleet: Fleet, kind: str) -> list[str | None]:
    return [e.node for e in fleet.state.events() if e.kind == kind]


def _worker_names(fleet: Fleet) -> list[str]:
    return sorted(n.name for n in fleet.alive() if n.role.value == "worker")


def test_an_unreachable_worker_is_replaced_only_after_the_grace_period(make_fleet, open_fleet) -> None:
    local = make_fleet(workers=2, monitor={"grace": 30}, extra={"ssh": {"connect_timeout": 2}})
    fleet = open_fleet(local)
    clock = FakeClock()
    monitor = Monitor(fleet, clock=clock)
    assert monitor.reconcile_once().replaced == {}
    victim = local.worker(1)
    sshd_pid = local.sshd_pid(victim)
    # The node's sshd and its sessions (the monitor's pooled connection among them) stop
    # answering; for the provider the node still runs.
    frozen = [sshd_pid, *(p.pid for p in psutil.Process(sshd_pid).children(recursive=True))]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        first = monitor.reconcile_once()
        assert first.replaced == {} and first.lost == []
        clock.advance(29)
        second = monitor.reconcile_once()
        assert second.replaced == {} and second.lost == []
        assert _kinds(fleet, "requested") == [] or local.worker(1, 2) not in _kinds(fleet, "requested")
        clock.advance(2)
        third = monitor.reconcile_once()
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert third.lost == [victim]
    assert third.replaced == {victim: local.worker(1, 2)}
    assert victim in _kinds(fleet, "unreachable")
    assert local.worker(1, 2) in _kinds(fleet, "replaced")
    assert _worker_names(fleet) == [local.worker(1, 2), local.worker(2)]
    # The new node is set up and mounted: it sees the head's shared dir.
    probe = local.shared / "probe.txt"
    probe.write_text("from the head")
    result = fleet.exec([n for n in fleet.alive() if n.name == local.worker(1, 2)], 'cat "$FLEET_SHARED/probe.txt"')
    assert result.results[local.worker(1, 2)].stdout.strip() == "from the head"
    # Healthy nodes were not disturbed.
    assert local.worker(2) not in _kinds(fleet, "deleted")


def test_replacements_stop_at_max_replacements_with_one_event(make_fleet, open_fleet) -> None:
    local = make_fleet(workers=2, monitor={"max_replacements": 1})
    fleet = open_fleet(local)
    monitor = Monitor(fleet, clock=FakeClock())
    fleet.preempt(local.worker(1))
    report = monitor.reconcile_once()
    assert report.replaced == {local.worker(1): local.worker(1, 2)} and not report.exhausted
    fleet.preempt(local.worker(2))
    report = monitor.reconcile_once()
    assert report.replaced == {} and report.exhausted and report.lost == [local.worker(2)]
    assert local.worker(2) in _kinds(fleet, "preempted")
    again = monitor.reconcile_once()
    assert again.replaced == {} and again.lost == []
    exhausted = [e for e in fleet.state.events() if e.kind == "replacements_exhausted"]
    assert len(exhausted) == 1 and "max_replacements=1" in exhausted[0].detail
    assert _worker_names(fleet) == [local.worker(1, 2)]
    assert local.worker(2, 2) not in _kinds(fleet, "requested")


def test_a_failing_replacement_backs_off_doubling(make_fleet, open_fleet, tmp_path: Path) -> None:
    switch = tmp_path / "replacements-fail"
    # Loopback on purpose: the setup of new nodes reads a switch file of this machine's,
    # which an isolated node cannot see; the back-off is the monitor's, whatever the nodes.
    local = make_fleet(workers=1, monitor={"backoff": 5}, extra={"setup": [f"test ! -e {switch}"]},
                       isolation="loopback")
    fleet = open_fleet(local)
    clock = FakeClock()
    monitor = Monitor(fleet, clock=clock)
    switch.write_text("the setup of new nodes fails while this exists")
    fleet.preempt(local.worker(1))

    report = monitor.reconcile_once()
    assert list(report.failed) == [local.worker(1, 2)] and report.replaced == {}
    failed = [e for e in fleet.state.events() if e.kind == "replace_failed"]
    assert len(failed) == 1 and "next try in 5 s" in failed[0].detail
    assert _worker_names(fleet) == [], "a failed replacement was left running"

    clock.advance(4)  # within the back-off: no attempt
    assert monitor.reconcile_once().failed == {}
    assert len(_kinds(fleet, "requested")) == 1 + 2  # up's head + worker, the first attempt

    clock.advance(2)
    report = monitor.reconcile_once()
    assert list(report.failed) == [local.worker(1, 3)]
    failed = [e for e in fleet.state.events() if e.kind == "replace_failed"]
    assert "next try in 10 s" in failed[-1].detail

    clock.advance(9)
    assert monitor.reconcile_once().failed == {}
    switch.unlink()
    clock.advance(2)
    report = monitor.reconcile_once()
    assert report.replaced == {"(vanished)": local.worker(1, 4)} or list(report.replaced.values()) == [local.worker(1, 4)]
    assert _worker_names(fleet) == [local.worker(1, 4)]
    # Success resets the back-off: the slot's node of record has no failure left.
    record = fleet.state.node(local.worker(1, 4))
    assert record is not None and record.failures == 0 and record.retry_at is None and record.step == "mounted"
