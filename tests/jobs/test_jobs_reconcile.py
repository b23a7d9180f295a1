"""The one reconciler end to end, on one real local fleet (loopback: a new worker's
`setup:` reaches the head's sshd to break the head's export on purpose): two vanished
slots in one pass, a replacement whose export fails, a worker preempted under `fleet
watch` after `fleet run --detach`, a stopped head and a deleted head.

The tests run in order on the module's fleet; each leaves it whole for the next."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator

import psutil
import pytest
from jobs_fleet import LocalFleet, check_outputs, computed_items, counted_job, finish_fleet, wait_for

from fleet.fleetops import Fleet
from fleet.model import Node, Role
from fleet.monitor import Monitor
from fleet.spec.loader import load_fleet_spec

pytestmark = pytest.mark.slow


class FakeClock:
    def __init__(self, t: float = 2_000_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    root = tmp_path_factory.mktemp("reconcile")
    switch = root / "freeze-head"
    # A new node's setup: while `switch` names the head's sshd, end its sessions and
    # stop its listener, so that the head's export (the next step) cannot reach it.
    freeze = (f'if [ -f {switch} ]; then L=$(cat {switch}); rm -f {switch}; '
              'for c in $(pgrep -P "$L"); do kill -KILL "$c"; done; kill -STOP "$L"; fi')
    fleet = LocalFleet(root, workers=2, isolation="loopback",
                       monitor={"backoff": 5, "grace": 30},
                       extra={"setup": [freeze], "ssh": {"connect_timeout": 3}})
    try:
        fleet.up()
        yield fleet
    finally:
        with contextlib.suppress(Exception):
            os.kill(fleet.sshd_pid(f"{fleet.name}-head"), signal.SIGCONT)
        finish_fleet(fleet)


@pytest.fixture
def handle(local: LocalFleet) -> Iterator[Fleet]:
    with Fleet(load_fleet_spec(local.spec_path), local.spec_path) as fleet:
        yield fleet


def _workers(fleet: Fleet) -> list[str]:
    return sorted(n.name for n in fleet.alive() if n.role == Role.WORKER)


def _sees_shared(fleet: Fleet, names: list[str]) -> dict[str, str]:
    """What each named node reads in the shared directory's probe.txt."""
    nodes = [n for n in fleet.alive() if n.name in names]
    result = fleet.exec(nodes, 'cat "$FLEET_SHARED/probe.txt"')
    return {name: result.results[name].stdout.strip() or result.results[name].stderr.strip() for name in names}


def test_two_vanished_slots_in_one_pass_are_both_replaced(local: LocalFleet, handle: Fleet) -> None:
    lost = [local.worker(1), local.worker(2)]
    handle.provider.delete(lost)  # gone from the provider's list, not deleted by fleet
    report = Monitor(handle, clock=FakeClock()).reconcile_once()
    assert report.replaced == {local.worker(1): local.worker(1, 2), local.worker(2): local.worker(2, 2)}
    assert sorted(report.lost) == lost
    assert _workers(handle) == [local.worker(1, 2), local.worker(2, 2)]
    (local.shared / "probe.txt").write_text("vanished")
    assert _sees_shared(handle, _workers(handle)) == dict.fromkeys(_workers(handle), "vanished")


def test_a_replacement_whose_export_fails_is_retried_and_ends_mounted(local: LocalFleet, handle: Fleet) -> None:
    given: list[str] = []
    clock = FakeClock()
    monitor = Monitor(handle, clock=clock, on_replaced=lambda new, alive: given.extend(n.name for n in new))
    head = f"{local.name}-head"
    listener = local.sshd_pid(head)
    (local.root / "freeze-head").write_text(str(listener))
    handle.preempt(local.worker(1, 2))
    try:
        report = monitor.reconcile_once()
        new = local.worker(1, 3)
        # The export failed: the new worker is kept (its own steps went well), not mounted.
        assert report.replaced == {} and new in report.failed and head in report.failed[new]
        assert psutil.Process(listener).status() == psutil.STATUS_STOPPED
        record = handle.state.node(new)
        assert record is not None and not record.gone and record.step == "setup_done" and record.failures == 1
        assert new in _workers(handle) and given == []
    finally:
        os.kill(listener, signal.SIGCONT)
    clock.advance(2)  # within the back-off: nothing
    assert monitor.reconcile_once().brought_forward == []
    clock.advance(4)
    report = monitor.reconcile_once()
    assert new in report.brought_forward and new in given
    record = handle.state.node(new)
    assert record is not None and record.step == "mounted" and record.failures == 0
    (local.shared / "probe.txt").write_text("export retried")
    assert _sees_shared(handle, [new])[new] == "export retried"
    assert [e.node for e in handle.state.events() if e.kind == "brought_forward"].count(new) == 1


def _working(fleet: Fleet, node: str, job: str) -> bool:
    return any(e.kind == "working" and e.node == node and job in e.detail for e in fleet.state.events())


def test_a_worker_preempted_under_fleet_watch_after_run_detach_gets_the_job(local: LocalFleet, handle: Fleet) -> None:
    counts = local.root / "counts-detach"
    counts.mkdir()
    job = counted_job("detached", 60, counts, delay_s=0.05, chunk_size=10, lease_seconds=5)
    path = local.write_job(job)
    assert local.cli("run", str(path), "--detach").returncode == 0
    victim = local.worker(2, 2)
    wait_for(lambda: computed_items(counts) > 0, 60, "the job computing")
    assert local.cli("preempt", victim).returncode == 0
    watched = local.cli("watch", "--passes", "1", timeout=240)
    assert watched.returncode == 0, watched.stderr
    new = local.worker(2, 3)
    assert f"{new} replaced" in watched.stdout, watched.stdout
    assert _working(handle, new, "detached"), "the replacement did not get the detached job"
    # Following it now (`fleet run` again) ends it: every output once, temporaries of the
    # preempted writer swept; nothing recomputed beyond the chunk the preempted worker held.
    followed = local.cli("run", str(path), "--json", timeout=240)
    assert followed.returncode == 0, followed.stderr
    assert check_outputs(local, job) == 60
    assert computed_items(counts) - 60 <= 10


def _outputs(local: LocalFleet, job: str) -> int:
    try:
        return len([p for p in (local.shared / f"out-{job}").iterdir() if not p.name.startswith(".")])
    except OSError:  # no head, so no shared directory, yet
        return 0


def test_a_stopped_head_is_started_and_keeps_its_data(local: LocalFleet, handle: Fleet) -> None:
    head = f"{local.name}-head"
    (local.shared / "keep.txt").write_text("kept")
    handle.provider.stop([head])  # as GCE host maintenance does to a non-spot head
    given: list[Node] = []
    report = Monitor(handle, clock=FakeClock(),
                     on_replaced=lambda new, alive: given.extend(new)).reconcile_once()
    assert report.started == [head] and report.replaced == {}
    assert head not in [e.node for e in handle.state.events() if e.kind == "deleted"]
    assert (local.shared / "keep.txt").read_text() == "kept"
    workers = _workers(handle)
    assert set(workers) <= {n.name for n in given}, "the workers did not remount the started head"
    (local.shared / "probe.txt").write_text("head started")
    assert _sees_shared(handle, workers) == dict.fromkeys(workers, "head started")


def test_a_deleted_head_is_replaced_its_data_reattached_and_the_job_resumes(local: LocalFleet,
                                                                         handle: Fleet) -> None:
    head = f"{local.name}-head"
    counts = local.root / "counts-head"
    counts.mkdir()
    job = counted_job("headloss", 80, counts, delay_s=0.05, chunk_size=10, lease_seconds=5)
    path = local.write_job(job)
    assert local.cli("run", str(path), "--detach").returncode == 0
    wait_for(lambda: computed_items(counts) >= 20, 60, "the job computing")
    claims = local.job_dir("headloss") / "claims"
    in_flight = len([p for p in claims.iterdir() if not p.name.startswith(".")])
    # Lost: deleted outside fleet (or a reclaimed spot head). A monitor pass during the
    # delete (any `fleet` process of this fleet) sees the head gone, never stopped.
    handle.provider.delete([head])
    watch = local.popen("watch")
    try:
        wait_for(lambda: _outputs(local, "headloss") == 80, 180, "the job to finish on the new head")
    finally:
        watch.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            watch.wait(timeout=30)
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    events = handle.state.events()
    assert any(e.kind == "replaced" and e.node == head for e in events), [(e.kind, e.node) for e in events][-20:]
    followed = local.cli("run", str(path), "--json", timeout=240)  # settles it, sweeps temporaries
    assert followed.returncode == 0, followed.stderr
    assert check_outputs(local, job) == 80
    # Nothing recomputed beyond the chunks the workers held (claimed) when the head went.
    assert computed_items(counts) - 80 <= min(in_flight, 2 * 2) * 10
    # Every worker remounted the new head.
    (local.shared / "probe.txt").write_text("new head")
    workers = _workers(handle)
    assert _sees_shared(handle, workers) == dict.fromkeys(workers, "new head")
