"""run_worker in-process on real files: outputs, failures, batching, memoization, resume."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import worker_plugins
from worker_helpers import (
    assert_checksum_outputs,
    chunk_ids,
    done_chunk_counts,
    hidden_files,
    make_job,
    metric_lines,
    sha256_hex,
    visible_files,
    wait_for,
    write_files,
)

from fleet.worker.errors import WorkerError
from fleet.worker.runner import run_worker

BATCH_KEYS = {"t", "kind", "node", "proc", "device", "items", "read_s", "wait_s", "compute_s", "write_s"}


def test_checksum_files_one_output_per_input_and_metrics(shared: Path) -> None:
    inputs = write_files(shared / "corpus", 230)
    job = make_job(
        shared,
        "sums",
        {
            "handler": "checksum",
            "inputs": "corpus/**/*.txt",
            "outputs": "out/sums",
            "chunk_size": 50,
            "batch_size": 16,
        },
    )
    summary = run_worker(job, node="n1", install_signal_handlers=False)
    assert summary["reason"] == "done" and summary["items"] == 230
    assert_checksum_outputs(shared / "corpus", shared / "out" / "sums", inputs)
    assert sorted(os.listdir(job / "done")) == chunk_ids(job)
    assert os.listdir(job / "claims") == []
    assert hidden_files(shared / "out") == []
    rows = metric_lines(job)
    assert rows[0]["kind"] == "start" and rows[-1]["kind"] == "stop"
    batches = [r for r in rows if r["kind"] == "batch"]
    assert batches and all(BATCH_KEYS <= set(r) for r in batches)
    assert sum(r["items"] for r in batches) == 230
    assert done_chunk_counts(job) == {c: 1 for c in chunk_ids(job)}
    marker = json.loads((job / "done" / "c000000").read_text())
    assert {"items", "failed", "node", "seconds"} <= set(marker) and marker["items"] == 50


def test_unreadable_and_vanished_inputs_are_recorded_and_skipped(shared: Path) -> None:
    inputs = write_files(shared / "corpus", 40)
    os.symlink(shared / "nowhere.txt", shared / "corpus" / "d00" / "broken.txt")
    job = make_job(
        shared, "j", {"handler": "checksum", "inputs": "corpus/**/*.txt", "outputs": "out", "chunk_size": 10}
    )
    from fleet.worker.inputs import freeze
    from fleet.worker.layout import JobLayout, load_worker_config

    layout = JobLayout.at(job)
    freeze(layout, load_worker_config(layout))
    inputs[7].unlink()  # vanished after the input set was frozen
    summary = run_worker(job, node="n1", install_signal_handlers=False)
    assert summary["failed"] == 2
    failures = [json.loads(line) for line in (job / "failures" / "n1.0.jsonl").read_text().splitlines()]
    assert sorted(f["item"] for f in failures) == ["d00/broken.txt", "d00/f00007.txt"]
    assert all(
        f["stage"] == "load" and "FileNotFoundError" in f["error"] and f["node"] == "n1" for f in failures
    )
    assert_checksum_outputs(shared / "corpus", shared / "out", [p for p in inputs if p.exists()])
    from fleet.worker.claims import job_status
    from fleet.worker.inputs import load_chunk_list

    per_chunk = {c.id: c.items for c in load_chunk_list(layout).chunks}
    status = job_status(layout, per_chunk)
    assert (status["total"], status["done"], status["failed"], status["chunks_done"]) == (41, 39, 2, 5)


def test_a_failing_batch_is_split_to_skip_only_the_bad_items(shared: Path) -> None:
    inputs = write_files(shared / "c", 64, text=lambda i: "POISON" if i in (5, 40) else f"fine {i}")
    job = make_job(
        shared,
        "j",
        {
            "handler": "worker_plugins:PoisonChecksum",
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "batch_size": 64,
            "chunk_size": 64,
            "max_wait_ms": 200,
        },
    )
    summary = run_worker(job, node="n", install_signal_handlers=False)
    assert summary["failed"] == 2 and summary["items"] == 64
    failed = sorted(json.loads(x)["item"] for x in (job / "failures" / "n.0.jsonl").read_text().splitlines())
    assert failed == ["d00/f00005.txt", "d00/f00040.txt"]
    good = [p for i, p in enumerate(inputs) if i not in (5, 40)]
    assert_checksum_outputs(shared / "c", shared / "o", good)


def test_out_of_memory_splits_the_batch_and_adapts_the_batch_size(shared: Path) -> None:
    inputs = write_files(shared / "c", 300)
    job = make_job(
        shared,
        "j",
        {
            "handler": "worker_plugins:OomChecksum",
            "handler_options": {"limit": 20},
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "batch_size": 64,
            "chunk_size": 300,
            "max_wait_ms": 100,
        },
    )
    summary = run_worker(job, node="n", install_signal_handlers=False)
    assert summary["failed"] == 0
    assert_checksum_outputs(shared / "c", shared / "o", inputs)
    sizes = worker_plugins.CALLS["infer"]
    assert sizes[0] == 64  # the first batch was full and ran out of memory
    first_ok = next(i for i, s in enumerate(sizes) if s <= 20)
    oversized_after = [s for s in sizes[first_ok:] if s > 32]
    assert not oversized_after, f"batch size did not adapt: {sizes}"


def test_memoize_computes_identical_inputs_once(shared: Path) -> None:
    inputs = write_files(shared / "c", 200, text=lambda i: f"content {i % 10}")
    job = make_job(
        shared,
        "j",
        {
            "handler": "worker_plugins:slow_checksum",
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "memoize": True,
            "chunk_size": 40,
        },
    )
    run_worker(job, node="n", install_signal_handlers=False)
    assert sum(worker_plugins.CALLS["infer"]) == 10
    assert_checksum_outputs(shared / "c", shared / "o", inputs)


def test_records_mode_rows_in_record_order_with_index(shared: Path) -> None:
    (shared / "r").mkdir()
    lines_a = [f"alpha {i}" for i in range(25)]
    (shared / "r" / "a.txt").write_text("\n".join(lines_a) + "\n")
    (shared / "r" / "b.jsonl").write_text(
        "\n".join(json.dumps({"body": f"beta {i}"}) for i in range(12)) + "\nnot json\n"
    )
    job = make_job(
        shared,
        "j",
        {
            "handler": "checksum",
            "mode": "records",
            "field": "body",
            "inputs": "r/*",
            "outputs": "o",
            "chunk_size": 10,
            "batch_size": 4,
        },
    )
    summary = run_worker(job, node="n", install_signal_handlers=False)
    assert summary["failed"] == 1
    expected = [("a.txt", i + 1, text) for i, text in enumerate(lines_a)]
    expected += [("b.jsonl", i + 1, f"beta {i}") for i in range(12)]
    got = []
    for chunk in chunk_ids(job):
        index = json.loads((shared / "o" / f"{chunk}.index.json").read_text())
        rows = (shared / "o" / f"{chunk}.sha256").read_text().split()
        assert len(rows) == index["rows"] == len(index["records"])
        for (file_pos, line), digest in zip(index["records"], rows):
            got.append((index["files"][file_pos], line, digest))
    assert got == [(f, line, sha256_hex(text.encode())) for f, line, text in expected]


def test_rerun_of_a_finished_job_does_nothing(shared: Path, tmp_path: Path) -> None:
    write_files(shared / "c", 60)
    open_log = tmp_path / "opens.log"
    job = make_job(
        shared,
        "j",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"open_log": str(open_log)},
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "chunk_size": 20,
        },
    )
    run_worker(job, node="n", install_signal_handlers=False)
    before = {p: p.stat().st_mtime_ns for p in visible_files(shared / "o")}
    metrics_before = metric_lines(job)
    assert len(open_log.read_text().splitlines()) == 1
    again = run_worker(job, node="late", install_signal_handlers=False)
    assert again["reason"] == "nothing-to-do"
    assert {p: p.stat().st_mtime_ns for p in visible_files(shared / "o")} == before
    assert metric_lines(job) == metrics_before
    assert len(open_log.read_text().splitlines()) == 1, "the handler (model) must not be loaded again"


def test_stop_releases_the_chunk_and_the_next_worker_skips_written_outputs(shared: Path) -> None:
    inputs = write_files(shared / "c", 120)
    job = make_job(
        shared,
        "j",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"delay_s": 0.05},
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "chunk_size": 120,
            "batch_size": 4,
            "prefetch": 1,
        },
    )
    stop = threading.Event()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_worker(job, node="a", stop=stop)))
    thread.start()
    wait_for(lambda: len(visible_files(shared / "o")) >= 20, 30, "some outputs")
    stopped_at = time.monotonic()
    stop.set()
    thread.join(30)
    assert time.monotonic() - stopped_at < 5
    assert result["reason"] == "signal"
    assert os.listdir(job / "done") == []
    assert [n for n in os.listdir(job / "claims") if not n.startswith(".")] == []
    written = len(visible_files(shared / "o"))
    assert 20 <= written < 60, f"{written} outputs: the worker did not stop reading promptly"
    summary = run_worker(job, node="b", install_signal_handlers=False)
    assert summary["items"] == 120 - written  # only what was missing was computed
    chunk_line = next(r for r in metric_lines(job) if r["kind"] == "chunk" and r["node"] == "b")
    assert chunk_line["resumed"] and chunk_line["skipped"] == written and chunk_line["outcome"] == "done"
    assert_checksum_outputs(shared / "c", shared / "o", inputs)


def test_unknown_handler_and_bad_options_are_fatal_errors(shared: Path) -> None:
    write_files(shared / "c", 3)
    job = make_job(shared, "j", {"handler": "no_such_module:make", "inputs": "c/**/*.txt", "outputs": "o"})
    with pytest.raises(WorkerError, match="cannot import no_such_module"):
        run_worker(job, node="n", install_signal_handlers=False)
    job2 = make_job(
        shared,
        "k",
        {"handler": "text-embed", "handler_options": {"modle": "x"}, "inputs": "c/**/*.txt", "outputs": "o"},
    )
    with pytest.raises(WorkerError, match="bad handler_options"):
        run_worker(job2, node="n", install_signal_handlers=False)


def test_a_plugin_must_return_a_handler(shared: Path) -> None:
    write_files(shared / "c", 3)
    job = make_job(
        shared, "j", {"handler": "worker_plugins:NotAHandler", "inputs": "c/**/*.txt", "outputs": "o"}
    )
    with pytest.raises(WorkerError, match="not a fleet.worker.handlers.Handler"):
        run_worker(job, node="n", install_signal_handlers=False)


def test_resumed_chunk_removes_stale_temporaries_of_a_dead_holder(shared: Path) -> None:
    write_files(shared / "c", 10)
    job = make_job(shared, "j", {"handler": "checksum", "inputs": "c/**/*.txt", "outputs": "o"})
    from fleet.worker.inputs import freeze
    from fleet.worker.layout import JobLayout, load_worker_config

    layout = JobLayout.at(job)
    layout.make_dirs()
    freeze(layout, load_worker_config(layout))
    (layout.claims / ".prev.c000000.deadbeef").write_text("{}")  # an earlier holder released it
    out = shared / "o" / "d00"
    out.mkdir(parents=True)
    stale = out / ".f00001.txt.sha256.0123456789ab.tmp"
    fresh = out / ".f00002.txt.sha256.ba9876543210.tmp"
    stale.write_text("partial")
    fresh.write_text("partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    (out / "f00003.txt.sha256").write_text("written before\n")
    summary = run_worker(job, node="n", install_signal_handlers=False)
    assert not stale.exists() and fresh.exists()
    assert summary["items"] == 9  # f00003 was skipped: its output was there
    chunk = next(r for r in metric_lines(job) if r["kind"] == "chunk")
    assert chunk["resumed"] and chunk["skipped"] == 1
    assert (out / "f00003.txt.sha256").read_text() == "written before\n"


def test_memoize_holds_while_a_batch_is_in_flight(shared: Path) -> None:
    """The next batch is started before the one in flight is finished: an input that the
    batch in flight computes must not be computed again by the next one."""
    inputs = write_files(shared / "c", 24, text=lambda i: "the same content")
    job = make_job(
        shared,
        "j",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"delay_s": 0.2},  # the readers fill the next batch meanwhile
            "inputs": "c/**/*.txt",
            "outputs": "o",
            "memoize": True,
            "chunk_size": 24,
            "batch_size": 4,
            "io": "mount",
        },
    )
    run_worker(job, node="n", install_signal_handlers=False)
    assert sum(worker_plugins.CALLS["infer"]) == 1
    assert_checksum_outputs(shared / "c", shared / "o", inputs)
