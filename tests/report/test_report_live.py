"""Jobs with a known bottleneck, run as real processes on this machine (the real
worker, or a plain process for a `run:` job) with the real sampler watching them:
each must get the right verdict.

The machine is shared (other processes may load its CPU and disk while these run), so
the workloads are chosen so that their verdict rests on what they themselves do: the
worker's own stage timings and the watched process tree's CPU and I/O.
"""

from __future__ import annotations

import os

import pytest

from fleet.report import build_report

pytestmark = pytest.mark.slow


def test_cpu_bound_worker_is_cpu_bound(run_worker_job):
    """A model that computes 25 ms per item on the CPU, inputs at hand."""
    job = run_worker_job(
        "busy",
        240,
        handler="report_handlers:busy",
        handler_options={"busy_ms": 25},
        batch_size=16,
        chunk_size=80,
    )
    report = build_report(job)
    node = report.to_json()["nodes"][0]
    assert node["verdict"] == "cpu-bound", node
    assert node["items"] == 240
    assert node["input_wait_pct"] < 20, node
    assert node["compute"] > node["read"] + node["wait"] + node["write"], node
    assert node["items_s"] > 0 and node["samples"] >= 5
    assert report.fleet.verdict.kind == "cpu-bound"
    assert report.status == "finished" and report.fleet.items == 240


def test_throttled_reads_starve_the_worker(run_worker_job):
    """Every read takes 30 ms through one reader thread; the model itself is instant."""
    job = run_worker_job(
        "throttled",
        150,
        handler="report_handlers:throttled",
        handler_options={"read_ms": 30},
        batch_size=16,
        chunk_size=50,
        reader_threads=1,
        max_wait_ms=50,
    )
    node = build_report(job).to_json()["nodes"][0]
    assert node["verdict"] == "starved", node
    assert node["input_wait_pct"] >= 20, node
    assert node["wait"] > node["compute"], node
    assert any("input wait" in text for text in node["evidence"])
    assert "reader_threads" in node["recommendation"]


def test_busy_run_job_without_timings_is_cpu_bound(run_workload):
    """A `run:` job (no worker timings): as many busy processes as cores."""
    job = run_workload("spin", "6", str(os.cpu_count() or 1))
    node = build_report(job).to_json()["nodes"][0]
    assert node["verdict"] == "cpu-bound", node
    assert node["cpu_busy"] > 60, node


def test_sleeping_process_is_idle(run_workload):
    job = run_workload("idle", "4")
    report = build_report(job)
    node = report.to_json()["nodes"][0]
    assert node["verdict"] == "idle", node
    assert report.fleet.verdict.kind == "idle"
    assert node["samples"] >= 4
