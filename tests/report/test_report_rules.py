"""The verdict rules at their thresholds (docs/report.md states the same numbers)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet.report.verdict import NodeSignals, Thresholds, Verdict, classify_fleet, classify_node

GPU_WORKER = NodeSignals(
    cpu_busy=20,
    ncpu=16,
    gpu_count=1,
    gpu_util=90,
    gpu_util_each=(90,),
    gpu_mem=70,
    has_samples=True,
    has_worker=True,
    worker_seconds=100,
    items=10_000,
    device="cuda",
    input_wait_pct=2,
    worker_busy_pct=95,
    wait_s=2,
    compute_s=98,
)
CPU_WORKER = replace(
    GPU_WORKER, gpu_count=0, gpu_util=None, gpu_util_each=(), gpu_mem=None, device="cpu", cpu_busy=50
)


def with_wait(signals: NodeSignals, pct: float, **changes) -> NodeSignals:
    return replace(signals, input_wait_pct=pct, **changes)


def test_published_input_wait_thresholds():
    th = Thresholds()
    assert (th.input_bound_pct, th.input_moderate_pct, th.gpu_low_pct) == (20.0, 5.0, 50.0)
    assert classify_node(with_wait(GPU_WORKER, 19.9)).kind == "gpu-bound"
    assert classify_node(with_wait(GPU_WORKER, 20.0)).kind == "starved"  # input-bound, nothing saturated
    moderate = classify_node(with_wait(GPU_WORKER, 5.0))
    assert moderate.kind == "gpu-bound" and any("moderate" in note for note in moderate.notes)
    assert not classify_node(with_wait(GPU_WORKER, 4.9)).notes


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"disk_busy": 70}, "disk-bound"),
        ({"iowait": 10}, "disk-bound"),
        ({"disk_busy": 69, "iowait": 9}, "starved"),
        ({"net_rx_mb_s": 40, "net_mb_s": 41, "disk_read_mb_s": 2}, "network-bound"),
        ({"net_rx_mb_s": 0.9, "net_mb_s": 1}, "starved"),  # too little arrives to blame the network
        ({"cpu_busy": 85}, "cpu-bound"),
    ],
)
def test_input_bound_goes_to_the_resource_that_is_full(changes, expected):
    assert classify_node(with_wait(GPU_WORKER, 40, **changes)).kind == expected


def test_a_busy_disk_that_the_job_does_not_read_is_not_the_job_s_bottleneck():
    signals = with_wait(GPU_WORKER, 40, disk_busy=95, job_io_mb_s=0.0)
    assert classify_node(signals).kind == "starved"
    assert classify_node(replace(signals, job_io_mb_s=5.0)).kind == "disk-bound"


def test_a_cpu_full_of_someone_else_is_said_not_blamed():
    signals = with_wait(GPU_WORKER, 40, cpu_busy=95, job_cpu_pct_one_core=50)  # 0.5 of 16 cores
    verdict = classify_node(signals)
    assert verdict.kind == "starved"
    assert any("something else" in note for note in verdict.notes)
    assert classify_node(replace(signals, job_cpu_pct_one_core=1500)).kind == "cpu-bound"


def test_gpu_low_utilisation_with_cpu_full_is_cpu_bound():
    assert (
        classify_node(replace(GPU_WORKER, gpu_util=49, gpu_util_each=(49,), cpu_busy=90)).kind == "cpu-bound"
    )
    low = classify_node(replace(GPU_WORKER, gpu_util=49, gpu_util_each=(49,), cpu_busy=40))
    assert low.kind == "gpu-bound" and "batch_size" in low.recommendation
    roomy = classify_node(replace(GPU_WORKER, gpu_util=70, gpu_util_each=(70,), gpu_mem=30))
    assert "batch_size" in roomy.recommendation


def test_cpu_worker_is_cpu_bound_and_says_how_to_use_the_cores():
    verdict = classify_node(CPU_WORKER)
    assert verdict.kind == "cpu-bound" and "more worker processes" in verdict.recommendation
    assert "GPU nodes" in classify_node(replace(CPU_WORKER, cpu_busy=97)).recommendation
    on_gpu_node = classify_node(replace(GPU_WORKER, device="cpu"))
    assert on_gpu_node.kind == "cpu-bound" and "device" in on_gpu_node.recommendation


def test_worker_between_batches_is_starved_for_work():
    verdict = classify_node(replace(GPU_WORKER, worker_busy_pct=30))
    assert verdict.kind == "starved" and "chunk_size" in verdict.recommendation
    assert classify_node(replace(GPU_WORKER, worker_busy_pct=50)).kind == "gpu-bound"


def test_worker_with_no_items():
    assert classify_node(replace(GPU_WORKER, items=0, worker_seconds=30)).kind == "starved"
    quick = replace(GPU_WORKER, items=0, worker_seconds=1, cpu_busy=1, gpu_util=0, gpu_util_each=(0,))
    assert classify_node(quick).kind == "idle"


def test_without_worker_timings():
    base = NodeSignals(has_samples=True, ncpu=8)
    assert classify_node(base).kind == "idle"
    assert classify_node(replace(base, cpu_busy=88)).kind == "cpu-bound"
    assert (
        classify_node(replace(base, cpu_busy=80, cpu_steal=6)).kind == "cpu-bound"
    )  # stolen time is CPU too
    assert classify_node(replace(base, gpu_count=1, gpu_util=60, gpu_util_each=(60,))).kind == "gpu-bound"
    assert classify_node(replace(base, disk_busy=80, job_io_mb_s=3)).kind == "disk-bound"
    assert classify_node(replace(base, net_mb_s=120)).kind == "network-bound"
    single = classify_node(replace(base, cpu_busy=13, job_cpu_pct_one_core=99))
    assert single.kind == "cpu-bound" and "single-threaded" in single.recommendation
    # a node busy with someone else's work, the job's own processes asleep: idle
    assert (
        classify_node(
            replace(base, cpu_busy=60, disk_busy=50, job_cpu_pct_one_core=0.5, job_io_mb_s=0.0)
        ).kind
        == "idle"
    )
    assert classify_node(replace(base, cpu_busy=30)).kind == "starved"
    assert classify_node(NodeSignals()).kind == "idle"


def test_fleet_verdict_weighs_working_time_and_names_idle_nodes():
    gpu = Verdict("gpu-bound", (), "")
    net = Verdict("network-bound", (), "")
    idle = Verdict("idle", (), "")
    fleet = classify_fleet([("a", gpu, 100), ("b", net, 300), ("c", idle, 500)])
    assert fleet.kind == "network-bound"
    assert "c" in " ".join(fleet.evidence) and "idle" in fleet.recommendation
    assert classify_fleet([("a", idle, 10)]).kind == "idle"
    assert classify_fleet([]).kind == "idle"


def test_a_job_kept_from_the_cpu_by_other_tenants_is_cpu_bound():
    """Two busy processes on a 2-core node shared with others: they get 0.8 of a core
    and wait in the run queue for 1.2 more: the CPU is what holds them back."""
    base = NodeSignals(has_samples=True, ncpu=2, cpu_busy=98)
    crowded = replace(base, job_cpu_pct_one_core=80, job_runq_pct_one_core=120)
    verdict = classify_node(crowded)
    assert verdict.kind == "cpu-bound"
    assert any("other processes" in note for note in verdict.notes)
    # the same CPU use without waiting: someone else's busy CPU, the job is not CPU-bound
    assert classify_node(replace(crowded, job_runq_pct_one_core=5)).kind == "starved"
    # a job that wants little CPU (a starved reader) is not blamed on waits
    assert classify_node(replace(base, job_cpu_pct_one_core=4, job_runq_pct_one_core=30)).kind != "cpu-bound"


def test_reads_and_writes_that_dominate_blame_the_shared_filesystem_whatever_the_cpu():
    full_cpu = replace(CPU_WORKER, cpu_busy=99, mode="files")
    computing = classify_node(full_cpu)
    assert computing.kind == "cpu-bound"  # compute is 98% of stage time: the model is the limit
    io = replace(full_cpu, read_s=40, write_s=52, wait_s=7, compute_s=1)
    verdict = classify_node(io)
    assert verdict.kind == "network-bound" and "shared filesystem" in verdict.evidence[0]
    assert "9.20 ms of reads and writes per item" in verdict.evidence[1]  # 92 s over 10,000 items
    assert "200 files/s" in verdict.evidence[2]  # 10,000 items in 100 s, one read + one write each
    assert "io: bulk" in verdict.recommendation
    at = Thresholds().io_share_pct
    assert classify_node(replace(io, read_s=at / 2, write_s=at / 2, wait_s=0, compute_s=100 - at)).kind == (
        "network-bound"
    )
    assert classify_node(replace(io, read_s=24, write_s=25, wait_s=0, compute_s=51)).kind == "cpu-bound"
    # A GPU job is never overridden this way (its verdict is about the GPU), nor a starved one.
    assert classify_node(replace(GPU_WORKER, read_s=60, write_s=30, compute_s=10)).kind == "gpu-bound"
