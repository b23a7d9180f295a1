"""Freezing the input set into stable chunks; reading records back."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from fleet.worker.config import WorkerConfig
from fleet.worker.errors import WorkerError
from fleet.worker.inputs import freeze, list_inputs, load_chunk_list, read_segment, split_glob
from fleet.worker.layout import JobLayout


def _layout(shared: Path) -> JobLayout:
    (shared / "jobs" / "j").mkdir(parents=True, exist_ok=True)
    return JobLayout.at(shared / "jobs" / "j")


def test_split_glob() -> None:
    assert split_glob("corpus/**/*.txt") == ("corpus", "**/*.txt")
    assert split_glob("a/b/x?.json") == ("a/b", "x?.json")
    assert split_glob("*.txt") == (".", "*.txt")
    assert split_glob("/data/in/*/*.txt") == ("/data/in", "*/*.txt")


def test_list_inputs_matches_like_glob_and_skips_hidden(tmp_path: Path) -> None:
    for rel in ["a.txt", "b.md", "x/c.txt", "x/y/d.txt", ".hidden.txt", "x/.e.txt.abc.tmp", ".git/f.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("t")
    (tmp_path / "dir.txt").mkdir()
    assert list_inputs(tmp_path, "**/*.txt") == ["a.txt", "x/c.txt", "x/y/d.txt"]
    assert list_inputs(tmp_path, "*.txt") == ["a.txt"]
    assert list_inputs(tmp_path, "x/*.txt") == ["x/c.txt"]
    assert list_inputs(tmp_path, "*/*/[d].txt") == ["x/y/d.txt"]


def test_files_mode_chunks_are_sorted_and_stable(shared: Path) -> None:
    for i in range(250):
        (shared / "c" / f"{i % 3}").mkdir(parents=True, exist_ok=True)
        (shared / "c" / f"{i % 3}" / f"f{i:03d}.txt").write_text(str(i))
    layout = _layout(shared)
    config = WorkerConfig(handler="checksum", inputs="c/**/*.txt", outputs="o", chunk_size=100)
    first = freeze(layout, config)
    assert [c.items for c in first.chunks] == [100, 100, 50]
    assert first.files == sorted(first.files) and len(first.files) == 250
    (shared / "c" / "0" / "new.txt").write_text("late")  # the input set is frozen
    again = freeze(layout, config)
    assert again.files == first.files and [c.id for c in again.chunks] == ["c000000", "c000001", "c000002"]


def test_racing_freezes_agree_on_one_chunk_list(shared: Path) -> None:
    for i in range(300):
        (shared / "c" / f"f{i:03d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (shared / "c" / f"f{i:03d}.txt").write_text(str(i))
    layout = _layout(shared)
    config = WorkerConfig(handler="checksum", inputs="c/*.txt", outputs="o", chunk_size=7)
    results = []
    barrier = threading.Barrier(8)

    def racer() -> None:
        barrier.wait()
        results.append(json.dumps(freeze(layout, config).files))

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert [p.name for p in layout.job_dir.iterdir() if p.name.startswith(".")] == []


def test_records_mode_cuts_by_records_across_files(shared: Path) -> None:
    (shared / "r").mkdir()
    (shared / "r" / "a.txt").write_text("one\n\ntwo\nthree\n")
    (shared / "r" / "b.jsonl").write_text('{"text": "four"}\n{"text": "five"}\n   \n{"text": "six"}')
    layout = _layout(shared)
    config = WorkerConfig(handler="checksum", inputs="r/*", outputs="o", mode="records", chunk_size=4)
    chunks = freeze(layout, config)
    assert [c.items for c in chunks.chunks] == [4, 2]
    values = []
    for chunk in chunks.chunks:
        for seg in chunk.segments:
            rel = chunks.files[seg.file]
            rows = read_segment(layout.resolve("r") / rel, seg, "text" if rel.endswith(".jsonl") else None)
            assert len(rows) == seg.items
            values.extend((rel, line, value) for line, value in rows)
    assert values == [
        ("a.txt", 1, "one"),
        ("a.txt", 3, "two"),
        ("a.txt", 4, "three"),
        ("b.jsonl", 1, "four"),
        ("b.jsonl", 2, "five"),
        ("b.jsonl", 4, "six"),
    ]


def test_bad_records_come_back_as_exceptions(shared: Path) -> None:
    (shared / "r").mkdir()
    (shared / "r" / "a.jsonl").write_bytes(
        b'{"text": "ok"}\nnot json\n{"other": 1}\n{"text": "\xff"}\n\xff\xfe\n'
    )
    layout = _layout(shared)
    config = WorkerConfig(handler="checksum", inputs="r/*.jsonl", outputs="o", mode="records")
    chunks = freeze(layout, config)
    seg = chunks.chunks[0].segments[0]
    rows = read_segment(layout.resolve("r") / "a.jsonl", seg, "text")
    assert rows[0] == (1, "ok")
    assert all(isinstance(value, Exception) for _line, value in rows[1:])


def test_chunk_list_round_trips_and_mismatch_is_an_error(shared: Path) -> None:
    (shared / "c").mkdir()
    for i in range(5):
        (shared / "c" / f"{i}.txt").write_text("x")
    layout = _layout(shared)
    config = WorkerConfig(handler="checksum", inputs="c/*.txt", outputs="o", chunk_size=2)
    frozen = freeze(layout, config)
    assert load_chunk_list(layout) == frozen
    with pytest.raises(WorkerError, match="was frozen for"):
        freeze(layout, config.model_copy(update={"chunk_size": 3}))


def test_inputs_matching_nothing_is_a_clear_error(shared: Path) -> None:
    (shared / "c").mkdir()
    with pytest.raises(WorkerError, match="matched no files"):
        freeze(_layout(shared), WorkerConfig(handler="checksum", inputs="c/*.txt", outputs="o"))
    with pytest.raises(WorkerError, match="does not exist"):
        freeze(_layout(shared), WorkerConfig(handler="checksum", inputs="nope/*.txt", outputs="o"))
