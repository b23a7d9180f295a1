"""One worker process: claim chunks, feed them to the pipeline, until no work is left.

`run_worker()` loads the job's `worker:` settings, freezes the chunk list (first worker
only), and loops:

- while the pipeline wants more input, claim the next chunk (shuffled order, takeover
  of stale claims) and hand it to the pipeline;
- when nothing is claimable but other workers still hold chunks, wait and look again
  (their chunks come back to the queue if their leases expire);
- when every chunk is done, finish and return.

A heartbeat thread keeps the leases of the chunks in hand alive. SIGTERM or SIGINT (or
setting `stop`) stops claiming; the chunks in hand are finished within `STOP_GRACE_S`
or released (bulk I/O: at once, with what was computed, see `fleet.worker.pipeline`),
and the function returns normally. A job that is already finished returns
at once, without loading the model.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from fleet.worker.claims import ChunkQueue
from fleet.worker.cpus import share_cpus
from fleet.worker.errors import WorkerError, WorkerFailed
from fleet.worker.handlers import HandlerContext, load_handler, resolve_device, resolve_dtype
from fleet.worker.inputs import freeze
from fleet.worker.layout import JobLayout, load_worker_config
from fleet.worker.metrics import FailureLog, JsonLinesLog, WorkerMetrics
from fleet.worker.pipeline import Pipeline

STOP_GRACE_S = 3.0
MAX_POLL_S = 2.0
MAX_QUEUE_ERRORS = 5
MOUNT_GONE = {errno.ENOTCONN, errno.ESTALE, errno.ESHUTDOWN}


def node_name(explicit: str | None = None) -> str:
    name = explicit or os.environ.get("FLEET_NODE_NAME") or socket.gethostname()
    if not name or "/" in name or name.startswith(".") or len(name) > 200:
        raise WorkerError(f"invalid node name {name!r}")
    return name


class _Stopper:
    """SIGTERM/SIGINT -> stop event (only in the main thread; restored afterwards)."""

    def __init__(self, stop: threading.Event, wake: threading.Event, install: bool) -> None:
        self.stop = stop
        self.wake = wake
        self.previous: dict[int, Any] = {}
        self.finished = False
        if install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop.set()
        self.wake.set()

    def restore(self) -> None:
        self.finished = True
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _relay(stop: threading.Event, wake: threading.Event, stopper: _Stopper) -> None:
    """Wake the claim loop when a caller-provided stop event is set."""
    while not stopper.finished:
        if stop.wait(0.5):
            wake.set()
            return


def run_worker(
    job_dir: str | os.PathLike[str],
    *,
    node: str | None = None,
    proc: int = 0,
    device: str | None = None,
    stop: threading.Event | None = None,
    install_signal_handlers: bool = True,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Process the job in `job_dir` until no work is left (or stopped). Returns the
    summary (the "stop" metrics line; `{"reason": "nothing-to-do", ...}` when the job
    was finished already). Raises WorkerError on a fatal problem."""
    layout = JobLayout.at(job_dir)
    node = node_name(node)
    config = load_worker_config(layout)
    layout.make_dirs()
    chunks = freeze(layout, config)
    handler = load_handler(config.handler, config.handler_options)
    queue = ChunkQueue(
        layout,
        [c.id for c in chunks.chunks],
        node=node,
        proc=proc,
        lease_seconds=config.lease_seconds,
        clock=clock,
    )
    queue.refresh()
    if queue.all_done():
        return {
            "kind": "stop",
            "node": node,
            "proc": proc,
            "items": 0,
            "failed": 0,
            "chunks": 0,
            "reason": "nothing-to-do",
        }

    external_stop = stop is not None
    stop = stop or threading.Event()
    wake = threading.Event()
    stopper = _Stopper(stop, wake, install_signal_handlers)
    if external_stop:
        threading.Thread(
            target=_relay, args=(stop, wake, stopper), name="fleet-stop-relay", daemon=True
        ).start()
    try:
        resolved = resolve_device(device or config.device, handler.uses_device)
        metrics = WorkerMetrics(
            JsonLinesLog(layout.metrics_file(node, proc)), node=node, proc=proc, device=resolved
        )
        failures = FailureLog(layout.failures_file(node, proc), node=node, proc=proc)
        dtype = resolve_dtype(config.dtype or "auto", resolved) if handler.uses_device else "float32"
        handler.open(HandlerContext(resolved, layout.shared_root, node, dtype))
        metrics.start(
            dtype=dtype,
            gpu=os.environ.get("CUDA_VISIBLE_DEVICES"),
            handler=config.handler,
            mode=config.mode,
            batch_size=config.batch_size,
            job=layout.job_name,
            chunks=len(chunks.chunks),
            items_total=chunks.total,
        )
        pipeline = Pipeline(
            handler=handler,
            config=config,
            layout=layout,
            chunks=chunks,
            queue=queue,
            metrics=metrics,
            failures=failures,
            on_change=wake.set,
        )
        heartbeat = _Heartbeat(queue, config.effective_heartbeat_seconds, wake)
        reason = "error"
        try:
            reason = _claim_loop(
                queue, pipeline, stop, wake, poll_s=min(MAX_POLL_S, config.effective_heartbeat_seconds)
            )
        finally:
            if reason == "done":
                pipeline.close()
            else:
                pipeline.stop(STOP_GRACE_S)
            heartbeat.close()
            failures.close()
        if pipeline.fatal is not None:
            reason = "error"
        summary = metrics.stop(reason)
        if pipeline.fatal is not None:
            exc = pipeline.fatal
            if isinstance(exc, WorkerError):  # DeviceFailed: exit 3, to be restarted fresh
                raise exc
            raise WorkerFailed(f"worker stopped: {type(exc).__name__}: {exc}") from exc
        return summary
    finally:
        stopper.restore()


def _claim_loop(
    queue: ChunkQueue, pipeline: Pipeline, stop: threading.Event, wake: threading.Event, *, poll_s: float
) -> str:
    errors = 0
    while not stop.is_set():
        if pipeline.fatal is not None:
            return "error"
        if pipeline.wants_work():
            try:
                claim = queue.next_claim()
                errors = 0
            except OSError as exc:
                # A hiccup of the shared filesystem: look again a little later.
                errors += 1
                if exc.errno in MOUNT_GONE or errors > MAX_QUEUE_ERRORS:
                    raise WorkerFailed(f"the job directory is not usable: {exc}") from exc
                stop.wait(min(poll_s, 1.0) * errors)
                continue
            if claim is not None:
                pipeline.add_chunk(claim)
                continue
            if pipeline.idle() and queue.all_done():
                return "done"
        wake.wait(poll_s)
        wake.clear()
    return "signal"


class _Heartbeat:
    """Refreshes the leases of the chunks in hand every `interval` seconds."""

    def __init__(self, queue: ChunkQueue, interval: float, wake: threading.Event) -> None:
        self.queue = queue
        self.interval = interval
        self.wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.queue.heartbeat():
                    self.wake.set()
            except OSError:
                pass  # the next beat tries again; the lease margin covers a missed one

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_child(job_dir: str, node: str, proc: int, gpu: str | None, device: str | None, of: int = 1) -> None:
    """Entry point of one spawned worker process (`--processes`, `of` of them): pins its
    GPU first, before anything can initialise CUDA; without one, takes its share of the
    node's cores."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        device = "cuda"
    else:
        share_cpus(of)
    try:
        summary = run_worker(job_dir, node=node, proc=proc, device=device)
    except WorkerError as exc:
        print(f"fleet-worker[{proc}]: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - one line, like the single-process CLI
        print(f"fleet-worker[{proc}]: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(1 if summary.get("reason") == "error" else 0)
