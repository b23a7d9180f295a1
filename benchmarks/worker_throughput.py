"""worker_throughput: the worker's text-embed items/s against the in-memory ceiling.

Ceiling: `SentenceTransformer.encode` on the same texts held in memory, same batch size
(64), same device, one process, in a thread of its own as the worker's model runs in
its compute thread. Worker: `fleet.worker` on the same texts stored one per
file, read from a local directory and from a real sshfs mount (a real OpenSSH server on
loopback), run in this same process (same torch threads; the jobs' handler is the
bundled text-embed handed the model already loaded here). The worker's rate counts
from its "start" metrics line (model loaded) to the end of the job: reading, batching,
inference, writing every output (.npy, tmp + rename), done markers.

This machine is shared (its speed swings by 2x within a minute), so the runs
interleave: C L0 C S0 C L1 C S1 C ... where C is a ceiling run on all the texts, L a
worker job on their local files, S a worker job on them over sshfs, each over the whole
corpus (a job's fixed costs, start and the last partial batch, are paid once per job as
in real use). Each worker run is compared with the mean of the two ceiling runs around
it; the ratios reported are the medians over the rounds, the items/s are totals.
`model_busy_*` is the fraction of the worker's wall time spent
inside the model (its own metrics): a figure the machine's drift does not move.
`ratio_*_cpu` compare items per CPU-second of this process,
which the other tenants of the machine move far less than wall time (the CPU of the
sshfs/ssh client processes is not in it: the wall-clock ratio is the one that counts).

B (BENCH_BULK=1, the default) is the sshfs run again with `io: bulk`: the head's packer
(`fleet.worker.packer`, a process on the head's local directory, as `fleet run` starts
it) packs each chunk's inputs into one file and unpacks its outputs, so the worker moves
one file per chunk through the mount each way (`ratio_bulk`, `model_busy_bulk`).

Last line: {"ceiling_items_s", "local_items_s", "sshfs_items_s", "ratio_local",
"ratio_sshfs", "ratio_bulk", ...details}. Goal: ratio_local >= 0.95, ratio_sshfs >= 0.90.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _sshfs import sshd_head

N_TEXTS = int(os.environ.get("BENCH_TEXTS", "2000"))
BATCH = 64
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
# "bulk": the same sshfs mount with io: bulk and the head's packer (BENCH_BULK=0 leaves it out).
MODES = ("local", "sshfs", "bulk") if os.environ.get("BENCH_BULK", "1") != "0" else ("local", "sshfs")
WORDS = [
    "the",
    "a",
    "fleet",
    "of",
    "cheap",
    "machines",
    "runs",
    "big",
    "offline",
    "batch",
    "jobs",
    "while",
    "nodes",
    "vanish",
    "and",
    "come",
    "back",
    "shared",
    "disk",
    "over",
    "sshfs",
    "holds",
    "millions",
    "of",
    "small",
    "files",
    "each",
    "worker",
    "claims",
    "chunks",
    "with",
    "leases",
    "embeddings",
    "vectors",
    "model",
    "inference",
    "throughput",
    "latency",
    "preemption",
    "spot",
    "instance",
    "gpu",
]


def make_texts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        # Short, ragged texts (median ~9 words): this 2-core CPU embeds ~100 of them a second.
        words = max(2, min(60, int(rng.lognormvariate(2.2, 0.6))))
        texts.append(" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + ".")
    return texts


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ceiling(model, texts: list[str], cpu_log: list[float] | None = None) -> float:
    """encode() on the texts in memory, in a fresh thread like the worker's compute thread
    (on this CPU, torch's OpenMP team runs at a different speed in the main thread)."""
    seconds: list[float] = []

    def encode() -> None:
        started = time.perf_counter()
        model.encode(texts, batch_size=BATCH, convert_to_numpy=True, show_progress_bar=False)
        seconds.append(time.perf_counter() - started)

    cpu_before = cpu_seconds()
    thread = threading.Thread(target=encode)
    thread.start()
    thread.join()
    if cpu_log is not None:
        cpu_log.append(len(texts) / (cpu_seconds() - cpu_before))
    return len(texts) / seconds[0]


_LOADED: dict[str, object] = {}


def preloaded_text_embed(**options: object):
    """The bundled text-embed handler, given the model this process loaded already (so
    that 16 worker runs do not load it 16 times: its load is not part of the figure)."""
    from fleet.worker.handlers import HandlerContext
    from fleet.worker.handlers.text_embed import TextEmbedHandler

    class Preloaded(TextEmbedHandler):
        def open(self, context: HandlerContext) -> None:
            self.attach(_LOADED["model"], context)

    return Preloaded(**options)  # type: ignore[arg-type]


def start_packer(job: Path) -> subprocess.Popen[bytes]:
    """The head's packer for an `io: bulk` job, working on the head's local directory as
    `fleet run` starts it there (fleet.worker.packer); ready before the worker starts."""
    from fleet.worker.inputs import freeze
    from fleet.worker.layout import JobLayout, load_worker_config

    layout = JobLayout.at(job)
    freeze(layout, load_worker_config(layout))
    packer = subprocess.Popen(
        [sys.executable, "-P", "-m", "fleet.worker.packer", str(job)],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 60
    while not (job / "bulk" / "packer.json").exists():
        if time.monotonic() > deadline or packer.poll() is not None:
            raise SystemExit("the packer did not start")
        time.sleep(0.01)
    return packer


def stop_packer(packer: subprocess.Popen[bytes]) -> None:
    try:
        packer.wait(timeout=30)  # it exits by itself once every chunk is done
    except subprocess.TimeoutExpired:
        packer.kill()
        packer.wait()


def run_job(shared_view: Path, name: str, expected: int) -> dict:
    from fleet.worker.runner import run_worker

    cpu_before = cpu_seconds()
    summary = run_worker(shared_view / "jobs" / name, node=f"bench-{name}", install_signal_handlers=False)
    summary["cpu_items_s"] = summary["items"] / max(1e-6, cpu_seconds() - cpu_before)
    if summary["items"] != expected or summary["failed"]:
        raise SystemExit(f"worker run {name} processed {summary['items']} items, {summary['failed']} failed")
    return summary


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from fleet.worker.handlers.text_embed import default_model_path

    texts = make_texts(N_TEXTS)
    root = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    try:
        shared = root / "shared"
        for i, text in enumerate(texts):
            path = shared / "corpus" / f"t{i:05d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for q in range(ROUNDS):
            for mode in MODES:
                job = shared / "jobs" / f"{mode}{q}"
                job.mkdir(parents=True)
                worker = {
                    "handler": "worker_throughput:preloaded_text_embed",
                    "inputs": "corpus/*.txt",
                    "outputs": f"out/{mode}{q}",
                    "batch_size": BATCH,
                    "device": "cpu",
                    "io": "bulk" if mode == "bulk" else "mount",
                }
                (job / "job.yaml").write_text(yaml.safe_dump({"name": f"{mode}{q}", "worker": worker}))

        model = SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)
        _LOADED["model"] = model
        sys.modules.setdefault("worker_throughput", sys.modules[__name__])  # the jobs' handler lives here
        model.encode(texts[:128], batch_size=BATCH, show_progress_bar=False)  # warm up
        ceilings: list[float] = []
        ceilings_cpu: list[float] = []
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        ratios: dict[str, list[float]] = {k: [] for mode in MODES for k in (mode, mode + "_cpu")}
        with sshd_head() as mount:
            mounted = mount(shared, root / "mnt")
            for q in range(ROUNDS):
                for mode in MODES:
                    view = shared if mode == "local" else mounted
                    if not ceilings:
                        ceilings.append(ceiling(model, texts, ceilings_cpu))
                    before, before_cpu = ceilings[-1], ceilings_cpu[-1]
                    packer = start_packer(shared / "jobs" / f"{mode}{q}") if mode == "bulk" else None
                    try:
                        summary = run_job(view, f"{mode}{q}", len(texts))
                    finally:
                        if packer is not None:
                            stop_packer(packer)
                    after = ceiling(model, texts, ceilings_cpu)
                    ceilings.append(after)
                    runs[mode].append(summary)
                    ratios[mode].append(summary["items_s"] / ((before + after) / 2))
                    ratios[mode + "_cpu"].append(
                        summary["cpu_items_s"] / ((before_cpu + ceilings_cpu[-1]) / 2)
                    )

        def total_rate(mode: str) -> float:
            return sum(r["items"] for r in runs[mode]) / sum(r["seconds"] for r in runs[mode])

        def model_busy(mode: str) -> float:
            compute = 0.0
            for q in range(ROUNDS):
                for line in (shared / "jobs" / f"{mode}{q}" / "metrics").glob("*.jsonl"):
                    for row in map(json.loads, line.read_text().splitlines()):
                        compute += row.get("compute_s", 0.0) if row["kind"] == "batch" else 0.0
            return compute / sum(r["seconds"] for r in runs[mode])

        result = {
            "ceiling_items_s": round(statistics.median(ceilings), 2),
            "local_items_s": round(total_rate("local"), 2),
            "sshfs_items_s": round(total_rate("sshfs"), 2),
            "ratio_local": round(statistics.median(ratios["local"]), 3),
            "ratio_sshfs": round(statistics.median(ratios["sshfs"]), 3),
            "ratio_local_cpu": round(statistics.median(ratios["local_cpu"]), 3),
            "ratio_sshfs_cpu": round(statistics.median(ratios["sshfs_cpu"]), 3),
            "model_busy_local": round(model_busy("local"), 3),
            "model_busy_sshfs": round(model_busy("sshfs"), 3),
            **(
                {
                    "bulk_items_s": round(total_rate("bulk"), 2),
                    "ratio_bulk": round(statistics.median(ratios["bulk"]), 3),
                    "ratio_bulk_cpu": round(statistics.median(ratios["bulk_cpu"]), 3),
                    "model_busy_bulk": round(model_busy("bulk"), 3),
                    "ratios_bulk": [round(r, 3) for r in ratios["bulk"]],
                }
                if "bulk" in MODES
                else {}
            ),
            "texts": N_TEXTS,
            "batch_size": BATCH,
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "ceiling_runs_items_s": [round(c, 1) for c in ceilings],
            "ratios_local": [round(r, 3) for r in ratios["local"]],
            "ratios_sshfs": [round(r, 3) for r in ratios["sshfs"]],
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
