"""`fleet run` ends when nothing can finish the job, and rides out what can be ridden out,
on one real local fleet (loopback: the tests signal node processes by their host pid):

- a job whose setup fails on every node ends with exit 1 and the nodes' errors;
- a launcher killed with SIGKILL on a live node is restarted (its heartbeat went stale)
  and the job completes with every output right;
- `Monitor.stop()` interrupts a pass that waits for SSH on a frozen head;
- with the head gone for good, `fleet run` stops within its grace with a clear message.

The tests share the fleet in this order (the last one kills the head)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
import yaml
from jobs_fleet import LocalFleet, check_outputs, counted_job, finish_fleet, summary_of, wait_for

from fleet.fleetops import Fleet
from fleet.monitor import Monitor
from fleet.spec.loader import load_fleet_spec
from fleet.worker.protocol import STALE_S


@pytest.fixture(scope="module")
def fault_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    fleet = LocalFleet(tmp_path_factory.mktemp("faults"), workers=2, monitor={"interval": 1, "grace": 4},
                       extra={"ssh": {"connect_timeout": 5}}, isolation="loopback")
    try:
        fleet.up()
        yield fleet
    finally:
        finish_fleet(fleet)


def _events(fleet: LocalFleet, kind: str) -> list[dict]:
    return [e for e in fleet.events() if e["kind"] == kind]


def test_a_job_whose_setup_fails_everywhere_ends_with_exit_1_and_the_error(fault_fleet: LocalFleet) -> None:
    job = {"name": "nosetup", "nodes": [fault_fleet.worker(1)], "retries": 1,
           "setup": ["echo 'the setup is broken' >&2", "exit 3"], "run": "echo never"}
    started = time.monotonic()
    # No --timeout: before, this printed "0/1 items ... 0 working" forever.
    result = fault_fleet.cli("run", str(fault_fleet.write_job(job)), timeout=90)
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    assert "exited with 3" in result.stderr and "the setup is broken" in result.stderr
    assert "Traceback" not in result.stderr
    tries = [e for e in _events(fault_fleet, "job_setup_failed") if e["node"] == fault_fleet.worker(1)]
    assert [e["detail"].split(":")[0] for e in tries] == ["attempt 1 of 2", "attempt 2 of 2"]
    jobs = json.loads(fault_fleet.cli("jobs", "--json", check=True).stdout)
    assert [j["status"] for j in jobs if j["name"] == "nosetup"] == ["failed"]
    # The node's failure is on the shared directory, where any follower reads it.
    assert (fault_fleet.job_dir("nosetup") / "status" / f"{fault_fleet.worker(1)}.exit").read_text().strip() == "3"


def test_a_launcher_killed_with_sigkill_is_restarted_and_the_job_completes(fault_fleet: LocalFleet, tmp_path) -> None:
    counts = tmp_path / "counts"
    counts.mkdir()
    worker = fault_fleet.worker(1)
    job = counted_job("relaunch", 120, counts, delay_s=0.05, chunk_size=20, lease_seconds=4,
                      nodes=[worker])
    with fault_fleet.running("run", str(fault_fleet.write_job(job)), "--json") as run:
        pid_file = fault_fleet.job_dir("relaunch") / "pids" / f"{worker}.pid"
        wait_for(_running(run, lambda: pid_file.exists() and any(counts.glob("*.count"))), 90, "the job to compute")
        launcher = int(pid_file.read_text())
        group = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == launcher]
        # The whole group, SIGKILL, as the OOM killer leaves it: no exit status, no release.
        os.killpg(launcher, signal.SIGKILL)
        assert group, "the launcher's process group was not found"
        stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stdout + stderr
    summary = summary_of((run.returncode, stdout, stderr))
    assert summary["done"] == 120 and summary["failed"] == 0
    assert check_outputs(fault_fleet, job) == 120
    restarted = _events(fault_fleet, "launcher_restarted")
    assert [e["node"] for e in restarted] == [worker]
    assert f"{STALE_S:g} s" in restarted[0]["detail"]
    assert int((fault_fleet.job_dir("relaunch") / "pids" / f"{worker}.pid").read_text()) != launcher


def _running(run, condition):
    """`condition`, failing at once with the run's output when `fleet run` ended early."""
    def check() -> bool:
        if run.poll() is not None:
            stdout, stderr = run.communicate()
            raise AssertionError(f"fleet run ended early ({run.returncode}):\n{stdout}\n{stderr}")
        return condition()
    return check


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_monitor_stop_interrupts_a_pass_waiting_for_ssh(fault_fleet: LocalFleet) -> None:
    fleet = Fleet(load_fleet_spec(fault_fleet.spec_path), fault_fleet.spec_path)
    session = fleet.session(threading.Event())
    monitor = Monitor(session)
    head_sshd = fault_fleet.sshd_pid(f"{fault_fleet.name}-head")
    try:
        fleet.preempt(fault_fleet.worker(2))
        # The head's sshd stops answering: the pass's bring-up waits for its SSH (up to
        # ssh.ready_timeout, 300 s) before it could mount the new worker.
        os.kill(head_sshd, signal.SIGSTOP)
        thread = threading.Thread(target=monitor.run, daemon=True)
        thread.start()
        wait_for(lambda: any(e.kind == "requested" and e.node == fault_fleet.worker(2, 2)
                             for e in fleet.state.events()), 60, "the replacement to be requested")
        time.sleep(2)  # in wait_ready by now (a local node is created in well under a second)
        asked = time.monotonic()
        monitor.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "stop() did not interrupt the pass"
        assert time.monotonic() - asked < 15
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(head_sshd, signal.SIGCONT)
        session.close()
        fleet.close()


def test_stopping_fleet_run_cuts_short_its_monitor_pass(fault_fleet: LocalFleet) -> None:
    # `fleet run`'s monitor runs on a session of its own: Ctrl-C ends the pass that runs a
    # slow fleet `setup:` on a replacement at once, instead of holding `fleet run` for the
    # monitor thread's join (60 s). The setup runs only on nodes not set up yet.
    before = fault_fleet.spec_path.read_text()
    fault_fleet.spec_path.write_text(yaml.safe_dump({**fault_fleet.spec, "setup": ["sleep 90"]}, sort_keys=False))
    job = {"name": "cutshort", "nodes": [fault_fleet.worker(1)], "run": "sleep 120"}
    try:
        with fault_fleet.running("run", str(fault_fleet.write_job(job))) as run:
            with Fleet(load_fleet_spec(fault_fleet.spec_path), fault_fleet.spec_path) as fleet:
                pid_file = fault_fleet.job_dir("cutshort") / "pids" / f"{fault_fleet.worker(1)}.pid"
                wait_for(_running(run, pid_file.exists), 90, "the job to start")
                victim = max((n for n in fleet.observe() if n.slot == 2), key=lambda n: n.generation)
                fleet.preempt(victim.name)
                replacement = fault_fleet.worker(2, victim.generation + 1)
                wait_for(_running(run, lambda: any(e.kind == "runtime" and e.node == replacement
                                                   for e in fleet.state.events())), 60, "the replacement's setup")
            time.sleep(2)  # in its setup now
            asked = time.monotonic()
            run.send_signal(signal.SIGINT)
            stdout, stderr = run.communicate(timeout=120)
            took = time.monotonic() - asked
    finally:
        fault_fleet.spec_path.write_text(before)
        fault_fleet.cli("cancel", "cutshort")
    assert run.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert took < 20, f"fleet run took {took:.1f} s to stop"


def test_a_run_job_rides_out_a_restarted_head(fault_fleet: LocalFleet) -> None:
    # The monitor starts the stopped head again and hands the workers over: the launcher
    # it stops there (it holds the old mount) must not count as the node's end.
    head = f"{fault_fleet.name}-head"
    job = {"name": "restarted", "nodes": [fault_fleet.worker(1)], "run": "sleep 15"}
    with fault_fleet.running("run", str(fault_fleet.write_job(job))) as run:
        pid_file = fault_fleet.job_dir("restarted") / "pids" / f"{fault_fleet.worker(1)}.pid"
        wait_for(_running(run, pid_file.exists), 90, "the job to start")
        time.sleep(1)
        assert fault_fleet.cli("preempt", head).returncode == 0
        stdout, stderr = run.communicate(timeout=150)
    assert run.returncode == 0, stdout + stderr
    assert any(e["kind"] == "started" and e["node"] == head for e in fault_fleet.events())


def test_fleet_run_stops_within_its_grace_when_the_head_is_gone(fault_fleet: LocalFleet) -> None:
    # Gone for good: the machine is deleted (its data disk stays) and the monitor may not
    # create another (max_replacements: 0), so nothing brings a head back. The last test of
    # the module: the fleet is left headless.
    fault_fleet.spec["monitor"] = {**fault_fleet.spec.get("monitor", {}), "max_replacements": 0}
    fault_fleet.spec_path.write_text(yaml.safe_dump(fault_fleet.spec, sort_keys=False))
    job = {"name": "headless", "nodes": [fault_fleet.worker(1)], "run": "sleep 120"}
    errors_before = len(_events(fault_fleet, "progress_error"))
    with fault_fleet.running("run", str(fault_fleet.write_job(job))) as run:
        pid_file = fault_fleet.job_dir("headless") / "pids" / f"{fault_fleet.worker(1)}.pid"
        wait_for(_running(run, pid_file.exists), 90, "the job to start")
        time.sleep(1)
        with Fleet(load_fleet_spec(fault_fleet.spec_path), fault_fleet.spec_path) as fleet:
            # `fleet run`'s monitor lists it meanwhile: gone, never a stopped head to start.
            assert fleet.provider.delete([f"{fault_fleet.name}-head"])
        gone = time.monotonic()
        stdout, stderr = run.communicate(timeout=90)
    assert run.returncode == 1, stdout + stderr
    assert time.monotonic() - gone < 60  # grace 4 s, plus a progress read that times out
    assert "could not be read" in stderr and "monitor.grace" in stderr and "Traceback" not in stderr, stdout + stderr
    assert len(_events(fault_fleet, "progress_error")) == errors_before + 1  # one per outage, not one a second
