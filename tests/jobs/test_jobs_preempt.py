"""Preemptions in the middle of a job, on a real local fleet: `fleet preempt` kills a
worker node (its sshd, every process started on it, its mount) while `fleet run`
follows the job; the monitor inside `fleet run` replaces the node and gives the new one
the job. The test plugin counts every item it computes (in files outside the nodes, so
the count survives the kill): the exact number of items computed twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs_fleet import (
    LocalFleet,
    check_outputs,
    computed_items,
    counted_job,
    done_chunks,
    metrics_batch_items,
    summary_of,
    wait_for,
)

ITEMS = 300
CHUNK = 20


@pytest.fixture(scope="module")
def chaos_fleet(tmp_path_factory: pytest.TempPathFactory):
    from jobs_fleet import finish_fleet

    # Loopback on purpose: the plug-in's count files must survive the SIGKILL of the node
    # that writes them, so they live in a directory of this machine's, which an isolated
    # node cannot reach (by design). The isolated preemption itself (every process and
    # mount of the node gone at once) is tested in tests/fleet/test_fleet_isolated.py.
    fleet = LocalFleet(tmp_path_factory.mktemp("chaos"), workers=3, monitor={"interval": 1, "grace": 4},
                       isolation="loopback")
    try:
        fleet.up()
        yield fleet
    finally:
        finish_fleet(fleet)


def _run_and_preempt(fleet: LocalFleet, job: dict, victim: str, *preempt_args: str) -> tuple[dict, str]:
    """`fleet run --json` the job; once a few chunks are done, preempt `victim`."""
    path = fleet.write_job(job)
    run = fleet.popen("run", str(path), "--json", "--timeout", "150")
    try:
        wait_for(lambda: done_chunks(fleet, job["name"]) >= 3 or run.poll() is not None, 60, "3 chunks done")
        assert run.poll() is None, "the job ended before the preemption"
        preempted = fleet.cli("preempt", *preempt_args, victim)
        assert preempted.returncode == 0, preempted.stderr
        stdout, stderr = run.communicate(timeout=170)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
            fleet.cli("cancel", job["name"])
    assert run.returncode == 0, stderr
    return summary_of((run.returncode, stdout, stderr)), stderr


def _failures(fleet: LocalFleet, job: str) -> str:
    return "".join(p.read_text() for p in (fleet.job_dir(job) / "failures").glob("*.jsonl"))


def _generation_of_slot(fleet: LocalFleet, slot: int) -> list[int]:
    return [int(n["labels"]["fleet-generation"]) for n in fleet.status()
            if n["labels"].get("fleet-slot") == str(slot) and n["labels"].get("fleet-role") == "worker"]


def test_a_preempted_worker_is_replaced_and_the_job_finishes_by_itself(chaos_fleet: LocalFleet, tmp_path: Path) -> None:
    counts = tmp_path / "counts"
    counts.mkdir()
    job = counted_job("chaos", ITEMS, counts, delay_s=0.05, chunk_size=CHUNK, lease_seconds=5)
    victim = chaos_fleet.worker(1)
    summary, _ = _run_and_preempt(chaos_fleet, job, victim)
    assert summary["done"] == ITEMS and summary["failed"] == 0, (summary, _failures(chaos_fleet, "chaos"))
    assert summary["replacements"] == 1, summary
    assert check_outputs(chaos_fleet, job) == ITEMS

    # The replacement: slot 1's next generation, running; the old node is gone.
    status = chaos_fleet.cli("status", check=True).stdout
    assert chaos_fleet.worker(1, 2) in status and victim not in status
    assert _generation_of_slot(chaos_fleet, 1) == [2]
    events = chaos_fleet.events()
    kinds = {(e["kind"], e["node"]) for e in events}
    assert ("preempted", victim) in kinds
    assert ("replaced", chaos_fleet.worker(1, 2)) in kinds
    assert ("working", chaos_fleet.worker(1, 2)) in kinds
    replaced = next(e for e in events if e["kind"] == "replaced")
    assert victim in replaced["detail"]

    # Work lost with the node: at most the chunk it had in hand.
    recomputed = computed_items(counts) - ITEMS
    assert 0 <= recomputed <= CHUNK, recomputed
    # The worker's own metrics tell the same (they may miss the victim's last second).
    assert metrics_batch_items(chaos_fleet, "chaos") - ITEMS <= CHUNK


def test_with_a_notice_no_item_is_computed_twice(chaos_fleet: LocalFleet, tmp_path: Path) -> None:
    counts = tmp_path / "counts"
    counts.mkdir()
    items = 2 * ITEMS  # long enough to outlast the notice and the replacement
    job = counted_job("notice", items, counts, delay_s=0.05, chunk_size=CHUNK, lease_seconds=5)
    victim = chaos_fleet.worker(2)
    # The worker takes up to 3 s (its STOP_GRACE_S) to finish or release what it holds:
    # the notice leaves it that, and some margin on a loaded machine.
    summary, _ = _run_and_preempt(chaos_fleet, job, victim, "--notice", "6")
    assert summary["done"] == items, (summary, _failures(chaos_fleet, "notice"))
    assert check_outputs(chaos_fleet, job) == items
    assert computed_items(counts) == items, "items were computed twice despite the notice"
    log = (chaos_fleet.job_dir("notice") / "logs" / f"{victim}.log").read_text()
    assert "Traceback" not in log, log
    kinds = {(e["kind"], e["node"]) for e in chaos_fleet.events()}
    assert ("preempted", victim) in kinds and ("replaced", chaos_fleet.worker(2, 2)) in kinds


def test_fleet_run_again_resumes_a_job_whose_follower_died(chaos_fleet: LocalFleet, tmp_path: Path) -> None:
    """`fleet run --detach`, a preemption while nobody watches, then `fleet run` again:
    it replaces the lost node, gives it the job and follows the job to the end."""
    counts = tmp_path / "counts"
    counts.mkdir()
    items = 2 * ITEMS
    job = counted_job("detached", items, counts, delay_s=0.05, chunk_size=CHUNK, lease_seconds=5)
    path = chaos_fleet.write_job(job)
    assert chaos_fleet.cli("run", str(path), "--detach").returncode == 0
    try:
        wait_for(lambda: done_chunks(chaos_fleet, "detached") >= 3, 60, "3 chunks done")
        victim = chaos_fleet.worker(3)
        assert chaos_fleet.cli("preempt", victim).returncode == 0
        result = chaos_fleet.cli("run", str(path), "--json", "--timeout", "150")
    finally:
        chaos_fleet.cli("cancel", "detached")
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["done"] == items
    assert check_outputs(chaos_fleet, job) == items
    assert computed_items(counts) - items <= CHUNK
    assert _generation_of_slot(chaos_fleet, 3) == [2], chaos_fleet.cli("events").stdout

