"""Reading job directories defensively: missing files, cut lines, garbage, empty dirs."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from fleet.report import build_report, render_html, render_terminal, write_png
from fleet.report.load import load_job, read_jsonl


def _write(path: Path, lines: list[object], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)


def _sample(t: float, user: float = 10.0) -> dict:
    return {
        "t": t,
        "kind": "sample",
        "node": "n",
        "cpu": {"user": user, "system": 2, "iowait": 0, "idle": 88, "steal": 0, "ncpu": 4},
        "mem": {"used_pct": 10, "used_mb": 100},
        "disks": {},
        "net": {},
        "gpus": [],
    }


def test_read_jsonl_counts_bad_lines_and_a_cut_tail(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\nnot json\n[1, 2]\n\n{"b": 2}\n{"c": ')
    lines = read_jsonl(path)
    assert lines.records == [{"a": 1}, {"b": 2}]
    assert lines.bad_lines == 2 and lines.truncated_tail
    assert read_jsonl(tmp_path / "missing.jsonl").records == []


def test_empty_and_missing_job_directories(tmp_path):
    empty = tmp_path / "jobs" / "empty"
    empty.mkdir(parents=True)
    report = build_report(empty)
    data = report.to_json()
    assert data["job"] == "empty" and data["nodes"] == [] and data["fleet"]["verdict"] == "idle"
    assert any("no metrics" in note for note in data["notes"])
    assert "fleet report: empty" in render_html(report)  # every face renders an empty report
    assert [p.name for p in write_png(report, tmp_path / "png")] == ["fleet.png"]
    render_terminal(report, Console(file=io.StringIO()))
    gone = build_report(
        tmp_path / "jobs" / "never-made", events=[{"t": 5, "node": "f-w1-g1", "kind": "requested"}]
    )
    assert gone.to_json()["nodes"][0]["name"] == "f-w1-g1"
    assert any("does not exist" in note for note in gone.notes)


def test_garbage_fields_do_not_raise(tmp_path):
    job = tmp_path / "jobs" / "j"
    _write(
        job / "metrics" / "n.jsonl",
        [
            {"kind": "info", "gpu": False, "interval": "fast", "gpus": "none"},
            {"t": "yesterday", "kind": "sample"},
            {
                "t": 1.0,
                "kind": "sample",
                "cpu": "busy",
                "disks": [1, 2],
                "gpus": [None, {"util": "x"}],
                "net": None,
            },
            _sample(2.0),
            _sample(3.0),
            {"t": 4.0, "kind": "mystery", "payload": [1]},
        ],
        tail='{"t": 5.0, "kind": "sam',
    )
    _write(
        job / "metrics" / "n.worker0.jsonl",
        [
            {"t": 1.0, "kind": "start"},
            {"t": 2.0, "kind": "batch", "items": "many", "wait_s": None},
            {"kind": "batch", "items": 5},
            {"t": 3.0, "kind": "batch", "items": 4, "wait_s": 0.1, "compute_s": 0.4},
        ],
    )
    (job / "done").mkdir()
    (job / "done" / "c0").write_text("{not json")
    (job / "done" / ".c1.abc.tmp").write_text("{}")
    (job / "chunks.json").write_text('{"chunks": "?"}')
    data = build_report(
        job, events=[{"t": "x"}, {"node": "n"}, {"t": 0.5, "node": "n", "kind": "working"}]
    ).to_json()
    node = data["nodes"][0]
    assert node["name"] == "n" and node["samples"] >= 2
    assert node["items"] == 4
    assert "cut off" in node["missing"]
    loaded = load_job(job)
    assert [d.chunk for d in loaded.done] == ["c0"]  # temporary files are not done markers


def test_worker_files_are_matched_to_their_node(tmp_path):
    job = tmp_path / "jobs" / "j"
    _write(job / "metrics" / "fl-w1-g1.jsonl", [_sample(1), _sample(2)])
    _write(job / "metrics" / "fl-w1-g1.worker0.jsonl", [{"t": 1, "kind": "start"}])
    _write(job / "metrics" / "fl-w1-g1.worker1.jsonl", [{"t": 1, "kind": "start"}])
    _write(job / "metrics" / "fl-w2-g1.worker0.jsonl", [{"t": 1, "kind": "start"}])
    (job / "metrics" / "notes.txt").write_text("ignored")
    loaded = load_job(job)
    assert sorted(loaded.nodes) == ["fl-w1-g1", "fl-w2-g1"]
    assert [w.proc for w in loaded.nodes["fl-w1-g1"].workers] == ["0", "1"]
    assert not loaded.nodes["fl-w2-g1"].sample_file
    data = build_report(job).to_json()
    w2 = next(n for n in data["nodes"] if n["name"] == "fl-w2-g1")
    assert "metrics/fl-w2-g1.jsonl is missing" in w2["missing"]


def test_samples_that_stop_early_are_reported_missing(tmp_path):
    job = tmp_path / "jobs" / "j"
    _write(job / "metrics" / "a.jsonl", [_sample(float(t)) for t in range(1, 61)])
    _write(job / "metrics" / "b.jsonl", [_sample(float(t)) for t in range(1, 21)])
    nodes = {n["name"]: n for n in build_report(job).to_json()["nodes"]}
    assert nodes["a"]["missing"] == ""
    assert "samples stop at" in nodes["b"]["missing"] and "40 s before" in nodes["b"]["missing"]


def test_gaps_in_samples_are_reported(tmp_path):
    job = tmp_path / "jobs" / "j"
    _write(
        job / "metrics" / "a.jsonl",
        [{"t": 0, "kind": "info", "interval": 1.0}]
        + [_sample(float(t)) for t in list(range(1, 11)) + list(range(40, 51))],
    )
    node = build_report(job).to_json()["nodes"][0]
    assert "of the working window (gaps)" in node["missing"]
