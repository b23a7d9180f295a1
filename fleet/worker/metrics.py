"""What a worker process records: stage timings (metrics) and failed items (failures).

Each worker process appends to its own files (one writer per file; never several
writers appending to one file over sshfs):

JOB_DIR/metrics/<node>.worker<proc>.jsonl, one JSON object per line:

    {"t": 1712.5, "kind": "start", "node": "w1", "proc": 0, "pid": 4242, "device": "cuda",
     "handler": "text-embed", "mode": "files", "batch_size": 64, "job": "embed"}
    {"t": ..., "kind": "batch", "node", "proc", "device", "items": 64, "batches": 1,
     "read_s": 0.11, "wait_s": 0.002, "compute_s": 0.35, "write_s": 0.02, "model_s": 0.3}
    {"t": ..., "kind": "chunk", "node", "proc", "chunk": "c000012", "items": 100,
     "failed": 0, "skipped": 0, "seconds": 2.1, "resumed": false}
    {"t": ..., "kind": "stop", "node", "proc", "device", "items": 2000, "failed": 3,
     "chunks": 20, "seconds": 61.0, "items_s": 32.8, "reason": "done"|"signal"|"error"}

`t` is the Unix time of the line. In "batch" lines: `items` is the number of items
computed, `batches` how many consecutive batches the line covers (batches shorter than
0.2 s are merged into one line, so tiny items do not flood the file; sum the fields),
`read_s` the reader-thread time spent loading and preparing (tokenising) those items
(summed over threads, so it can exceed wall time), `wait_s` the compute thread's idle
wait for input, `compute_s` the compute thread's time on the batch (collating, starting
it, waiting for its results), `model_s` the model's own time on the device (CUDA events
around the forward pass; on the CPU, and for handlers without their own timing, the
wall time of the model call), `write_s` the writer-thread time spent on their outputs (in
records mode outputs are written per chunk: see "chunk" lines' `write_s`). `items_s` in
"stop" is items / seconds over the whole run, idle waits included.

JOB_DIR/failures/<node>.<proc>.jsonl, one line per item that failed and was skipped:

    {"t": ..., "node": "w1", "proc": 0, "chunk": "c000012", "token": "<claim token>",
     "item": "docs/a.txt", "stage": "load"|"infer"|"write", "error": "UnicodeDecodeError: ..."}

(`token` is the claim's: a failure counts only if the same claim marked the chunk done.
A holder stopped mid-chunk may have recorded failures, e.g. reads through a mount that
vanished under it, of items its successor then computed.)

(records mode, a whole unreadable segment: one line with "items": N standing for its N
records, "item" naming its first line.)

Lines are flushed at least once a second (failures: at once); a reader must ignore a
last line that does not parse yet.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

COALESCE_SECONDS = 0.2


class JsonLinesLog:
    """Append-only JSON lines file owned by one process; buffered, thread-safe."""

    def __init__(self, path: Path, *, flush_interval: float = 1.0) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._last_flush = time.monotonic()
        self._handle: Any = None

    def write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            self._pending.append(line)
            if time.monotonic() - self._last_flush >= self.flush_interval:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._handle.write("".join(self._pending))
        self._handle.flush()
        self._pending.clear()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            if self._handle is not None:
                self._handle.close()
                self._handle = None


class WorkerMetrics:
    """The metric lines of one worker process (format in the module docstring)."""

    def __init__(self, log: JsonLinesLog, *, node: str, proc: int, device: str) -> None:
        self.log = log
        self.node = node
        self.proc = proc
        self.device = device
        self._lock = threading.Lock()
        self._acc = self._empty()
        self._acc_started = time.monotonic()
        self.items = 0
        self.failed = 0
        self.chunks = 0
        self.started = time.monotonic()

    @staticmethod
    def _empty() -> dict[str, float]:
        return {
            "items": 0,
            "batches": 0,
            "read_s": 0.0,
            "wait_s": 0.0,
            "compute_s": 0.0,
            "write_s": 0.0,
            "model_s": 0.0,
            "model_batches": 0,
        }

    def _base(self, kind: str) -> dict[str, Any]:
        return {"t": round(time.time(), 3), "kind": kind, "node": self.node, "proc": self.proc}

    def start(self, **info: Any) -> None:
        self.started = time.monotonic()
        self.log.write({**self._base("start"), "pid": os.getpid(), "device": self.device, **info})
        self.log.flush()

    def batch(
        self,
        *,
        items: int,
        read_s: float,
        wait_s: float,
        compute_s: float,
        write_s: float,
        model_s: float | None = None,
    ) -> None:
        with self._lock:
            acc = self._acc
            acc["items"] += items
            acc["batches"] += 1
            acc["read_s"] += read_s
            acc["wait_s"] += wait_s
            acc["compute_s"] += compute_s
            acc["write_s"] += write_s
            if model_s is not None:
                acc["model_s"] += model_s
                acc["model_batches"] += 1
            self.items += items
            if time.monotonic() - self._acc_started >= COALESCE_SECONDS:
                self._emit_locked()

    def _emit_locked(self) -> None:
        acc = self._acc
        if acc["batches"]:
            line = {
                **self._base("batch"),
                "device": self.device,
                "items": int(acc["items"]),
                "batches": int(acc["batches"]),
            }
            for key in ("read_s", "wait_s", "compute_s", "write_s"):
                line[key] = round(acc[key], 6)
            if acc["model_batches"]:
                line["model_s"] = round(acc["model_s"], 6)
            self.log.write(line)
        self._acc = self._empty()
        self._acc_started = time.monotonic()

    def chunk(self, **info: Any) -> None:
        with self._lock:
            self.chunks += 1
            self.failed += int(info.get("failed", 0))
        self.log.write({**self._base("chunk"), **info})

    def stop(self, reason: str) -> dict[str, Any]:
        with self._lock:
            self._emit_locked()
        seconds = time.monotonic() - self.started
        line = {
            **self._base("stop"),
            "device": self.device,
            "items": self.items,
            "failed": self.failed,
            "chunks": self.chunks,
            "seconds": round(seconds, 3),
            "items_s": round(self.items / seconds, 3) if seconds > 0 else 0.0,
            "reason": reason,
        }
        self.log.write(line)
        self.log.close()
        return line


class FailureLog:
    """failures/<node>.<proc>.jsonl (format in the module docstring)."""

    def __init__(self, path: Path, *, node: str, proc: int) -> None:
        self.log = JsonLinesLog(path, flush_interval=0.0)
        self.node = node
        self.proc = proc

    def record(
        self, *, chunk: str, token: str, item: str, stage: str, error: BaseException | str, items: int = 1
    ) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        row = {
            "t": round(time.time(), 3),
            "node": self.node,
            "proc": self.proc,
            "chunk": chunk,
            "token": token,
            "item": item,
            "stage": stage,
            "error": text[:2000],
        }
        if items != 1:
            row["items"] = items
        self.log.write(row)

    def close(self) -> None:
        self.log.close()
