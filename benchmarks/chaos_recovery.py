"""chaos_recovery: the acceptance run of issue 4, measured.

A local fleet (head + 4 workers, `monitor.interval` 5 s) runs the real `text-embed` job
(all-MiniLM-L6-v2 over >= 2,000 docstrings of the standard library, made on the head by
`python -m fleet.worker.corpus`) twice in the same run:

1. reference: no preemption;
2. chaos: the same job (new name, new outputs) while two workers are preempted without
   notice and one with a notice (`fleet preempt --notice`), at random moments (seeded,
   the seed is printed) within the first 60 % of the reference's duration;
3. head loss: the same job again while the head is deleted (through the provider, as a
   lost VM vanishes) at a random moment within the first 40 % of the reference's work:
   `fleet run`'s monitor replaces it, the head's data disk (the shared directory, with
   the job's queue) is attached to the new one, every worker remounts it and the job
   resumes.

`fleet run` follows each job to the end by itself (its monitor replaces the lost nodes
and gives them the job). Then it checks: every input has exactly one output, a random
sample of them equals `SentenceTransformer.encode` of the text, no temporary file is
left, `fleet status` shows the replacements (generation 2) and `fleet events` the
preempted/replaced events, and `fleet down` leaves no process, mount or node directory.

Measured (from the fleet's events):
- detect_s_max: kill -> the monitor's `preempted` event (goal <= interval + 2 s);
- replace_s_mean: kill -> the `working` event of the slot's new node;
- recomputed_items / recomputed_with_notice: items computed twice after the
  preemptions without / with notice (goal: <= chunk_size per preemption / 0). Counted
  exactly: the job's handler is the bundled text-embed handler wrapped (in this file,
  loaded through the plugin interface) to append the hash of every text it embeds to a
  per-process file outside the nodes, which survives the kill; an extra computation of
  a text is charged to the preempted node that had computed it first;
- slowdown: chaos wall time / reference wall time (both from `fleet run`'s summary);
- head_recover_s: head deleted -> the first `working` event after it (the job computing
  again on the new head's shared directory); head_recomputed_items: items computed twice
  in the head-loss run (every worker's chunks in flight are lost with the head: goal <=
  head_chunks_in_flight * chunk_size); head_slowdown: its wall time / the reference's.

Env: BENCH_TEXTS (default 2000), BENCH_SEED (default: random), BENCH_KEEP=1 keeps the
temporary directory. Last line: {"detect_s_max", "replace_s_mean", "recomputed_items",
"recomputed_with_notice", "chunk_size", "slowdown", "head_recover_s",
"head_recomputed_items", ...details}.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fleet.worker.handlers import Pending
from fleet.worker.handlers.text_embed import TextEmbedHandler

N_TEXTS = int(os.environ.get("BENCH_TEXTS", "2000"))
CHUNK = 50
INTERVAL = 5.0
NOTICE_S = 5.0
WORKERS = 4
SAMPLE = 64
HERE = Path(__file__).resolve().parent
FLEET = str(Path(sys.executable).with_name("fleet"))


# -- the plugin the nodes load (`handler: chaos_recovery:counted_text_embed`) ------------------
class CountedTextEmbed(TextEmbedHandler):
    """The bundled text-embed handler; also appends sha1(text)[:16] of every embedded
    text to <count_dir>/<node>.<pid>.count, straight to the file once its batch's
    embeddings are back. The texts reach the model tokenised ahead (`prepare`): each
    prepared item remembers its text's key until the model has embedded it."""

    def __init__(self, count_dir: str, **options: Any) -> None:
        super().__init__(**options)
        self.count_dir = count_dir
        self._fd: int | None = None
        self._text_keys: dict[int, str] = {}  # id(prepared item) -> its text's key

    def prepare(self, items: list[Any]) -> list[Any]:
        prepared = super().prepare(items)
        for item, ready in zip(items, prepared):
            self._text_keys[id(ready)] = text_key(str(item))
        return prepared

    def infer_async(self, batch: list[Any]) -> Pending:
        keys = [self._text_keys.pop(id(item), None) or text_key(str(item)) for item in batch]
        return _Counted(super().infer_async(batch), lambda: self._count(keys))

    def _count(self, keys: list[str]) -> None:
        if self._fd is None:
            node = os.environ.get("FLEET_NODE_NAME", "node")
            path = os.path.join(self.count_dir, f"{node}.{os.getpid()}.count")
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._fd, "".join(key + "\n" for key in keys).encode())


class _Counted(Pending):
    """A batch on the device that counts its texts once its results are back."""

    def __init__(self, inner: Pending, on_done: Any) -> None:
        super().__init__([], inner.device_s)
        self._inner = inner
        self._on_done = on_done

    def result(self) -> Any:
        results = self._inner.result()
        self.device_s = self._inner.device_s
        self._on_done()
        return results


def counted_text_embed(**options: Any) -> CountedTextEmbed:
    return CountedTextEmbed(**options)


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


# -- driving the fleet ---------------------------------------------------------------------
class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"chaos{random.randrange(16**4):04x}"
        self.spec = root / "fleet.yaml"
        self.spec.write_text(json.dumps({
            "name": self.name, "provider": "local", "workers": {"count": WORKERS},
            # Loopback on purpose: the handler's count files (the exact number of items
            # computed twice) must survive the SIGKILL of the node that writes them, so they
            # live in a directory of this machine's, which isolated nodes cannot reach.
            "local": {"root": str(root / "nodes"), "isolation": "loopback"},
            "monitor": {"interval": INTERVAL, "grace": 15},
        }))
        self.shared = root / "nodes" / self.name / f"{self.name}-head" / "home" / "shared"

    def fleet(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FLEET, args[0], "-f", str(self.spec), *args[1:]], cwd=self.root,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def must(self, *args: str, timeout: float = 600) -> str:
        result = self.fleet(*args, timeout=timeout)
        if result.returncode != 0:
            raise SystemExit(f"fleet {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def job(self, name: str, count_dir: Path) -> Path:
        job = {
            "name": name,
            "nodes": "workers",
            "env": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(HERE)},
            "prepare": [(f'[ -d "$FLEET_SHARED/corpus" ] || "$FLEET_PYTHON" -m fleet.worker.corpus '
                         f'"$FLEET_SHARED/corpus" --limit {N_TEXTS}')],
            "worker": {
                "handler": "chaos_recovery:counted_text_embed",
                "handler_options": {"count_dir": str(count_dir)},
                "inputs": "corpus/**/*.txt",
                "outputs": f"emb-{name}",
                "batch_size": 32,
                "max_wait_ms": 10,
                "chunk_size": CHUNK,
                "lease_seconds": 15,
                "device": "cpu",
            },
        }
        path = self.root / f"{name}.yaml"
        path.write_text(json.dumps(job))
        count_dir.mkdir(parents=True, exist_ok=True)
        return path

    def done_chunks(self, name: str) -> int:
        try:
            return len([n for n in os.listdir(self.shared / "jobs" / name / "done") if not n.startswith(".")])
        except FileNotFoundError:
            return 0

    def events(self) -> list[dict[str, Any]]:
        return json.loads(self.must("events", "--json"))


def run_job(bench: Bench, path: Path) -> dict[str, Any]:
    result = bench.fleet("run", str(path), "--json", "--timeout", "900", timeout=1000)
    if result.returncode != 0:
        raise SystemExit(f"fleet run {path.name} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def work_seconds(bench: Bench, name: str) -> float:
    """From the job's first done chunk to its last (the model loads are before)."""
    times = [p.stat().st_mtime for p in (bench.shared / "jobs" / name / "done").iterdir() if not p.name.startswith(".")]
    return max(times) - min(times)


def chaos(bench: Bench, name: str, work_s: float, rng: random.Random, log: list[dict[str, Any]]) -> None:
    """Three preemptions at random moments: two without notice, one with. The moments
    fall within the first 60 % of the reference's work (first done chunk to last)."""
    deadline = time.time() + 600
    while bench.done_chunks(name) < 1 and time.time() < deadline:
        time.sleep(0.2)
    begin = time.time()
    moments = sorted(rng.uniform(0.02, 0.6) * work_s for _ in range(3))
    kinds = ["kill", "kill", "notice"]
    rng.shuffle(kinds)
    victims = rng.sample([f"{bench.name}-w{slot}-g1" for slot in range(1, WORKERS + 1)], 3)
    threads = []
    for moment, kind, victim in zip(moments, kinds, victims):
        time.sleep(max(0.0, begin + moment - time.time()))
        args = ["preempt", *(["--notice", f"{NOTICE_S:g}"] if kind == "notice" else []), victim]
        entry = {"node": victim, "kind": kind, "at_s": round(time.time() - begin, 1)}
        log.append(entry)

        def fire(args: list[str] = args, entry: dict[str, Any] = entry) -> None:
            entry["rc"] = bench.fleet(*args).returncode

        thread = threading.Thread(target=fire)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()


# -- checks and figures --------------------------------------------------------------------
def lose_head(bench: Bench, name: str, work_s: float, rng: random.Random, log: dict[str, Any]) -> None:
    """Delete the head (the provider's delete, behind fleet's back) once the job has
    done a chunk, at a random moment within the first 40 % of the reference's work."""
    from fleet.fleetops import Fleet
    from fleet.monitor import monitor_lock
    from fleet.spec.loader import load_fleet_spec

    deadline = time.time() + 600
    while bench.done_chunks(name) < 1 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(rng.uniform(0.05, 0.4) * work_s)
    claims = bench.shared / "jobs" / name / "claims"
    log["chunks_in_flight"] = len([n for n in os.listdir(claims) if not n.startswith(".")])
    # Under the fleet's monitor lock: the loss is one moment for the monitor (a local
    # node's deletion takes a while, and a pass must not see it half done).
    with Fleet(load_fleet_spec(bench.spec), bench.spec) as fleet, monitor_lock(fleet.paths.state_dir):
        log["lost_at"] = time.time()
        fleet.provider.delete([f"{bench.name}-head"])


def corpus_texts(bench: Bench) -> dict[str, str]:
    corpus = bench.shared / "corpus"
    return {str(p.relative_to(corpus)): p.read_text(encoding="utf-8") for p in sorted(corpus.rglob("*.txt"))}


def check_outputs(bench: Bench, name: str, texts: dict[str, str], rng: random.Random) -> dict[str, Any]:
    import numpy as np

    out = bench.shared / f"emb-{name}"
    found = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    expected = {f"{rel}.npy" for rel in texts}
    missing, extra = expected - found, found - expected
    temporary = [str(p) for base in (out, bench.shared / "jobs" / name) for p in base.rglob("*.tmp")]
    if missing or extra or temporary:
        raise SystemExit(f"{name}: {len(missing)} missing, extra {sorted(extra)[:5]}, temporary {temporary[:5]}")
    from sentence_transformers import SentenceTransformer

    from fleet.worker.handlers.text_embed import default_model_path

    model = SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)
    sample = rng.sample(sorted(texts), min(SAMPLE, len(texts)))
    expected_vectors = model.encode([texts[rel] for rel in sample], batch_size=32)
    worst = 0.0
    for rel, vector in zip(sample, expected_vectors):
        got = np.load(out / f"{rel}.npy")
        if got.shape != vector.shape or got.dtype != np.float32:
            raise SystemExit(f"{name}: {rel}.npy has shape {got.shape} {got.dtype}")
        worst = max(worst, float(np.abs(got - vector).max()))
    if worst > 1e-4:
        raise SystemExit(f"{name}: embeddings differ from SentenceTransformer.encode by up to {worst}")
    return {"outputs": len(found), "sample": len(sample), "max_abs_diff": worst}


def recomputation(count_dir: Path, texts: dict[str, str], victims: dict[str, str]) -> dict[str, Any]:
    """Extra computations per kind of preemption. `victims`: node -> "kill" | "notice"."""
    wanted = collections.Counter(text_key(t) for t in texts.values())
    computed_by: dict[str, list[str]] = collections.defaultdict(list)
    total = 0
    for path in sorted(count_dir.glob("*.count")):
        node = path.name.rsplit(".", 2)[0]
        for key in path.read_text().split():
            computed_by[key].append(node)
            total += 1
    extra = {"kill": 0, "notice": 0, "other": 0}
    for key, nodes in computed_by.items():
        surplus = len(nodes) - wanted.get(key, 0)
        if surplus <= 0:
            continue
        first_victim = next((victims[n] for n in nodes if n in victims), "other")
        extra[first_victim] += surplus
    missing = sum(max(0, n - len(computed_by.get(k, []))) for k, n in wanted.items())
    return {"computed": total, "extra": extra, "never_computed": missing}


def metrics_batch_items(bench: Bench, name: str) -> int:
    total = 0
    for path in (bench.shared / "jobs" / name / "metrics").glob("*.worker*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "batch":
                total += int(record["items"])
    return total


def timings(events: list[dict[str, Any]], preemptions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for entry in preemptions:
        node = entry["node"]
        killed = next((e["t"] for e in events if e["kind"] == "preempt_requested" and e["node"] == node), None)
        detected = next((e["t"] for e in events if e["kind"] == "preempted" and e["node"] == node), None)
        slot = node.rsplit("-g", 1)[0]
        new = next((e for e in events if e["kind"] == "working" and e["node"].startswith(f"{slot}-g")
                    and e["node"] != node and killed and e["t"] > killed), None)
        working = new["t"] if new else None
        entry["replaced_by"] = new["node"] if new else None
        rows.append({**entry,
                     "detect_s": round(detected - killed, 2) if killed and detected else None,
                     "replace_s": round(working - killed, 2) if killed and working else None})
    return rows


def leftovers(bench: Bench) -> list[str]:
    import psutil

    from fleet.providers.localnode import FLEET_MARKER, fuse_mounts_under

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(FLEET_MARKER) == bench.name or str(bench.root) in " ".join(proc.cmdline()):
                found.append(" ".join(proc.cmdline()))
        except (psutil.Error, OSError):
            continue
    found += [f"mount {m}" for m in fuse_mounts_under(bench.root)]
    node_dir = bench.root / "nodes" / bench.name
    if node_dir.exists() and any(node_dir.iterdir()):
        found.append(f"node directories in {node_dir}")
    return found


def main() -> int:
    seed = int(os.environ.get("BENCH_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="fleet-chaos-"))
    bench = Bench(root)
    print(f"chaos_recovery: seed {seed}, {N_TEXTS} texts, {WORKERS} workers, chunk {CHUNK}, in {root}", flush=True)
    figures: dict[str, Any] = {}
    try:
        started = time.time()
        bench.must("up")
        print(f"up in {time.time() - started:.1f} s", flush=True)

        reference = run_job(bench, bench.job("embed-ref", root / "counts-ref"))
        print(f"reference: {reference}", flush=True)

        name = "embed-chaos"
        count_dir = root / "counts-chaos"
        path = bench.job(name, count_dir)
        preemptions: list[dict[str, Any]] = []
        reference_work_s = work_seconds(bench, "embed-ref")
        thread = threading.Thread(target=chaos, args=(bench, name, reference_work_s, rng, preemptions))
        thread.start()
        result = run_job(bench, path)
        thread.join()
        print(f"chaos: {result}; preemptions {preemptions}", flush=True)

        head_name = "embed-head"
        head_counts = root / "counts-head"
        head_path = bench.job(head_name, head_counts)
        head_log: dict[str, Any] = {}
        thread = threading.Thread(target=lose_head, args=(bench, head_name, reference_work_s, rng, head_log))
        thread.start()
        head_result = run_job(bench, head_path)
        thread.join()
        print(f"head loss: {head_result}; {head_log}", flush=True)

        texts = corpus_texts(bench)
        if len(texts) < 2000 <= N_TEXTS:
            raise SystemExit(f"the corpus has only {len(texts)} texts")
        checked_ref = check_outputs(bench, "embed-ref", texts, rng)
        checked = check_outputs(bench, name, texts, rng)
        checked_head = check_outputs(bench, head_name, texts, rng)
        recompute_head = recomputation(head_counts, texts, {})
        victims = {p["node"]: p["kind"] for p in preemptions}
        recompute = recomputation(count_dir, texts, victims)
        recompute_ref = recomputation(root / "counts-ref", texts, {})
        if recompute["never_computed"] or recompute_ref["never_computed"]:
            raise SystemExit(f"texts never computed: {recompute['never_computed']} / {recompute_ref['never_computed']}")

        events = bench.events()
        rows = timings(events, preemptions)
        lost_at = head_log.get("lost_at")
        back = next((e["t"] for e in events if e["kind"] == "working" and lost_at and e["t"] > lost_at), None)
        head_replaced = any(e["kind"] == "replaced" and e["node"] == f"{bench.name}-head" and lost_at
                            and e["t"] > lost_at for e in events)
        status = bench.must("status")
        replaced_nodes = [e["node"] for e in events if e["kind"] == "replaced"]
        for row in rows:
            row["in_status"] = bool(row["replaced_by"]) and row["replaced_by"] in status
            row["replaced_event"] = row["replaced_by"] in replaced_nodes
        print(status, flush=True)
        print("events: " + ", ".join(f"{e['kind']} {e['node']}" for e in events
                                     if e["kind"] in ("preempted", "replaced", "working", "swept")
                                     and e["t"] >= started), flush=True)

        recomputed_metrics = metrics_batch_items(bench, name) - result["total"]
        down = bench.fleet("down", "--yes")
        left = leftovers(bench)
        detects = [r["detect_s"] for r in rows if r["detect_s"] is not None]
        replaces = [r["replace_s"] for r in rows if r["replace_s"] is not None]
        figures = {
            "detect_s_max": max(detects) if detects else None,
            "replace_s_mean": round(sum(replaces) / len(replaces), 2) if replaces else None,
            "recomputed_items": recompute["extra"]["kill"] + recompute["extra"]["other"],
            "recomputed_with_notice": recompute["extra"]["notice"],
            "chunk_size": CHUNK,
            "slowdown": round(result["seconds"] / reference["seconds"], 3),
            "head_recover_s": round(back - lost_at, 2) if back and lost_at else None,
            "head_recomputed_items": recompute_head["computed"] - len(texts),
            "head_chunks_in_flight": head_log.get("chunks_in_flight"),
            "head_slowdown": round(head_result["seconds"] / reference["seconds"], 3),
            "head_replaced": head_replaced,
            "preemptions_without_notice": sum(1 for p in preemptions if p["kind"] == "kill"),
            "recomputed_metrics": recomputed_metrics,
            "recomputed_reference": recompute_ref["computed"] - len(texts),
            "items": result["total"],
            "reference_s": reference["seconds"],
            "reference_work_s": round(reference_work_s, 1),
            "chaos_s": result["seconds"],
            "replacements": result["replacements"],
            "detect_goal_s": INTERVAL + 2,
            "per_preemption": rows,
            "sample_checked": checked["sample"] + checked_ref["sample"] + checked_head["sample"],
            "max_abs_diff": max(checked["max_abs_diff"], checked_ref["max_abs_diff"], checked_head["max_abs_diff"]),
            "down_rc": down.returncode,
            "left_after_down": left,
            "seed": seed,
            "ok": bool(down.returncode == 0 and not left and result["done"] == len(texts)
                       and all(r["replaced_by"] and r["in_status"] for r in rows)
                       and head_result["done"] == len(texts) and head_replaced),
        }
    finally:
        if not figures:
            bench.fleet("down", "--yes")
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures))
    return 0 if figures.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
