"""The GPU path, tested on the CPU: token budgets, bucketing of a short queue, OOM halving
by tokens outside the except block, a broken GPU is fatal (the same error classes torch
raises on CUDA), restarts of a failed child, dtype, tokenising ahead in reader threads,
and GPU binding / GPM through an NVML shim (NVML itself needs a GPU)."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import worker_plugins
from worker_helpers import assert_checksum_outputs, chunk_ids, make_job, metric_lines, run_cli, write_files

from fleet.report.verdict import NodeSignals, Thresholds, classify_node
from fleet.worker.batcher import BatchQueue
from fleet.worker.errors import DeviceFailed
from fleet.worker.handlers import HandlerContext, is_device_failure, resolve_dtype
from fleet.worker.runner import run_worker

# -- batching by tokens ----------------------------------------------------------------------


def test_token_budget_bounds_every_batch_and_loses_nothing() -> None:
    rng = np.random.default_rng(5)
    sizes = [int(s) for s in rng.integers(1, 300, 400)]
    queue: BatchQueue[int] = BatchQueue(size_of=lambda i: sizes[i])
    queue.put_many(range(len(sizes)))
    taken: list[int] = []
    while len(queue):
        batch = queue.get_batch(64, 0, max_tokens=2000)
        cost = len(batch) * max(sizes[i] for i in batch)
        assert len(batch) == 1 or cost <= 2000, (len(batch), cost)
        assert len(batch) <= 64
        taken += batch
    assert sorted(taken) == list(range(len(sizes)))


def test_a_full_token_budget_ends_the_wait() -> None:
    queue: BatchQueue[int] = BatchQueue(size_of=lambda x: x)
    queue.put_many([100] * 10)  # 1,000 tokens queued: a full budget, far fewer than 64 items
    started = time.monotonic()
    batch = queue.get_batch(64, 30.0, max_tokens=1000)
    assert time.monotonic() - started < 10, "waited for a count although the token budget was full"
    assert batch == [100] * 10


def test_a_short_queue_still_buckets_long_items_apart() -> None:
    # Fewer items than a batch (the model outran the readers): 20 short texts, 2 long.
    queue: BatchQueue[int] = BatchQueue(size_of=lambda x: x)
    queue.put_many([10] * 10 + [500] + [10] * 10 + [500])
    first, second = queue.get_batch(64, 0), queue.get_batch(64, 0)
    assert first == [500, 500] and second == [10] * 20  # not 22 items padded to 500


# -- the pipeline: out of memory, broken GPU -------------------------------------------------


def test_out_of_memory_halves_the_token_budget_and_recovers_outside_the_except(shared: Path) -> None:
    inputs = write_files(shared / "c", 240, text=lambda i: "x" * (5 + i % 20))  # 5..24 bytes
    job = make_job(
        shared,
        "oom",
        {
            "handler": "worker_plugins:TokenOomChecksum",
            "handler_options": {"limit": 300},
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "batch_size": 64,
            "max_batch_tokens": 1600,
            "chunk_size": 240,
            "max_wait_ms": 200,
        },
    )
    summary = run_worker(job, node="n", install_signal_handlers=False)
    assert summary["failed"] == 0
    assert_checksum_outputs(shared / "c", shared / "o", inputs)
    costs = worker_plugins.CALLS["costs"]
    first_oom = next(i for i, cost in enumerate(costs) if cost > 300)
    settled = costs[first_oom:][8:]  # a few halvings later
    assert settled and max(settled) <= 400, f"the token budget did not come down: {costs}"
    assert worker_plugins.CALLS["freed_outside_except"] and all(worker_plugins.CALLS["freed_outside_except"])


def test_a_broken_gpu_is_fatal_and_marks_no_chunk_done(shared: Path) -> None:
    write_files(shared / "c", 40)
    job = make_job(
        shared,
        "broken",
        {
            "handler": "worker_plugins:BrokenGpuChecksum",
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "chunk_size": 10,
            "batch_size": 8,
        },
    )
    with pytest.raises(DeviceFailed, match="illegal memory access"):
        run_worker(job, node="n", install_signal_handlers=False)
    assert len(worker_plugins.CALLS["infer"]) == 1, "a broken GPU must not be retried item by item"
    assert not list((job / "done").glob("*")), "a chunk was marked done with its items failed"
    failures = job / "failures" / "n.0.jsonl"
    assert not failures.exists() or not failures.read_text().strip()
    status = json.loads(run_cli(str(job), "--status").stdout)
    assert status["done"] == 0 and status["claimed"] == 0, status  # claims released
    result = run_cli(str(job), "--node", "n")  # the CLI: one line, exit 3
    assert result.returncode == DeviceFailed.exit_code == 3, result.stderr
    assert result.stderr.count("\n") == 1 and "the GPU failed" in result.stderr


def test_device_failure_is_told_from_out_of_memory() -> None:
    import torch

    assert is_device_failure(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    assert is_device_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_device_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_device_failure(ValueError("bad input"))


@pytest.mark.slow
def test_a_child_that_dies_of_its_gpu_is_restarted_and_the_job_finishes(shared: Path) -> None:
    inputs = write_files(shared / "c", 120)
    marker = shared / "failed-once"
    job = make_job(
        shared,
        "restart",
        {
            "handler": "worker_plugins:FailOnceChecksum",
            "handler_options": {"marker": str(marker)},
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "chunk_size": 10,
            "batch_size": 5,
        },
    )
    result = run_cli(str(job), "--node", "box", "--processes", "2", FLEET_WORKER_RESTART_PAUSE_S="0.2")
    assert result.returncode == 0, result.stderr
    assert marker.exists() and "restarting it" in result.stderr, result.stderr
    assert_checksum_outputs(shared / "c", shared / "o", inputs)
    done = [row for row in metric_lines(job) if row["kind"] == "chunk" and row["outcome"] == "done"]
    assert sorted(row["chunk"] for row in done) == sorted(chunk_ids(job))  # each once
    assert all(row["failed"] == 0 for row in done)


@pytest.mark.slow
def test_restarts_are_bounded_then_the_node_exits_non_zero(shared: Path) -> None:
    write_files(shared / "c", 20)
    marker = shared / "failures"
    job = make_job(
        shared,
        "hopeless",
        {
            "handler": "worker_plugins:FailOnceChecksum",
            "handler_options": {"marker": str(marker), "always": True},
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "chunk_size": 10,
        },
    )
    result = run_cli(str(job), "--node", "box", "--processes", "2", FLEET_WORKER_RESTART_PAUSE_S="0.05")
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("giving up") == 2, result.stderr
    assert len(marker.read_text().split()) == 2 * 4  # each slot: the first run and 3 restarts
    assert not list((job / "done").glob("*"))


# -- dtype and tokenising ahead (the real model) ---------------------------------------------


def test_dtype_auto_is_float32_on_the_cpu() -> None:
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"


@pytest.mark.slow
def test_text_embed_tokenises_ahead_per_thread_and_runs_bf16(st_model) -> None:
    from fleet.worker.handlers.text_embed import TextEmbedHandler

    texts = [f"text number {i} " + "word " * (i % 37) for i in range(200)]
    handler = TextEmbedHandler()
    handler.open(HandlerContext("cpu", Path("/nonexistent"), "n"))
    assert handler._tokenizer_json is not None, "the tokenise-ahead path is off for the bundled model"
    expected = handler.prepare(texts)
    results: dict[int, list[Any]] = {}
    tokenizers: set[int] = set()

    def tokenise(worker: int) -> None:
        results[worker] = [ids for text in texts for ids in handler.prepare([text])]
        tokenizers.add(id(handler._local.tokenizer))

    threads = [threading.Thread(target=tokenise, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(tokenizers) == 4, "threads shared a tokenizer"
    for got in results.values():
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    pending = handler.infer_async(expected[:32])
    vectors = np.stack(pending.result())
    assert pending.device_s is not None and pending.device_s > 0
    np.testing.assert_allclose(vectors, st_model.encode(texts[:32]), atol=1e-5, rtol=0)

    bf16 = TextEmbedHandler()
    bf16.open(HandlerContext("cpu", Path("/nonexistent"), "n", dtype="bfloat16"))
    low = np.stack(bf16.infer(bf16.prepare(texts[:32])))
    assert low.dtype == np.float32
    cosine = (low * vectors).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosine.min() > 0.98, cosine.min()
    assert not np.array_equal(low, vectors), "bfloat16 was not used"


@pytest.mark.slow
def test_records_mode_with_a_token_budget_equals_encode_and_records_model_time(shared: Path, st_model) -> None:
    texts = [f"record {i} " + "token " * (i * 7 % 90) for i in range(60)]
    (shared / "docs").mkdir()
    (shared / "docs" / "a.txt").write_text("\n".join(texts) + "\n")
    job = make_job(
        shared,
        "tok",
        {
            "handler": "text-embed",
            "mode": "records",
            "inputs": "docs/*.txt",
            "outputs": "emb",
            "chunk_size": 60,
            "batch_size": 64,
            "max_batch_tokens": 800,
            "device": "cpu",
        },
    )
    run_worker(job, node="n", install_signal_handlers=False)
    (chunk,) = chunk_ids(job)
    np.testing.assert_allclose(np.load(shared / "emb" / f"{chunk}.npy"), st_model.encode(texts), atol=1e-5, rtol=0)
    batches = [row for row in metric_lines(job) if row["kind"] == "batch"]
    assert sum(row["batches"] for row in batches) > 1  # 60 texts did not fit one 800-token batch
    assert all(row["model_s"] > 0 for row in batches)
    start = next(row for row in metric_lines(job) if row["kind"] == "start")
    assert start["dtype"] == "float32"


# -- GPU binding and GPM through an NVML shim --------------------------------------------------


class _NvmlError(Exception):
    pass


def _nvml_shim(*, gpm: bool = False) -> types.ModuleType:
    """A stand-in for pynvml: GPU 0 plain, GPU 1 in MIG mode with slices in slots 0 and 2."""
    nvml = types.ModuleType("pynvml")
    gpus = [{"uuid": "GPU-aaaa", "mig": None}, {"uuid": "GPU-bbbb", "mig": {0: "MIG-b0", 2: "MIG-b2"}}]
    calls = {"util": 0}
    nvml.NVML_DEVICE_MIG_ENABLE = 1
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    nvml.nvmlDeviceGetName = lambda h: b"NVIDIA H200"

    def uuid(handle: Any) -> str:
        if handle[0] == "mig":
            return gpus[handle[1]]["mig"][handle[2]]
        return gpus[handle[1]]["uuid"]

    def mig_handle(handle: Any, slot: int) -> Any:
        if slot not in (gpus[handle[1]]["mig"] or {}):
            raise _NvmlError("NVML_ERROR_NOT_FOUND")
        return ("mig", handle[1], slot)

    nvml.nvmlDeviceGetUUID = uuid
    nvml.nvmlDeviceGetMigMode = lambda h: (1, 1) if gpus[h[1]]["mig"] else (0, 0)
    nvml.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=141 * 2**30, used=2**30)
    nvml.nvmlDeviceGetPowerUsage = lambda h: 350_000

    def utilization(handle: Any) -> Any:
        calls["util"] += 1
        return types.SimpleNamespace(gpu=97, memory=40)

    nvml.nvmlDeviceGetUtilizationRates = utilization
    nvml.calls = calls
    if gpm:
        nvml.NVML_GPM_METRICS_GET_VERSION = 1
        nvml.NVML_GPM_METRIC_SM_UTIL = 2
        nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
        nvml.nvmlGpmQueryDeviceSupport = lambda h: types.SimpleNamespace(isSupportedDevice=h[1] == 0)
        nvml.nvmlGpmSampleAlloc = lambda: {"n": 0}
        nvml.nvmlGpmSampleFree = lambda sample: None

        def sample_get(handle: Any, sample: dict[str, int]) -> dict[str, int]:
            calls["gpm"] = calls.get("gpm", 0) + 1
            sample["n"] = calls["gpm"]
            return sample

        class MetricsGet:
            def __init__(self) -> None:
                self.metrics = [types.SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(4)]

        def metrics_get(request: Any) -> Any:
            assert request.sample2["n"] > request.sample1["n"], "GPM samples out of order"
            for metric in request.metrics[: request.numMetrics]:
                metric.value = {2: 31.5, 5: 12.25}[metric.metricId]
            return request

        nvml.nvmlGpmSampleGet = sample_get
        nvml.c_nvmlGpmMetricsGet_t = MetricsGet
        nvml.nvmlGpmMetricsGet = metrics_get
    return nvml


def test_gpus_are_bound_by_uuid_in_pci_order_one_process_per_mig_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.worker import __main__ as cli
    from fleet.worker.gpus import visible_units

    monkeypatch.setitem(sys.modules, "pynvml", _nvml_shim())
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_units() == ["GPU-aaaa", "MIG-b0", "MIG-b2"]
    import os

    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert cli._process_plan("auto", "auto", True) == (3, ["GPU-aaaa", "MIG-b0", "MIG-b2"])
    assert cli._process_plan("auto", "cpu", True) == (1, [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_units() == ["MIG-b0", "MIG-b2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-b2,GPU-aaaa")
    assert visible_units() == ["MIG-b2", "GPU-aaaa"]


def test_sampler_reads_utilisation_once_per_tick_and_gpm_where_the_gpu_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fleet.worker.sampler import GpuProbe

    nvml = _nvml_shim(gpm=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    probe = GpuProbe()
    assert probe.uuids == ["GPU-aaaa", "GPU-bbbb"] and probe.mig == [[], ["MIG-b0", "MIG-b2"]]
    probe.read()
    nvml.calls["util"] = 0
    gpus = probe.read()
    assert nvml.calls["util"] == 2  # one query per GPU per tick, not one per figure
    assert gpus[0]["util"] == 97 and gpus[0]["mem_util"] == 40
    assert gpus[0]["sm_active"] == 31.5 and gpus[0]["tensor_active"] == 12.2
    assert "sm_active" not in gpus[1]  # no GPM on that one
    probe.close()


def test_report_prefers_sm_activity_over_nvml_utilisation() -> None:
    busy_by_nvml = NodeSignals(
        has_samples=True,
        has_worker=True,
        gpu_count=1,
        gpu_util=97.0,
        gpu_util_each=(97.0,),
        gpu_mem=20.0,
        gpu_sm_active=30.0,
        gpu_sm_each=(30.0,),
        gpu_tensor_active=10.0,
        model_busy_pct=60.0,
        items=100_000,
        worker_seconds=100.0,
        device="cuda",
        input_wait_pct=1.0,
        worker_busy_pct=99.0,
        cpu_busy=30.0,
        ncpu=16,
    )
    verdict = classify_node(busy_by_nvml, Thresholds())
    assert verdict.kind == "gpu-bound"
    assert "raise batch_size" in verdict.recommendation  # SMs 30%: under-used, despite NVML's 97%
    assert any("SM activity 30%" in line for line in verdict.evidence)
    assert any("model busy 60%" in line for line in verdict.evidence)
    assert any("kernels are too small" in note for note in verdict.notes)
    without_gpm = classify_node(
        NodeSignals(**{**busy_by_nvml.__dict__, "gpu_sm_active": None, "gpu_sm_each": ()}), Thresholds()
    )
    assert "raise batch_size" not in without_gpm.recommendation


def test_prepare_runs_in_the_reader_threads_and_a_failing_item_is_isolated(shared: Path) -> None:
    (shared / "r").mkdir()
    lines = [f"line {i}" if i != 7 else "POISON 7" for i in range(30)]
    (shared / "r" / "a.txt").write_text("\n".join(lines) + "\n")
    job = make_job(
        shared,
        "prep",
        {
            "handler": "worker_plugins:PreparingChecksum",
            "mode": "records",
            "inputs": "r/*.txt",
            "outputs": "o",
            "chunk_size": 30,
        },
    )
    summary = run_worker(job, node="n", install_signal_handlers=False)
    assert summary["items"] == 29 and summary["failed"] == 1
    failure = json.loads((job / "failures" / "n.0.jsonl").read_text())
    assert failure["item"] == "a.txt:8" and failure["stage"] == "prepare"
    (chunk,) = chunk_ids(job)
    digests = (shared / "o" / f"{chunk}.sha256").read_text().split()
    expected = [hashlib.sha256(line.upper().encode()).hexdigest() for line in lines if "POISON" not in line]
    assert digests == expected
    assert all(name.startswith("fleet-reader") for name in worker_plugins.CALLS["prepare_threads"])
