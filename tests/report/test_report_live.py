"""Synthetic jobs with a known bottleneck, run as real processes on this machine with
the real sampler watching them: each must get the right verdict.

The machine is shared (other processes may load its CPU and disk while these run), so
the workloads are chosen so that their verdict rests on what they themselves do: the
worker's own stage timings and the watched process tree's CPU and I/O.
"""

from __future__ import annotations

import os

import pytest

from fleet.report import build_report

pytestmark = pytest.mark.slow


def test_cpu_bound_worker_is_cpu_bound(run_workload):
    job = run_workload("cpu", 6.0)
    report = build_report(job)
    node = report.to_json()["nodes"][0]
    assert node["verdict"] == "cpu-bound", node
    assert node["compute"] > 80, node  # share of stage time in compute
    assert node["input_wait_pct"] < 20, node
    assert node["items"] > 0 and node["items_s"] > 0
    assert report.fleet.verdict.kind == "cpu-bound"
    assert node["samples"] >= 5  # real samples at 0.5 s over the working window
    assert "processes per node" in node["recommendation"] or "GPU" in node["recommendation"]


def test_busy_run_job_without_timings_is_cpu_bound(run_workload):
    """A `run:` job (no worker timings): as many busy processes as cores."""
    job = run_workload("spin", 6.0, str(os.cpu_count() or 1))
    node = build_report(job).to_json()["nodes"][0]
    assert node["verdict"] == "cpu-bound", node
    assert node["cpu_busy"] > 60, node


def test_throttled_reader_is_starved(run_workload):
    job = run_workload("starved", 6.0)
    node = build_report(job).to_json()["nodes"][0]
    assert node["verdict"] == "starved", node
    assert node["input_wait_pct"] >= 20, node
    assert node["wait"] > node["compute"], node
    assert any("input wait" in text for text in node["evidence"])
    assert "reader_threads" in node["recommendation"]


def test_sleeping_process_is_idle(run_workload):
    job = run_workload("idle", 4.0)
    report = build_report(job)
    node = report.to_json()["nodes"][0]
    assert node["verdict"] == "idle", node
    assert report.fleet.verdict.kind == "idle"
    assert node["samples"] >= 4
