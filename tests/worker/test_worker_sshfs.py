"""The work queue over real sshfs mounts of a real OpenSSH server on loopback.

Each mount is a separate sshfs process with its own caches, like a separate node; the
shared directory lives on the "head" (a local directory served by the head's sshd).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from worker_helpers import (
    assert_checksum_outputs,
    chunk_ids,
    done_chunk_counts,
    kill_group,
    make_job,
    metric_lines,
    run_cli,
    start_worker,
    visible_files,
    wait_for,
    write_files,
)

from fleet.worker.claims import ChunkQueue
from fleet.worker.layout import JobLayout

pytestmark = pytest.mark.slow


def test_two_nodes_over_sshfs_one_output_per_input(shared: Path, sshfs_mount, tmp_path: Path) -> None:
    inputs = write_files(shared / "corpus", 300)
    job = make_job(
        shared,
        "ssh2",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"delay_s": 0.04},
            "inputs": "corpus/**/*.txt",
            "outputs": "out",
            "chunk_size": 10,
            "batch_size": 5,
        },
    )
    mounts = [sshfs_mount(shared, f"node{i}") for i in range(2)]
    assert run_cli(str(mounts[0] / "jobs" / "ssh2"), "--init").returncode == 0
    procs = [
        start_worker(m / "jobs" / "ssh2", "--node", f"node{i}", log=tmp_path / f"n{i}.log")
        for i, m in enumerate(mounts)
    ]
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            kill_group(p, signal.SIGKILL)
    assert codes == [0, 0], [(tmp_path / f"n{i}.log").read_text()[-1500:] for i in range(2)]
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)
    assert done_chunk_counts(job) == {c: 1 for c in chunk_ids(job)}
    assert {r["node"] for r in metric_lines(job) if r["kind"] == "chunk"} == {"node0", "node1"}


def test_sigkill_over_sshfs_chunk_taken_over_by_another_node(
    shared: Path, sshfs_mount, tmp_path: Path
) -> None:
    inputs = write_files(shared / "corpus", 40)
    job = make_job(
        shared,
        "sshkill",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"delay_s": 0.1},
            "inputs": "corpus/**/*.txt",
            "outputs": "out",
            "chunk_size": 20,
            "batch_size": 2,
            "prefetch": 1,
            "lease_seconds": 3,
            "heartbeat_seconds": 0.5,
        },
    )
    victim_mount, rescuer_mount = sshfs_mount(shared, "victim"), sshfs_mount(shared, "rescuer")
    victim = start_worker(victim_mount / "jobs" / "sshkill", "--node", "victim", log=tmp_path / "v.log")
    try:
        wait_for(lambda: len(visible_files(shared / "out")) >= 4, 60, "outputs from the victim")
        kill_group(victim, signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        kill_group(victim, signal.SIGKILL)
    held = [n for n in os.listdir(job / "claims") if not n.startswith(".")]
    assert held
    result = run_cli(str(rescuer_mount / "jobs" / "sshkill"), "--node", "rescuer", timeout=120)
    assert result.returncode == 0, result.stderr
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)
    rescued = [
        r for r in metric_lines(job) if r["kind"] == "chunk" and r["node"] == "rescuer" and r["chunk"] in held
    ]
    assert rescued and all(r["resumed"] and r["outcome"] == "done" for r in rescued)
    assert done_chunk_counts(job) == {c: 1 for c in chunk_ids(job)}


def test_stale_claim_race_across_mounts_has_one_winner(shared: Path, sshfs_mount) -> None:
    layout_local = JobLayout.at(shared / "jobs" / "race")
    layout_local.make_dirs()
    ids = ["c000000"]
    dead = ChunkQueue(layout_local, ids, node="dead", proc=0, lease_seconds=60)
    claim = dead.next_claim()
    os.utime(layout_local.claims / claim.chunk, (time.time() - 600, time.time() - 600))
    mounts = [sshfs_mount(shared, f"r{i}") for i in range(3)]
    winners: list[str] = []
    barrier = threading.Barrier(len(mounts))

    def taker(i: int, mount: Path) -> None:
        queue = ChunkQueue(JobLayout.at(mount / "jobs" / "race"), ids, node=f"r{i}", proc=0, lease_seconds=60)
        barrier.wait()
        won = queue.next_claim()
        if won is not None:
            winners.append(f"r{i}")

    threads = [threading.Thread(target=taker, args=(i, m)) for i, m in enumerate(mounts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(winners) == 1
    assert f'"node":"{winners[0]}"' in (layout_local.claims / "c000000").read_text()


def test_a_live_claim_that_the_mount_cache_shows_stale_is_not_taken(shared: Path, sshfs_mount) -> None:
    """sshfs answers stat from its directory cache (up to 20 s old): a heartbeat the
    cache has not seen yet must not let another node take a live claim."""
    layout_local = JobLayout.at(shared / "jobs" / "cached")
    layout_local.make_dirs()
    ids = ["c000000"]
    holder = ChunkQueue(layout_local, ids, node="holder", proc=0, lease_seconds=10)
    claim = holder.next_claim()
    os.utime(layout_local.claims / claim.chunk, (time.time() - 600, time.time() - 600))
    mount = sshfs_mount(shared, "observer")
    observer = ChunkQueue(JobLayout.at(mount / "jobs" / "cached"), ids, node="observer", proc=0, lease_seconds=10)
    observer.refresh()  # the listing puts the old mtime in the mount's cache
    assert time.time() - os.stat(mount / "jobs" / "cached" / "claims" / claim.chunk).st_mtime > 500
    assert holder.heartbeat() == []  # the holder is alive: its lease is fresh on the server
    assert observer.next_claim() is None
    assert holder.still_ours(claim)
    assert os.listdir(layout_local.claims) == [claim.chunk]  # no probe or lock left behind
