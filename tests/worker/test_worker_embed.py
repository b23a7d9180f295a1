"""text-embed with the real all-MiniLM-L6-v2: the worker's vectors equal encode()'s."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from worker_helpers import chunk_ids, make_job

from fleet.worker.runner import run_worker

WORDS = [
    "fleet",
    "worker",
    "node",
    "chunk",
    "lease",
    "batch",
    "model",
    "vector",
    "shared",
    "disk",
    "preempt",
    "spot",
    "grün",
    "café",
    "東京",
    "😀",
]


def _texts(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    texts[0] = ""  # an empty text is still a text
    texts[1] = "long " * 400  # beyond max_seq_length: truncated the same way
    return texts


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [False, True])
def test_files_mode_embeddings_equal_encode(shared: Path, st_model, normalize: bool) -> None:
    texts = _texts(45)
    for i, text in enumerate(texts):
        path = shared / "corpus" / f"g{i % 3}" / f"t{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (shared / "corpus" / "g0" / "broken.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    job = make_job(
        shared,
        "embed",
        {
            "handler": "text-embed",
            "handler_options": {"normalize": normalize},
            "inputs": "corpus/**/*.txt",
            "outputs": "emb",
            "batch_size": 8,
            "chunk_size": 16,
            "device": "cpu",
        },
    )
    summary = run_worker(job, node="n", install_signal_handlers=False)
    assert summary["items"] == 45 and summary["failed"] == 1
    expected = st_model.encode(texts, normalize_embeddings=normalize)
    for i, text in enumerate(texts):
        got = np.load(shared / "emb" / f"g{i % 3}" / f"t{i:03d}.txt.npy")
        assert got.dtype == np.float32 and got.shape == (384,)
        np.testing.assert_allclose(got, expected[i], atol=1e-5, rtol=0)
    if normalize:
        assert abs(float(np.linalg.norm(np.load(shared / "emb" / "g0" / "t003.txt.npy"))) - 1) < 1e-5
    failure = json.loads((job / "failures" / "n.0.jsonl").read_text())
    assert failure["item"] == "g0/broken.txt" and "UnicodeDecodeError" in failure["error"]


@pytest.mark.slow
def test_records_mode_embeddings_equal_encode_in_record_order(shared: Path, st_model) -> None:
    texts = _texts(70, seed=11)[2:]
    (shared / "docs").mkdir()
    (shared / "docs" / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts))
    )
    job = make_job(
        shared,
        "rec",
        {
            "handler": "text-embed",
            "mode": "records",
            "inputs": "docs/*.jsonl",
            "outputs": "emb",
            "chunk_size": 25,
            "batch_size": 16,
            "device": "cpu",
        },
    )
    run_worker(job, node="n", install_signal_handlers=False)
    rows, lines = [], []
    for chunk in chunk_ids(job):
        matrix = np.load(shared / "emb" / f"{chunk}.npy")
        index = json.loads((shared / "emb" / f"{chunk}.index.json").read_text())
        assert matrix.shape == (index["rows"], 384) and matrix.dtype == np.float32
        rows.append(matrix)
        lines += [line for _f, line in index["records"]]
    assert lines == list(range(1, len(texts) + 1))
    np.testing.assert_allclose(np.concatenate(rows), st_model.encode(texts), atol=1e-5, rtol=0)
