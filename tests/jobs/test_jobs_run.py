"""`fleet run` / `jobs` / `logs` / `cancel` on a real local fleet (head + 3 workers):
spec errors, a checksum job to the end, re-runs, `run:` jobs with retries, cancel and
resume."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from jobs_fleet import (
    LocalFleet,
    check_outputs,
    computed_items,
    counted_job,
    done_chunks,
    node_processes_matching,
    plain_job,
    summary_of,
    wait_for,
)


def test_a_bad_job_spec_exits_2_with_file_and_line_and_starts_nothing(module_fleet: LocalFleet) -> None:
    bad = module_fleet.root / "bad.yaml"
    bad.write_text("name: badjob\nworker:\n  handler: checksum\n  inputs: data/*.txt\n  chunk_size: -3\n")
    result = module_fleet.cli("run", str(bad), "--json")
    assert result.returncode == 2, result.stderr
    assert f"{bad}:5" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    unknown = module_fleet.root / "unknown.yaml"
    unknown.write_text("name: badjob\nrun: echo hi\nretires: 2\n")
    result = module_fleet.cli("run", str(unknown))
    assert result.returncode == 2 and f"{unknown}:3" in result.stderr, result.stderr
    assert not (module_fleet.shared / "jobs" / "badjob").exists()
    assert "badjob" not in module_fleet.cli("jobs", "--json", check=True).stdout


def test_a_checksum_job_runs_to_completion_and_a_second_run_does_nothing(module_fleet: LocalFleet) -> None:
    job = plain_job("sums", 300, chunk_size=25)
    path = module_fleet.write_job(job)
    result = module_fleet.cli("run", str(path), "--json", "--timeout", "120")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert set(summary) == {"job", "total", "done", "failed", "replacements", "seconds"}
    assert summary["job"] == "sums" and summary["total"] == 300 and summary["done"] == 300
    assert summary["failed"] == 0 and summary["replacements"] == 0 and summary["seconds"] > 0
    assert check_outputs(module_fleet, job) == 300
    assert done_chunks(module_fleet, "sums") == 12
    # Every worker took part, and each wrote its own log on the shared dir.
    logs = sorted(p.name for p in (module_fleet.job_dir("sums") / "logs").iterdir())
    assert logs == [f"{module_fleet.worker(slot)}.log" for slot in (1, 2, 3)]

    jobs = json.loads(module_fleet.cli("jobs", "--json", check=True).stdout)
    record = next(j for j in jobs if j["name"] == "sums")
    assert record["status"] == "finished" and record["summary"]["done"] == 300
    table = module_fleet.cli("jobs", check=True).stdout
    assert "sums" in table and "finished" in table

    node = module_fleet.worker(2)
    (module_fleet.job_dir("sums") / "logs" / f"{node}.log").open("a").write("a line only this node wrote\n")
    shown = module_fleet.cli("logs", "sums", check=True).stdout
    assert f"{node} | a line only this node wrote" in shown
    only = module_fleet.cli("logs", "sums", "--node", module_fleet.worker(1), check=True).stdout
    assert "a line only this node wrote" not in only

    outputs = module_fleet.shared / "out-sums"
    before = {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()}
    again = module_fleet.cli("run", str(path), "--json", "--timeout", "60")
    assert again.returncode == 0, again.stderr
    assert summary_of(again)["done"] == 300
    after = {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()}
    assert after == before, "a second run of a finished job wrote outputs"


def test_a_run_job_sees_its_fleet_variables(module_fleet: LocalFleet) -> None:
    job = {"name": "envs", "run": 'printf "%s %s %s %s %s\\n" "$FLEET_NODE_NAME" "$FLEET_NODE_RANK" '
           '"$FLEET_NUM_NODES" "$FLEET_SHARED" "$FLEET_JOB" > "$FLEET_SHARED/env-$FLEET_NODE_NAME.txt"'}
    result = module_fleet.cli("run", str(module_fleet.write_job(job)), "--json", "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["done"] == 3
    seen = {}
    for slot in (1, 2, 3):
        name = module_fleet.worker(slot)
        words = (module_fleet.shared / f"env-{name}.txt").read_text().split()
        assert words[0] == name and words[2] == "3" and words[4] == "envs", words
        # FLEET_SHARED is where this node sees the shared dir: the file written through
        # it is the one on the head.
        assert words[3].startswith(module_fleet.home_on_node(name)), words
        seen[int(words[1])] = name
    assert sorted(seen) == [0, 1, 2]


# Fails on its first `n - 1` starts on each node, then succeeds: the count lives in the
# node's home, which the node's restarts share.
def _flaky(name: str, fail_times: int) -> str:
    counter = f'"$HOME/{name}.count"'
    return (f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {counter}; "
            f'echo "attempt $n"; [ "$n" -gt {fail_times} ]')


def test_a_run_job_is_restarted_up_to_retries_times(module_fleet: LocalFleet) -> None:
    job = {"name": "flaky", "retries": 2, "run": _flaky("flaky", 2)}
    result = module_fleet.cli("run", str(module_fleet.write_job(job)), "--json", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary_of(result)["done"] == 3
    for slot in (1, 2, 3):
        assert (module_fleet.node_home(module_fleet.worker(slot)) / "flaky.count").read_text().strip() == "3"
    assert "attempt 1 of 2: restarting after exit code 1" in module_fleet.cli("logs", "flaky", check=True).stdout


def test_a_failing_run_job_without_retries_reports_failure(module_fleet: LocalFleet) -> None:
    job = {"name": "fragile", "retries": 0, "run": _flaky("fragile", 2)}
    result = module_fleet.cli("run", str(module_fleet.write_job(job)), "--json", "--timeout", "60")
    assert result.returncode == 1, result.stdout + result.stderr
    summary = summary_of(result)
    assert summary["done"] == 0 and summary["failed"] == 3
    for slot in (1, 2, 3):
        assert (module_fleet.node_home(module_fleet.worker(slot)) / "fragile.count").read_text().strip() == "1"
    jobs = json.loads(module_fleet.cli("jobs", "--json", check=True).stdout)
    assert next(j for j in jobs if j["name"] == "fragile")["status"] == "failed"


def test_cancel_stops_every_process_and_a_later_run_resumes(module_fleet: LocalFleet, tmp_path: Path) -> None:
    # The plug-in counts on each worker's own disk (nothing is preempted here, so every
    # count file stays readable): in this machine's directory on loopback nodes, in each
    # node's home when isolated.
    counts = tmp_path / "counts"
    ITEMS = 900
    counts.mkdir()
    on_node = "/root/counts-stoppable" if module_fleet.isolated else str(counts)
    # 900 items, about 15 s of work for the 3 workers: the cancel lands mid-job even when a
    # loaded machine takes seconds to start the `fleet cancel` command.
    job = counted_job("stoppable", ITEMS, on_node, delay_s=0.05, chunk_size=20, plugin_env=module_fleet.plugin_env())
    # io: auto picks bulk here (chunks of 20 small files): a stopping worker hands what it
    # finished over as packs, however late the packer's ack, and the next run settles them.
    path = module_fleet.write_job(job)
    started = module_fleet.cli("run", str(path), "--detach")
    assert started.returncode == 0, started.stderr
    try:
        wait_for(lambda: done_chunks(module_fleet, "stoppable") >= 3, 60, "3 chunks done")
        cancelled = module_fleet.cli("cancel", "stoppable")
        assert cancelled.returncode == 0, cancelled.stderr
        left = node_processes_matching(module_fleet.name, "fleet.worker", module_fleet.root)
        assert not left, f"worker processes left after cancel: {left}"
        assert not node_processes_matching(module_fleet.name, "launch.sh", module_fleet.root)
        written = check_outputs(module_fleet, job, complete=False)
        assert 0 < written < ITEMS, written
        # Nothing restarts by itself; the job is recorded as cancelled.
        jobs = json.loads(module_fleet.cli("jobs", "--json", check=True).stdout)
        assert next(j for j in jobs if j["name"] == "stoppable")["status"] == "cancelled"
    finally:
        module_fleet.cli("cancel", "stoppable")
    resumed = module_fleet.cli("run", str(path), "--json", "--timeout", "120")
    assert resumed.returncode == 0, resumed.stderr
    assert summary_of(resumed)["done"] == ITEMS
    assert check_outputs(module_fleet, job) == ITEMS
    # The stop was graceful: chunks in hand were finished or released, nothing computed twice.
    if module_fleet.isolated:
        for slot in (1, 2, 3):
            for path in (module_fleet.node_home(module_fleet.worker(slot)) / "counts-stoppable").glob("*.count"):
                shutil.copy(path, counts / f"{slot}-{path.name}")
    assert computed_items(counts) == ITEMS
    # ... and it went through bulk I/O: the head's packer put the outputs in place.
    packer_log = (module_fleet.job_dir("stoppable") / "bulk" / "packer.log").read_text()
    assert sum(int(n) for n in re.findall(r"unpacked (\d+) outputs", packer_log)) > 0, packer_log
