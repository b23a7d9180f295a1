"""The worker as real processes: several workers on one job, SIGKILL, SIGTERM, the CLI."""

from __future__ import annotations

import json
import os
import signal
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


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_several_workers_one_output_per_input_no_chunk_done_twice(
    shared: Path, tmp_path: Path, workers: int
) -> None:
    inputs = write_files(shared / "corpus", 400)
    job = make_job(
        shared,
        "multi",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"delay_s": 0.05},
            "inputs": "corpus/**/*.txt",
            "outputs": "out",
            "chunk_size": 10,
            "batch_size": 5,
            "max_wait_ms": 1,
        },
    )
    assert run_cli(str(job), "--init").returncode == 0
    procs = [start_worker(job, "--node", f"w{i}", log=tmp_path / f"w{i}.log") for i in range(workers)]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            kill_group(p, signal.SIGKILL)
    assert codes == [0] * workers, [(tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(workers)]
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)
    assert done_chunk_counts(job) == {c: 1 for c in chunk_ids(job)}
    assert sorted(os.listdir(job / "done")) == chunk_ids(job)
    nodes_with_work = {r["node"] for r in metric_lines(job) if r["kind"] == "chunk"}
    assert len(nodes_with_work) >= 2, "the workers should have shared the job"


@pytest.mark.slow
def test_sigkill_mid_chunk_leaves_no_partial_output_and_chunk_is_taken_over(
    shared: Path, tmp_path: Path
) -> None:
    inputs = write_files(shared / "corpus", 60, text=lambda i: f"item {i} " * 200)
    job = make_job(
        shared,
        "kill",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"delay_s": 0.1},
            "inputs": "corpus/**/*.txt",
            "outputs": "out",
            "chunk_size": 30,
            "batch_size": 2,
            "prefetch": 1,
            "lease_seconds": 2,
            "heartbeat_seconds": 0.4,
        },
    )
    victim = start_worker(job, "--node", "victim", log=tmp_path / "victim.log")
    try:
        wait_for(lambda: len(visible_files(shared / "out")) >= 6, 60, "the victim to write some outputs")
        kill_group(victim, signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        kill_group(victim, signal.SIGKILL)
    held = [n for n in os.listdir(job / "claims") if not n.startswith(".")]
    assert held, "the killed worker's claim should still be there"
    assert not [c for c in held if (job / "done" / c).exists()]
    partial = visible_files(shared / "out")
    for out in partial:  # every visible output is complete and correct
        src = shared / "corpus" / str(out.relative_to(shared / "out"))[: -len(".sha256")]
        assert out.read_text() == __import__("hashlib").sha256(src.read_bytes()).hexdigest() + "\n"
    started = time.monotonic()
    assert run_cli(str(job), "--node", "rescuer", timeout=120).returncode == 0
    assert time.monotonic() - started >= 0.5
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)
    lines = [r for r in metric_lines(job) if r["kind"] == "chunk" and r["node"] == "rescuer"]
    taken = [r for r in lines if r["chunk"] in held]
    assert taken and all(r["resumed"] and r["outcome"] == "done" for r in taken)
    assert sum(r["skipped"] for r in taken) >= 1, "outputs written before the kill should be kept"
    assert done_chunk_counts(job) == {c: 1 for c in chunk_ids(job)}


@pytest.mark.slow
def test_sigterm_stops_within_seconds_and_exits_zero(shared: Path, tmp_path: Path) -> None:
    write_files(shared / "corpus", 400)
    job = make_job(
        shared,
        "term",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"delay_s": 0.05},
            "inputs": "corpus/**/*.txt",
            "outputs": "out",
            "chunk_size": 50,
            "batch_size": 4,
        },
    )
    proc = start_worker(job, "--node", "t1", log=tmp_path / "t1.log")
    try:
        wait_for(lambda: len(visible_files(shared / "out")) >= 10, 60, "some outputs")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        elapsed = time.monotonic() - sent
    finally:
        kill_group(proc, signal.SIGKILL)
    assert code == 0, (tmp_path / "t1.log").read_text()[-2000:]
    assert elapsed < 6, f"took {elapsed:.1f}s to stop"
    assert [n for n in os.listdir(job / "claims") if not n.startswith(".")] == []
    stop = [r for r in metric_lines(job) if r["kind"] == "stop"][-1]
    assert stop["reason"] == "signal"
    status = json.loads(run_cli(str(job), "--status").stdout)
    assert status["done"] < 400 and status["claimed"] == 0


def test_processes_two_spawns_two_workers_each_with_its_share_of_the_cores(shared: Path, tmp_path: Path) -> None:
    inputs = write_files(shared / "corpus", 200)
    opened = tmp_path / "opened.txt"
    job = make_job(
        shared,
        "pp",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"delay_s": 0.02, "open_log": str(opened)},
            "inputs": "corpus/**/*.txt",
            "outputs": "out",
            "chunk_size": 10,
            "batch_size": 5,
        },
    )
    result = run_cli(str(job), "--node", "box", "--processes", "2")
    assert result.returncode == 0, result.stderr
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)
    assert sorted(p.name for p in (job / "metrics").iterdir()) == ["box.worker0.jsonl", "box.worker1.jsonl"]
    assert done_chunk_counts(job) == {c: 1 for c in chunk_ids(job)}
    # Two CPU processes on one machine: torch's pool in each is half the cores, not all of them.
    threads = [line.split()[1] for line in opened.read_text().splitlines()]
    assert threads == [str(max(1, len(os.sched_getaffinity(0)) // 2))] * 2, threads


def test_init_status_and_node_name_from_environment(shared: Path) -> None:
    write_files(shared / "corpus", 25)
    job = make_job(
        shared,
        "cli",
        {"handler": "checksum", "inputs": "corpus/**/*.txt", "outputs": "out", "chunk_size": 10},
    )
    before = json.loads(run_cli(str(job), "--status").stdout)
    assert before["frozen"] is False and before["total"] is None
    init = run_cli(str(job), "--init")
    assert init.returncode == 0 and json.loads(init.stdout) == {"chunks": 3, "total": 25, "mode": "files"}
    assert run_cli(str(job), "--init").stdout == init.stdout  # idempotent
    status = json.loads(run_cli(str(job), "--status").stdout)
    assert status == {
        "total": 25,
        "done": 0,
        "failed": 0,
        "chunks": 3,
        "chunks_done": 0,
        "claimed": 0,
        "frozen": True,
    }
    assert run_cli(str(job), FLEET_NODE_NAME="from-env").returncode == 0
    assert [p.name for p in (job / "metrics").iterdir()] == ["from-env.worker0.jsonl"]
    final = json.loads(run_cli(str(job), "--status").stdout)
    assert (final["done"], final["chunks_done"]) == (25, 3)


@pytest.mark.parametrize(
    ("job_yaml", "message"),
    [
        ("worker: {handler: checksum, inputs: 'c/*', outputs: o, batch_size: many}\n", "worker.batch_size"),
        ("worker: {handler: checksum, inputs: 'nothing/*.txt', outputs: o}\n", "does not exist"),
        ("name: x\nrun: ./go\n", "no `worker:` section"),
        (": : :\n", "job.yaml"),
    ],
)
def test_fatal_errors_are_one_line_exit_2(shared: Path, job_yaml: str, message: str) -> None:
    job = shared / "jobs" / "bad"
    job.mkdir(parents=True)
    (job / "job.yaml").write_text(job_yaml)
    result = run_cli(str(job), "--node", "n")
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_missing_job_directory(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path / "nope"))
    assert result.returncode == 2 and "no such job directory" in result.stderr


def test_fleet_worker_console_script(shared: Path) -> None:
    import shutil
    import subprocess
    import sys

    script = Path(sys.executable).parent / "fleet-worker"
    if not script.exists():
        script = Path(shutil.which("fleet-worker") or "/nonexistent")
    if not script.exists():
        pytest.skip("the package is not installed (no fleet-worker console script)")
    write_files(shared / "corpus", 5)
    job = make_job(shared, "script", {"handler": "checksum", "inputs": "corpus/**/*.txt", "outputs": "out"})
    result = subprocess.run(
        [str(script), str(job), "--node", "s"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (
        json.loads(
            subprocess.run(
                [str(script), str(job), "--status"], capture_output=True, text=True, timeout=60, check=False
            ).stdout
        )["done"]
        == 5
    )
