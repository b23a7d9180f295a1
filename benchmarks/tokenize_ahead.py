"""tokenize_ahead: the worker with a no-op model against the tokenizer alone.

With the model taken away, what is left of the worker is reading, tokenising (in the
reader threads, `TextEmbedHandler.prepare`), batching and writing: on a GPU that
outruns the CPU this is the ceiling of the whole worker. The reference is the real
fast tokenizer of all-MiniLM-L6-v2 alone on the same texts in memory, in as many
threads as the worker has reader threads (the tokenizer releases the GIL), measured in
the same run.

Texts: ~400 characters each (~70 tokens), one per line of .txt files, records mode
(the high-rate path: a file of texts, one output matrix per chunk). The no-op model
returns a one-float vector per text, so that writing outputs costs what it costs for a
small result; the model's forward pass is what is left out, nothing else (the handler
is the bundled text-embed with the real model's tokenizer; only `infer_async` differs).

The machine is shared: runs interleave T W T W ..., each worker run is compared with
the mean of the tokenizer runs around it, the ratio reported is the median over the
rounds. Last line: {"tokenizer_items_s", "worker_items_s", "ratio", ...}. Goal: ratio
>= 0.9.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_TEXTS = int(os.environ.get("BENCH_TEXTS", "20000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # reader threads = tokenizer threads
_SENTENCE = (
    "the a fleet of cheap machines runs big offline batch jobs while nodes vanish and come back "
    "shared disk over sshfs holds millions of small files each worker claims chunks with leases "
    "embeddings vectors model inference throughput latency preemption spot instance gpu"
)
WORDS = _SENTENCE.split()

_LOADED: dict[str, Any] = {}


def make_texts(n: int, seed: int = 2) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 400:
            words.append(rng.choice(WORDS))
        texts.append(" ".join(words))
    return texts


def noop_text_embed(**options: Any) -> Any:
    """text-embed with the real tokenizer (prepare, in the reader threads) and no model."""
    import numpy as np

    from fleet.worker.handlers import HandlerContext, Pending
    from fleet.worker.handlers.text_embed import TextEmbedHandler

    class NoModel(TextEmbedHandler):
        def open(self, context: HandlerContext) -> None:
            self.attach(_LOADED["model"], context)
            assert self._tokenizer_json is not None, "the tokenise-ahead path is off"

        def infer_async(self, batch: list[Any]) -> Pending:
            return Pending([np.zeros(1, dtype=np.float32)] * len(batch), 0.0)

    return NoModel(**options)


def tokenizer_alone(handler: Any, texts: list[str]) -> float:
    """Texts/s of the fast tokenizer on `texts` in THREADS threads (one tokenizer each)."""
    shares = [texts[i::THREADS] for i in range(THREADS)]

    def tokenise(share: list[str]) -> None:
        for start in range(0, len(share), 1000):
            handler.prepare(share[start : start + 1000])

    threads = [threading.Thread(target=tokenise, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer

    from fleet.worker.handlers import HandlerContext
    from fleet.worker.handlers.text_embed import default_model_path
    from fleet.worker.runner import run_worker

    texts = make_texts(N_TEXTS)
    root = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        shared = root / "shared"
        (shared / "texts").mkdir(parents=True)
        per_file = max(1, N_TEXTS // 4)
        for f in range(0, N_TEXTS, per_file):
            (shared / "texts" / f"part{f // per_file}.txt").write_text("\n".join(texts[f : f + per_file]) + "\n")
        worker = {
            "handler": "tokenize_ahead:noop_text_embed",
            "mode": "records",
            "inputs": "texts/*.txt",
            "batch_size": 256,
            "chunk_size": 5000,
            "reader_threads": THREADS,
            "device": "cpu",
        }
        for q in range(ROUNDS):
            job = shared / "jobs" / f"r{q}"
            job.mkdir(parents=True)
            spec = {"name": f"r{q}", "worker": {**worker, "outputs": f"out/r{q}"}}
            (job / "job.yaml").write_text(yaml.safe_dump(spec))
        _LOADED["model"] = SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)
        sys.modules.setdefault("tokenize_ahead", sys.modules[__name__])
        reference = noop_text_embed()
        reference.open(HandlerContext("cpu", shared, "bench"))
        tokenizer_alone(reference, texts[:2000])  # warm up
        alone: list[float] = [tokenizer_alone(reference, texts)]
        worker_rates: list[float] = []
        ratios: list[float] = []
        for q in range(ROUNDS):
            summary = run_worker(shared / "jobs" / f"r{q}", node="bench", install_signal_handlers=False)
            if summary["items"] != N_TEXTS or summary["failed"]:
                raise SystemExit(f"worker run {q}: {summary['items']} items, {summary['failed']} failed")
            worker_rates.append(summary["items_s"])
            alone.append(tokenizer_alone(reference, texts))
            ratios.append(summary["items_s"] / ((alone[-2] + alone[-1]) / 2))
        print(
            json.dumps(
                {
                    "tokenizer_items_s": round(statistics.median(alone), 1),
                    "worker_items_s": round(statistics.median(worker_rates), 1),
                    "ratio": round(statistics.median(ratios), 3),
                    "ratios": [round(r, 3) for r in ratios],
                    "tokenizer_runs_items_s": [round(a, 1) for a in alone],
                    "worker_runs_items_s": [round(w, 1) for w in worker_rates],
                    "texts": N_TEXTS,
                    "threads": THREADS,
                    "mean_tokens": round(
                        statistics.mean(len(ids) for ids in reference.prepare(texts[:500])), 1
                    ),
                }
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
