"""The GPU path on a lent GPU machine, in one run of about 6 minutes (see run.sh, prepare.sh).

Steps, each appending one JSON line to OUT/results.jsonl as soon as it is done (so a run
cut short still tells what it measured):

1. `env`: torch, the GPU, bf16 support, NVML and GPM (SM / tensor activity) support.
2. `tokenizer`: the model's fast tokenizer alone, texts/s in 1, 2, 4, 8, 16 threads
   (~400-character texts, ~80 tokens): the CPU ceiling of tokenising ahead.
3. `model`: the model alone on pre-tokenised batches already on the GPU, by dtype
   (float32 with TF32, bfloat16, float16) x batch size, timed with CUDA events: the
   GPU ceiling.
4. `encode`: `SentenceTransformer.encode` end to end (tokenising in the loop, the path
   the worker had before), float32 and bfloat16.
5. `worker_records`, `worker_files`: `fleet-worker` (one process per GPU) with the
   sampler watching it: items/s, model busy (the batch lines' model_s over the run's
   wall time), NVML util vs GPM SM / tensor activity, and the ratio to the model-alone
   ceiling at the same dtype and batch size (goals: >= 0.9, model busy >= 0.95).
6. `oom`: most of the GPU's memory taken, a job whose first batch cannot fit: the
   worker must halve its token budget and finish with no item failed.
7. `device_assert`: a handler that trips a real device-side assert in the first
   process: it must exit 3, be restarted by its parent, and the job finish.

The weights are random (the model's config and tokenizer travel, the 87 MB weights do
not: speed does not depend on them). `--cpu-smoke` runs every step that makes sense on
a CPU at tiny sizes, so that this script is known to work before a GPU session.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ["the", "a", "fleet", "of", "cheap", "machines", "runs", "big", "offline", "batch", "jobs", "while", "nodes", "vanish", "and", "come", "back", "shared", "disk", "over", "sshfs", "holds", "millions", "of", "small", "files", "each", "worker", "claims", "chunks", "with", "leases", "embeddings"]
ASSERT_PLUGIN = '''
import os
from fleet.worker.handlers.text_embed import TextEmbedHandler

class AssertOnce(TextEmbedHandler):
    """The first process to run a batch trips a real device-side assert (an index out of
    range on the GPU; on a CPU, the error torch would raise for it)."""

    def __init__(self, marker, **options):
        super().__init__(**options)
        self.marker = marker

    def infer_async(self, batch):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return super().infer_async(batch)
        import torch
        if not self.device.startswith("cuda"):
            raise RuntimeError("CUDA error: device-side assert triggered")
        index = torch.tensor([10**6], device=self.device)
        torch.zeros(4, device=self.device)[index].sum().item()
        return super().infer_async(batch)

def assert_once(**options):
    return AssertOnce(**options)
'''


def make_texts(n: int, seed: int = 4, chars: int = 400) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = max(20, int(rng.gauss(chars, chars / 4)))
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(WORDS))
        texts.append(" ".join(words))
    return texts


class Results:
    def __init__(self, out: Path) -> None:
        self.path = out / "results.jsonl"
        out.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            figures = {"step": name, "ok": True, **fn()}
        except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others
            figures = {"step": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        figures["step_s"] = round(time.monotonic() - started, 1)
        with self.path.open("a") as handle:
            handle.write(json.dumps(figures) + "\n")
        print(json.dumps(figures), flush=True)
        return figures


def make_model(config_dir: Path, work: Path) -> Path:
    """A complete model directory: the carried config and tokenizer, random weights."""
    from transformers import AutoConfig, AutoModel

    target = work / "model"
    shutil.copytree(config_dir, target)
    config = AutoConfig.from_pretrained(str(target))
    AutoModel.from_config(config).save_pretrained(str(target))
    return target


def step_env(device: str) -> dict[str, Any]:
    import torch

    from fleet.worker.sampler import GpuProbe

    probe = GpuProbe()
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "device": device,
        "cpus": os.cpu_count(),
        "nvml_gpus": probe.names,
        "gpm": [g is not None for g in probe.gpm],
        "mig": probe.mig,
        "nvml_reason": probe.reason,
    }
    probe.close()
    if device.startswith("cuda"):
        info.update(
            gpu=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            bf16=torch.cuda.is_bf16_supported(),
            memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
    return info


def step_tokenizer(handler: Any, texts: list[str], threads: list[int]) -> dict[str, Any]:
    rates = {}
    for count in threads:
        shares = [texts[i::count] for i in range(count)]
        workers = [
            threading.Thread(target=lambda s=share: [handler.prepare(s[k : k + 1000]) for k in range(0, len(s), 1000)])
            for share in shares
        ]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        rates[str(count)] = round(len(texts) / (time.perf_counter() - started), 1)
    tokens = [len(ids) for ids in handler.prepare(texts[:2000])]
    return {"texts_s_by_threads": rates, "mean_tokens": round(statistics.mean(tokens), 1)}


def step_model(model_dir: Path, device: str, ids: list[Any], dtypes: list[str], batches: list[int]) -> dict[str, Any]:
    import torch

    from fleet.worker.handlers import HandlerContext
    from fleet.worker.handlers.text_embed import TextEmbedHandler

    figures: dict[str, Any] = {}
    for dtype in dtypes:
        handler = TextEmbedHandler(model=str(model_dir))
        handler.open(HandlerContext(device, model_dir.parent, "bench", dtype))
        for batch_size in batches:
            # Batches of similar lengths, as the worker's bucketing makes them.
            ordered = sorted(ids, key=len)
            groups = [ordered[k : k + batch_size] for k in range(0, len(ordered) - batch_size + 1, batch_size)][:8]
            prepared = []
            for batch in groups:
                longest = max(len(x) for x in batch)
                input_ids = torch.zeros((batch_size, longest), dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for row, x in enumerate(batch):
                    input_ids[row, : len(x)] = torch.as_tensor(x)
                    mask[row, : len(x)] = 1
                features = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}
                prepared.append({k: v.to(device) for k, v in features.items()})
            padded = sum(f["input_ids"].numel() for f in prepared)
            repeats = 1 if device == "cpu" else 5
            with torch.inference_mode():
                for features in prepared[:2]:
                    handler._forward(features)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    for _ in range(repeats):
                        for features in prepared:
                            handler._forward(features)
                    end.record()
                    end.synchronize()
                    seconds = begin.elapsed_time(end) / 1000.0
                else:
                    started = time.perf_counter()
                    for features in prepared:
                        handler._forward(features)
                    seconds = time.perf_counter() - started
            items = batch_size * len(prepared) * repeats
            figures[f"{dtype}/{batch_size}"] = {
                "items_s": round(items / seconds, 1),
                "padded_tokens_s": round(padded * repeats / seconds, 1),
                "batches": len(prepared),
            }
        handler.close()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"by_dtype_batch": figures}


def step_encode(model_dir: Path, device: str, texts: list[str], dtypes: list[str]) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    figures = {}
    for dtype in dtypes:
        model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        model.to(getattr(torch, dtype))
        model.encode(texts[:256], batch_size=256, show_progress_bar=False)
        started = time.perf_counter()
        model.encode(texts, batch_size=256, show_progress_bar=False)
        figures[dtype] = round(len(texts) / (time.perf_counter() - started), 1)
    return {"items_s": figures, "batch_size": 256, "texts": len(texts)}


def _job(shared: Path, name: str, worker: dict[str, Any]) -> Path:
    job = shared / "jobs" / name
    job.mkdir(parents=True)
    (job / "job.yaml").write_text(yaml.safe_dump({"name": name, "worker": worker}))
    return job


def _env(extra_path: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO), env.get("PYTHONPATH", "")]
    if extra_path is not None:
        paths.insert(0, str(extra_path))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


def run_worker_job(job: Path, *, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """fleet-worker on `job` with the sampler watching it; the figures of its metrics."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "fleet.worker", str(job), "--node", "gpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = subprocess.Popen(
        [sys.executable, "-m", "fleet.worker.sampler", "--out", str(job / "metrics" / "gpu.jsonl"),
         "--pid", str(worker.pid), "--interval", "0.5", "--node", "gpu"],
        env=env,
    )
    try:
        _out, err = worker.communicate(timeout=timeout)
    finally:
        if worker.poll() is None:
            worker.kill()
        sampler.wait(timeout=30)
    figures: dict[str, Any] = {"rc": worker.returncode, "stderr_tail": err[-1500:]}
    stops, model_s, batches = [], 0.0, 0
    for path in (job / "metrics").glob("gpu.worker*.jsonl"):
        for row in map(json.loads, path.read_text().splitlines()):
            if row["kind"] == "stop":
                stops.append(row)
            elif row["kind"] == "batch":
                model_s += row.get("model_s", 0.0)
                batches += row["batches"]
            elif row["kind"] == "start":
                figures["dtype"] = row.get("dtype")
    every = [
        row
        for row in map(json.loads, (job / "metrics" / "gpu.jsonl").read_text().splitlines())
        if row.get("kind") == "sample"
    ]
    samples = [row for row in every if row.get("gpus")]

    def mean_of(key: str) -> float | None:
        values = [g[key] for s in samples for g in s["gpus"] if g.get(key) is not None]
        return round(statistics.mean(values), 1) if values else None

    seconds = sum(s["seconds"] for s in stops)
    figures.update(
        items=sum(s["items"] for s in stops),
        failed=sum(s["failed"] for s in stops),
        items_s=round(sum(s["items"] for s in stops) / max(s["seconds"] for s in stops), 1) if stops else None,
        model_busy=round(model_s / seconds, 3) if seconds else None,
        batches=batches,
        nvml_util=mean_of("util"),
        sm_active=mean_of("sm_active"),
        tensor_active=mean_of("tensor_active"),
        samples=len(samples),
        cpu_pct=round(statistics.mean(s["proc"]["cpu_pct"] for s in every if "proc" in s), 1)
        if any("proc" in s for s in every)
        else None,
    )
    return figures


def step_worker(shared: Path, model_dir: Path, texts: list[str], mode: str, options: dict[str, Any],
                ceiling: float | None, timeout: float) -> dict[str, Any]:
    base = shared / f"in-{mode}"
    if mode == "records":
        base.mkdir(parents=True)
        per_file = max(1, len(texts) // 8)
        for f in range(0, len(texts), per_file):
            (base / f"part{f // per_file:02d}.txt").write_text("\n".join(texts[f : f + per_file]) + "\n")
        inputs = f"in-{mode}/*.txt"
    else:
        for i, text in enumerate(texts):
            path = base / f"d{i // 1000:03d}" / f"t{i:06d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        inputs = f"in-{mode}/**/*.txt"
    job = _job(
        shared,
        f"worker-{mode}",
        {
            "handler": "text-embed",
            "handler_options": {"model": str(model_dir)},
            "inputs": inputs,
            "outputs": f"out-{mode}",
            "mode": mode,
            **options,
        },
    )
    figures = run_worker_job(job, env=_env(), timeout=timeout)
    figures["options"] = options
    if ceiling and figures.get("items_s"):
        figures["ceiling_items_s"] = ceiling
        figures["ratio_to_model_alone"] = round(figures["items_s"] / ceiling, 3)
    return figures


def step_oom(shared: Path, model_dir: Path, texts: list[str]) -> dict[str, Any]:
    """Fill the GPU but ~3 GiB, then a job whose first batch (4096 x ~256 tokens) needs far more."""
    import torch

    from fleet.worker.runner import run_worker

    free, _total = torch.cuda.mem_get_info()
    filler = torch.empty(max(0, free - 3 * 2**30), dtype=torch.uint8, device="cuda")
    try:
        long_texts = [f"{t} {t} {t}" for t in texts]
        (shared / "in-oom").mkdir()
        (shared / "in-oom" / "a.txt").write_text("\n".join(long_texts) + "\n")
        job = _job(
            shared,
            "oom",
            {
                "handler": "text-embed",
                "handler_options": {"model": str(model_dir)},
                "inputs": "in-oom/*.txt",
                "outputs": "out-oom",
                "mode": "records",
                "batch_size": 4096,
                "prefetch": 2,
                "device": "cuda",
            },
        )
        before = torch.cuda.memory_stats().get("num_ooms", 0)
        summary = run_worker(job, node="gpu", install_signal_handlers=False)
        return {
            "items": summary["items"],
            "failed": summary["failed"],
            "seconds": summary["seconds"],
            "num_ooms": torch.cuda.memory_stats().get("num_ooms", 0) - before,
            "free_gb_left": round((free - filler.numel()) / 2**30, 1),
        }
    finally:
        del filler
        torch.cuda.empty_cache()


def step_assert(shared: Path, model_dir: Path, texts: list[str], device: str) -> dict[str, Any]:
    plugins = shared / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "bench_assert.py").write_text(ASSERT_PLUGIN)
    (shared / "in-assert").mkdir()
    (shared / "in-assert" / "a.txt").write_text("\n".join(texts) + "\n")
    job = _job(
        shared,
        "assert",
        {
            "handler": "bench_assert:assert_once",
            "handler_options": {"model": str(model_dir), "marker": str(shared / "asserted")},
            "inputs": "in-assert/*.txt",
            "outputs": "out-assert",
            "mode": "records",
            "chunk_size": max(1, len(texts) // 4),
            "device": "auto" if device.startswith("cuda") else "cpu",
        },
    )
    processes = "auto" if device.startswith("cuda") else "2"  # a CPU runs one child in-process
    result = subprocess.run(
        [sys.executable, "-m", "fleet.worker", str(job), "--node", "gpu", "--processes", processes],
        env=_env(plugins, FLEET_WORKER_RESTART_PAUSE_S="0.5"),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    done = len(list((job / "done").glob("*")))
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "fleet.worker", str(job), "--status"],
            env=_env(plugins), capture_output=True, text=True, check=False,
        ).stdout or "{}"
    )
    return {
        "rc": result.returncode,
        "asserted": (shared / "asserted").exists(),
        "restarted": "restarting it" in result.stderr,
        "stderr_tail": result.stderr[-1500:],
        "chunks_done": done,
        "status": status,
        "ok_finish": result.returncode == 0 and status.get("done") == status.get("total"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-config", type=Path, help="config + tokenizer of the model (random weights made here)")
    parser.add_argument("--model", type=Path, help="a complete model directory instead")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    parser.add_argument("--cpu-smoke", action="store_true", help="every CPU-safe step at tiny sizes")
    parser.add_argument("--steps", default="env,tokenizer,model,encode,worker,oom,assert")
    args = parser.parse_args()
    import torch

    steps = set(args.steps.split(","))
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = "cpu" if smoke else "cuda"
    results = Results(args.out)
    work = Path(tempfile.mkdtemp(prefix="fleet-gpu-bench-"))
    try:
        if args.model is not None:
            model_dir = args.model
        else:
            config = args.model_config
            if config is None:
                from fleet.worker.handlers.text_embed import default_model_path

                config = default_model_path()
            model_dir = make_model(config, work)
        n = 300 if smoke else 200_000
        texts = make_texts(n)
        from fleet.worker.handlers import HandlerContext
        from fleet.worker.handlers.text_embed import TextEmbedHandler

        reference = TextEmbedHandler(model=str(model_dir))
        reference.open(HandlerContext("cpu", work, "bench"))
        if "env" in steps:
            results.step("env", lambda: step_env(device))
        if "tokenizer" in steps:
            threads = [1, 2] if smoke else [1, 2, 4, 8, 16]
            results.step("tokenizer", lambda: step_tokenizer(reference, texts[: 4000 if smoke else 40_000], threads))
        dtypes = ["float32"] if smoke else ["float32", "bfloat16", "float16"]
        batches = [8] if smoke else [64, 256, 1024]
        ids = reference.prepare(texts[: max(batches) * (2 if smoke else 8)])
        model_figures: dict[str, Any] = {}
        if "model" in steps:
            model_figures = results.step("model", lambda: step_model(model_dir, device, ids, dtypes, batches))
        if "encode" in steps:
            results.step(
                "encode", lambda: step_encode(model_dir, device, texts[: 64 if smoke else 50_000], dtypes[-2:])
            )
        if "worker" in steps:
            dtype = "float32" if smoke else ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
            batch = 8 if smoke else 1024
            ceiling = model_figures.get("by_dtype_batch", {}).get(f"{dtype}/{batch}", {}).get("items_s")
            options = {
                "batch_size": batch,
                "max_batch_tokens": batch * 128,
                "reader_threads": min(16, os.cpu_count() or 4),
                "writer_threads": 4,
                "prefetch": 8,
                "chunk_size": 100 if smoke else 25_000,
                "device": device,
            }
            shared = work / "shared"
            results.step(
                "worker_records",
                lambda: step_worker(shared, model_dir, texts, "records", options, ceiling, 300),
            )
            files_options = {**options, "chunk_size": 50 if smoke else 1000}
            results.step(
                "worker_files",
                lambda: step_worker(shared, model_dir, texts[: 100 if smoke else 30_000], "files",
                                    files_options, ceiling, 240),
            )
        if "oom" in steps:
            if device == "cpu":
                results.step("oom", lambda: {"skipped": "needs a GPU's memory to run out of"})
            else:
                results.step("oom", lambda: step_oom(work / "shared-oom", model_dir, texts[:20_000]))
        if "assert" in steps:
            shared_assert = work / "shared-assert"
            results.step(
                "device_assert", lambda: step_assert(shared_assert, model_dir, texts[: 40 if smoke else 4000], device)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
