"""GPU-bound, multi-GPU, mixed and still-running jobs from recorded metric files
(tests/report/data/, written by make_data.py: there is no GPU on the test machines)."""

from __future__ import annotations

import json
import shutil

import pytest

from fleet.report import build_report


def test_gpu_bound_node(recorded):
    job, events, prices = recorded("gpu_bound")
    report = build_report(job, events, prices)
    data = report.to_json()
    node = data["nodes"][0]
    assert node["verdict"] == "gpu-bound"
    assert node["gpu_util"] == pytest.approx(94, abs=2) and node["gpu_util_p95"] >= node["gpu_util"]
    assert node["gpu_mem"] == pytest.approx(75, abs=1)
    assert node["input_wait_pct"] < 5
    assert node["compute"] > 85
    assert data["fleet"]["verdict"] == "gpu-bound"
    assert data["status"] == "finished"
    assert node["missing"] == ""


def test_multi_gpu_nodes(recorded):
    job, events, prices = recorded("multi_gpu")
    nodes = {n["name"]: n for n in build_report(job, events, prices).to_json()["nodes"]}
    half, full = nodes["mg-w1-g1"], nodes["mg-w2-g1"]
    assert len(half["gpus"]) == 4 and len(full["gpus"]) == 8
    assert half["verdict"] == "gpu-bound" and full["verdict"] == "gpu-bound"
    # GPUs 2 and 3 of the first node sat idle: the advice is one process per GPU
    assert [g["util"] < 10 for g in half["gpus"]] == [False, False, True, True]
    assert "one worker process per GPU" in half["recommendation"] and "2, 3" in half["recommendation"]
    assert "one worker process per GPU" not in full["recommendation"]
    assert full["items_s"] > 3 * half["items_s"]


def test_mixed_fleet_verdicts_and_missing(recorded):
    job, events, prices = recorded("mixed")
    report = build_report(job, events, prices)
    data = report.to_json()
    verdicts = {n["name"]: n["verdict"] for n in data["nodes"]}
    assert verdicts == {
        "mix-w1-g1": "gpu-bound",
        "mix-w2-g1": "network-bound",
        "mix-w3-g1": "disk-bound",
        "mix-w4-g1": "cpu-bound",
        "mix-w5-g1": "gpu-bound",  # preempted half-way; gpu-bound while it lived
        "mix-w6-g1": "idle",
        "mix-w5-g2": "idle",  # the replacement, requested too late to do anything
    }
    nodes = {n["name"]: n for n in data["nodes"]}
    assert "max_conns" in nodes["mix-w2-g1"]["recommendation"]
    assert "local disk" in nodes["mix-w3-g1"]["recommendation"]
    assert "cores" in nodes["mix-w4-g1"]["recommendation"]
    lost = nodes["mix-w5-g1"]
    assert lost["preempted_at"] is not None
    assert "samples stop at" in lost["missing"] and "preempted at" in lost["missing"]
    assert "no stop line" in lost["missing"] and "cut off" in lost["missing"]
    assert "redone elsewhere" in lost["missing"]
    assert lost["time"]["lost_to_preemption"] > 0
    assert "no worker stage timings" in nodes["mix-w6-g1"]["missing"]
    assert "metrics/mix-w5-g2.jsonl is missing" in nodes["mix-w5-g2"]["missing"]
    assert data["fleet"]["verdict"] in {"gpu-bound", "network-bound", "disk-bound", "cpu-bound"}
    assert "idle" in data["fleet"]["recommendation"]
    assert any("mix-head" in note for note in data["notes"])


def test_mixed_fleet_time_and_cost_add_up(recorded):
    job, events, prices = recorded("mixed")
    data = build_report(job, events, prices).to_json()
    time = data["time"]
    parts = ("provisioning", "setup", "mounting", "compute", "waiting", "lost_to_preemption", "idle")
    assert sum(time[p] for p in parts) == pytest.approx(time["node_seconds"], rel=1e-3)
    assert all(time[p] >= 0 for p in parts)
    # each worker: requested 140 s before the work, SSH ready 70 s later, set up 40 s later
    assert time["provisioning"] >= 6 * 70 and time["setup"] >= 6 * 40
    cost = data["cost"]
    priced_hours = sum(n["cost_usd"] or 0 for n in data["nodes"])
    assert cost["usd"] >= priced_hours > 0
    assert cost["unpriced_nodes"] == ["mix-w5-g2"]
    assert cost["usd_per_1000_items"] == pytest.approx(cost["usd"] / data["fleet"]["items"] * 1000, rel=1e-3)
    # the preempted node stops costing at its preemption
    lost = next(n for n in data["nodes"] if n["name"] == "mix-w5-g1")
    assert sum(lost["time"].values()) == pytest.approx(80 + 140, abs=1)


def test_running_job(recorded):
    job, events, prices = recorded("running")
    data = build_report(job, events, prices).to_json()
    assert data["status"] == "running"
    assert data["fleet"]["items"] == 3000 and data["fleet"]["items_total"] == 10000
    for node in data["nodes"]:
        assert node["verdict"] == "gpu-bound"
        assert node["missing"] == ""  # still running: no stop line is not missing anything
    assert data["cost"]["usd"] is None  # no prices known


def test_json_has_the_documented_keys(recorded):
    job, events, prices = recorded("mixed")
    data = build_report(job, events, prices).to_json()
    assert {"job", "fleet", "nodes", "time", "cost"} <= set(data)
    assert {"verdict", "recommendation", "evidence"} <= set(data["fleet"])
    for node in data["nodes"]:
        for key in (
            "name",
            "verdict",
            "recommendation",
            "cpu_busy",
            "iowait",
            "disk_busy",
            "disk_mb_s",
            "net_mb_s",
            "gpu_util",
            "gpu_mem",
            "read",
            "wait",
            "compute",
            "write",
            "items_s",
            "missing",
        ):
            assert key in node, key
        for key in ("cpu_busy", "iowait", "disk_busy", "disk_mb_s", "net_mb_s", "gpu_util", "gpu_mem"):
            assert f"{key}_p95" in node
    assert set(data["time"]) >= {
        "provisioning",
        "setup",
        "mounting",
        "compute",
        "waiting",
        "lost_to_preemption",
        "idle",
    }


def test_a_node_up_long_before_the_job_is_counted_from_the_job_s_start(recorded):
    """The same fleet ran an earlier job: its nodes were requested hours before this
    job's first record. Their provisioning and the hours before belong to the fleet's
    earlier life, not to this job."""
    job, events, prices = recorded("gpu_bound")
    early = [{**e, "t": e["t"] - 3 * 3600} for e in events]  # every node event 3 h earlier
    data = build_report(job, early, prices).to_json()
    node = data["nodes"][0]
    assert node["time"]["provisioning"] == 0 and node["time"]["setup"] == 0
    assert sum(node["time"].values()) == pytest.approx(120, abs=3)  # the job's own two minutes
    assert data["time"]["wall"] == pytest.approx(120, abs=3)
    # the same events just before the job: provisioning counts
    fresh = build_report(job, events, prices).to_json()["nodes"][0]
    assert fresh["time"]["provisioning"] == pytest.approx(70, abs=1)


def test_an_earlier_incarnation_of_the_fleet_is_not_in_the_report(recorded):
    """`fleet down` then `up` again: the same head name, new worker generations, and the
    old nodes' events still in the state. The report covers only this job's nodes."""
    job, events, prices = recorded("mixed")
    fresh = build_report(job, events, prices).to_json()
    start = min(float(e["t"]) for e in events)
    earlier = [
        {"t": start - 7200, "node": "mix-head", "kind": "requested", "detail": "head"},
        {"t": start - 7190, "node": "mix-head", "kind": "ssh_ready", "detail": ""},
        {"t": start - 7200, "node": "mix-w1-g0", "kind": "requested", "detail": "worker"},
        {"t": start - 7190, "node": "mix-w1-g0", "kind": "ssh_ready", "detail": ""},
        {"t": start - 5000, "node": "mix-w9-g1", "kind": "requested", "detail": "worker"},
        {"t": start - 4000, "node": "mix-w9-g1", "kind": "preempted", "detail": ""},
        {"t": start - 3600, "node": "", "kind": "down", "detail": "deleted 3 resource(s)"},
    ]
    again = build_report(job, earlier + list(events), prices).to_json()
    assert {n["name"] for n in again["nodes"]} == {n["name"] for n in fresh["nodes"]}
    assert again["time"] == fresh["time"] and again["cost"] == fresh["cost"]
    # without the `down`, a node that ended before the job is still left out
    ended = build_report(job, earlier[4:6] + list(events), prices).to_json()
    assert "mix-w9-g1" not in {n["name"] for n in ended["nodes"]}


def test_outputs_a_preempted_node_left_and_the_next_holder_kept_are_not_counted_as_redone(recorded, tmp_path):
    job, events, prices = recorded("mixed")
    report = build_report(job, events, prices).to_json()
    before = next(n for n in report["nodes"] if n["name"] == "mix-w5-g1")
    assert before["time"]["lost_to_preemption"] > 0 and "4096 redone elsewhere" in before["missing"]
    # Now the chunks it held were finished by nodes that found its outputs written and
    # kept them (`skipped` in their done markers): the done markers account for every
    # item computed in the fleet, so nothing was computed twice.
    computed = sum(n["items"] for n in report["nodes"])
    finished = sum(json.loads(f.read_text())["items"] for f in (job / "done").iterdir())
    kept = tmp_path / "mixed"
    shutil.copytree(job, kept)
    (kept / "done" / "c00050").write_text(json.dumps(
        {"items": computed - finished, "failed": 0, "skipped": computed - finished, "node": "mix-w1-g1"}
    ))
    after = next(n for n in build_report(kept, events, prices).to_json()["nodes"] if n["name"] == "mix-w5-g1")
    assert after["time"]["lost_to_preemption"] == 0
    assert "none redone elsewhere, 4096 kept" in after["missing"]


def test_small_files_over_sshfs_blame_the_shared_filesystem_not_the_cpu(recorded):
    """A real run (record_sshfs_run.py): checksum over 3,000 small files through sshfs on
    2 cores. CPU 100% busy, but 90%+ of the worker's stage time is reads and writes."""
    job, events, prices = recorded("small_files_sshfs")
    node = build_report(job, events, prices).to_json()["nodes"][0]
    assert node["read"] + node["write"] >= 50 and node["cpu_busy"] >= 85, node
    assert node["verdict"] == "network-bound", node
    assert "the shared filesystem is the limit" in node["evidence"][0]
    assert any(text.endswith("ms of reads and writes per item") for text in node["evidence"])
    assert any("files/s through the mount" in text for text in node["evidence"])
    assert "io: bulk" in node["recommendation"] and "records mode" in node["recommendation"]
    assert any("cpu-bound" in note for note in node["notes"])
