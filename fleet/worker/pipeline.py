"""The pipeline of one worker process: reader threads -> batcher -> model -> writers.

    add_chunk(claim) ─▶ reader pool ──put──▶ BatchQueue ──get_batch──▶ compute thread
                        (load + handler.load,  (bounded: prefetch      (handler.infer, OOM
                         one task per file or   x batch_size items;     split + adapt, memo)
                         per records segment)   buckets by length)            │
                                                                               ▼
                 done/<chunk>  ◀── settle (all items resolved) ◀── writer pool (tmp + rename)

Items of several chunks flow together, so batches stay full across chunk boundaries.
A chunk "settles" when every one of its items is written or recorded as failed: then
(records mode) its rows are written, and it is marked done - unless its claim was lost
(another worker took it) or the chunk is incomplete (stopped mid-way), in which case it
is released with its outputs so far kept.

Failures: an item that fails to load, infer or serialize is recorded and skipped. A
batch that raises is split in halves until the failing items are isolated; a CUDA
out-of-memory also halves the batch size, which grows back by a quarter after 50 clean
batches. An OSError while writing outputs, or the shared mount going away, is fatal for
the worker (the chunk is not marked done; another worker will redo it).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.worker.batcher import BatchQueue, QueueClosed
from fleet.worker.bulk import RELEASE_ACK_S, BulkClient, OutputPack, scratch_root
from fleet.worker.claims import ChunkQueue, Claim
from fleet.worker.config import WorkerConfig
from fleet.worker.handlers import Handler, is_out_of_memory
from fleet.worker.inputs import Chunk, ChunkList, Segment, is_json_lines, read_segment
from fleet.worker.layout import TMP_SUFFIX, JobLayout, dumps, write_atomic
from fleet.worker.metrics import FailureLog, WorkerMetrics

MEMO_LIMIT = 100_000
GROW_AFTER_BATCHES = 50
_MOUNT_GONE = {errno.ENOTCONN, errno.ESTALE, errno.ESHUTDOWN}


@dataclass(slots=True, eq=False)
class Item:
    run: ChunkRun
    order: tuple[int, int]  # sort key within the chunk (files: (0, position); records: (segment, line))
    key: str  # "REL" or "REL:LINE"
    data: Any
    load_s: float
    digest: bytes | None = None


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ChunkRun:
    """A claimed chunk on its way through the pipeline."""

    def __init__(self, claim: Claim, chunk: Chunk) -> None:
        self.claim = claim
        self.chunk = chunk
        self.lock = threading.Lock()
        self.pending = 1  # outstanding items + read tasks + the token held while submitting
        self.ok = 0
        self.failed = 0
        self.skipped = 0
        self.incomplete = False
        self.rows: list[tuple[tuple[int, int], str, Any]] = []
        self.started = time.monotonic()
        self.settled = threading.Event()
        self.outcome = ""
        # Bulk I/O (fleet.worker.bulk): the chunk's fetched inputs and its gathered outputs.
        self.local: dict[str, bytes | Path] | None = None
        self.outputs: OutputPack | None = None


class _BatchWrites:
    """Counts down the writer tasks of one batch, then records the batch's metrics."""

    def __init__(self, parts: int, metrics: WorkerMetrics, **timings: Any) -> None:
        self.parts = parts
        self.write_s = 0.0
        self.lock = threading.Lock()
        self.metrics = metrics
        self.timings = timings

    def part_done(self, seconds: float) -> None:
        with self.lock:
            self.parts -= 1
            self.write_s += seconds
            last = self.parts == 0
        if last:
            self.metrics.batch(write_s=self.write_s, **self.timings)


class Pipeline:
    def __init__(
        self,
        *,
        handler: Handler,
        config: WorkerConfig,
        layout: JobLayout,
        chunks: ChunkList,
        queue: ChunkQueue,
        metrics: WorkerMetrics,
        failures: FailureLog,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.handler = handler
        self.config = config
        self.layout = layout
        self.chunks = chunks
        self.queue = queue
        self.metrics = metrics
        self.failures = failures
        self.on_change = on_change
        self.records = chunks.mode == "records"
        self.base = chunks.base_path(layout)
        self.out_dir = layout.resolve(config.outputs)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_batch = config.batch_size
        self._clean_batches = 0
        self.max_wait_s = config.max_wait_ms / 1000.0
        capacity = config.prefetch * config.batch_size
        self.want_backlog = config.batch_size
        bucket = config.bucket_by_length and type(handler).size is not Handler.size  # size() defined
        self.batches: BatchQueue[Item] = BatchQueue(
            capacity, (lambda item: handler.size(item.data)) if bucket else None
        )
        self.memo: dict[bytes, Any] | None = {} if config.memoize else None
        self.runs: dict[str, ChunkRun] = {}
        self._by_id = chunks.by_id()
        self._lock = threading.Lock()
        self._backlog = 0
        self._made_dirs: set[Path] = set()
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self.fatal: BaseException | None = None
        self.readers = ThreadPoolExecutor(config.reader_threads, thread_name_prefix="fleet-reader")
        self.writers = ThreadPoolExecutor(config.writer_threads, thread_name_prefix="fleet-writer")
        self.bulk: BulkClient | None = None
        if not self.records and config.io != "mount":
            self.bulk = BulkClient(layout, self.out_dir, scratch_root(config))
            queue.prefer = self.bulk.packed
            # Deliveries wait for the head's ack: off the writer threads.
            self.deliveries = ThreadPoolExecutor(2, thread_name_prefix="fleet-deliver")
        self._compute = threading.Thread(
            target=self._guarded(self._compute_loop), name="fleet-compute", daemon=True
        )
        self._compute.start()

    # -- control (runner thread) -------------------------------------------------------
    def wants_work(self) -> bool:
        """True when fewer than a batch of claimed items are waiting to be read."""
        return self._backlog < self.want_backlog and not self._stopping.is_set()

    def idle(self) -> bool:
        return not self.runs

    def add_chunk(self, claim: Claim) -> ChunkRun:
        chunk = self._by_id[claim.chunk]
        run = ChunkRun(claim, chunk)
        with self._lock:
            self.runs[chunk.id] = run
        if self.records:
            with run.lock:
                run.pending += len(chunk.segments)
            self._add_backlog(sum(segment.items for segment in chunk.segments))
            for number, segment in enumerate(chunk.segments):
                self.readers.submit(self._guarded(self._read_segment), run, number, segment)
        else:
            rels = self.chunks.chunk_files(chunk)
            todo = list(enumerate(rels))
            if claim.resumed:
                existing = self._existing_outputs(rels)
                todo = [(i, rel) for i, rel in todo if rel not in existing]
                run.skipped = len(rels) - len(todo)
            with run.lock:
                run.pending += len(todo)
            self._add_backlog(len(todo))
            if self.bulk is not None and todo and self.bulk.active():
                with run.lock:
                    run.pending += 1  # the fetch task
                self.readers.submit(self._guarded(self._fetch_chunk), run, todo)
            else:
                for position, rel in todo:
                    self.readers.submit(self._guarded(self._read_file), run, position, rel)
        self._resolve(run)  # drop the submitting token
        return run

    def _fetch_chunk(self, run: ChunkRun, todo: list[tuple[int, str]]) -> None:
        """Bulk I/O: the chunk's inputs from one pack, loaded here in one pass (as a records
        segment is); inputs the pack lacks are read through the mount one by one."""
        assert self.bulk is not None
        local: dict[str, bytes | Path] | None = None
        if not (self._stopping.is_set() or run.claim.lost):
            try:
                local = self.bulk.fetch(run.chunk.id, {rel for _, rel in todo})
            except (OSError, ValueError) as exc:
                self._check_mount(exc)  # else an unreadable pack: read through the mount
        if local is None:
            for position, rel in todo:
                self.readers.submit(self._guarded(self._read_file), run, position, rel)
            self._resolve(run)  # the fetch task
            return
        run.local = local
        run.outputs = self.bulk.output_pack()
        handler, memo, batch = self.handler, self.memo is not None, self.config.batch_size
        items: list[Item] = []
        for done, (position, rel) in enumerate(todo):
            value = local.pop(rel, None)
            if value is None:
                self.readers.submit(self._guarded(self._read_file), run, position, rel)
                continue
            started = time.perf_counter()
            try:
                data = handler.load(BulkClient.read_local(value))
            except Exception as exc:  # noqa: BLE001 - recorded, the item is skipped
                self._read_done(1)
                self._item_failed(run, rel, "load", exc)
                continue
            items.append(Item(run, (0, position), rel, data, time.perf_counter() - started,
                              handler.digest(data) if memo else None))
            if len(items) >= batch:
                self._read_done(len(items))
                if not self._enqueue(items):  # stopping: the rest is never read
                    rest = len(todo) - done - 1
                    run.incomplete = True
                    self._read_done(rest)
                    self._resolve(run, rest)
                    items = []
                    break
                items = []
        if items:
            self._read_done(len(items))
            self._enqueue(items)
        self._resolve(run)  # the fetch task

    def stop(self, grace_s: float) -> None:
        """Stop reading; finish what is queued within `grace_s`, then drop the rest.
        Returns when every chunk in hand is settled (done or released)."""
        self._stopping.set()
        self._wait_settled(time.monotonic() + grace_s)
        if self.runs:
            self._abandon.set()
            self.batches.close()
            self._drop(self.batches.drain())
            self._wait_settled(time.monotonic() + 30)
        self.close()

    def close(self) -> None:
        if self.fatal is not None:
            self._abandon.set()
        self.batches.close()
        self._compute.join(timeout=60)
        self.readers.shutdown(wait=True, cancel_futures=True)
        self.writers.shutdown(wait=True)
        if self.bulk is not None:
            self.deliveries.shutdown(wait=True)
        for run in list(self.runs.values()):  # left unsettled by a fatal error
            run.incomplete = True
            self._settle(run)
        self.handler.close()

    def _wait_settled(self, deadline: float) -> None:
        while self.runs and time.monotonic() < deadline and self.fatal is None:
            time.sleep(0.02)

    # -- reading (reader threads) ----------------------------------------------------------
    def _add_backlog(self, n: int) -> None:
        with self._lock:
            self._backlog += n

    def _read_done(self, n: int) -> None:
        with self._lock:
            before = self._backlog
            self._backlog -= n
            wake = before >= self.want_backlog > self._backlog  # just crossed: want another chunk
        if wake:
            self.on_change()

    def _existing_outputs(self, rels: list[str]) -> set[str]:
        """Inputs whose output exists, from one listing per output directory. Temporary
        files a dead holder left behind (older than the lease) are removed on the way."""
        suffix = self.handler.file_suffix
        by_dir: dict[str, list[str]] = {}
        for rel in rels:
            parent, _, name = rel.rpartition("/")
            by_dir.setdefault(parent, []).append(name)
        existing: set[str] = set()
        for parent, names in by_dir.items():
            directory = self.out_dir / parent if parent else self.out_dir
            try:
                present = set(os.listdir(directory))
            except FileNotFoundError:
                continue
            existing.update(f"{parent}/{n}" if parent else n for n in names if n + suffix in present)
            outputs = {n + suffix for n in names}
            for entry in present:
                if entry.startswith(".") and entry.endswith(TMP_SUFFIX):
                    final = entry[1:].rsplit(".", 2)[0]
                    if final in outputs:
                        self._remove_if_stale(directory / entry)
        return existing

    def _remove_if_stale(self, path: Path) -> None:
        try:
            if time.time() - path.stat().st_mtime > self.config.lease_seconds:
                path.unlink()
        except OSError:
            pass

    def _read_file(self, run: ChunkRun, position: int, rel: str) -> None:
        if self._stopping.is_set() or run.claim.lost:
            self._read_done(1)
            run.incomplete = True
            self._resolve(run)
            return
        started = time.perf_counter()
        try:
            data = self.handler.load((self.base / rel).read_bytes())
        except Exception as exc:  # noqa: BLE001 - recorded, the item is skipped
            self._read_done(1)
            self._check_mount(exc)
            self._item_failed(run, rel, "load", exc)
            return
        item = Item(run, (0, position), rel, data, time.perf_counter() - started)
        if self.memo is not None:
            item.digest = self.handler.digest(data)
        self._read_done(1)
        self._enqueue([item])

    def _read_segment(self, run: ChunkRun, number: int, segment: Segment) -> None:
        rel = self.chunks.files[segment.file]
        if self._stopping.is_set() or run.claim.lost:
            self._read_done(segment.items)
            run.incomplete = True
            self._resolve(run)
            return
        started = time.perf_counter()
        try:
            values = read_segment(self.base / rel, segment, self.chunks.field if is_json_lines(rel) else None)
        except OSError as exc:
            self._read_done(segment.items)
            self._check_mount(exc)
            # The whole segment is unreadable: one failure line standing for its items.
            self.failures.record(
                chunk=run.chunk.id,
                token=run.claim.token,
                item=f"{rel}:{segment.line}",
                stage="load",
                error=exc,
                items=segment.items,
            )
            with run.lock:
                run.failed += segment.items
            self._resolve(run)
            return
        handler, memo = self.handler, self.memo is not None
        items: list[Item] = []
        failed: list[tuple[str, BaseException]] = []
        for line, value in values:
            key = f"{rel}:{line}"
            if isinstance(value, BaseException):
                failed.append((key, value))
                continue
            try:
                data = handler.load(value)
            except Exception as exc:  # noqa: BLE001
                failed.append((key, exc))
                continue
            items.append(Item(run, (number, line), key, data, 0.0, handler.digest(data) if memo else None))
        if items:
            share = (time.perf_counter() - started) / len(items)
            for item in items:
                item.load_s = share
        with run.lock:
            run.pending += len(items) + len(failed)
        self._read_done(segment.items)
        for key, exc in failed:
            self._item_failed(run, key, "load", exc)
        for start in range(0, len(items), self.config.batch_size):
            if not self._enqueue(items[start : start + self.config.batch_size]):
                break
        self._resolve(run)  # this read task

    def _enqueue(self, items: list[Item]) -> bool:
        try:
            self.batches.put_many(items)
            return True
        except QueueClosed:
            self._drop(items)
            return False

    # -- computing (compute thread) ---------------------------------------------------------
    def _compute_loop(self) -> None:
        waited = 0.0
        while True:
            started = time.perf_counter()
            batch = self.batches.get_batch(self.max_batch, self.max_wait_s, timeout=0.25)
            if self.runs:
                waited += time.perf_counter() - started
            if not batch:
                if self.batches.closed and not len(self.batches):
                    return
                continue
            if self._abandon.is_set():
                self._drop(batch)
                continue
            self._process(batch, waited)
            waited = 0.0

    def _process(self, batch: list[Item], wait_s: float) -> None:
        results: list[Any] = [None] * len(batch)
        compute = list(range(len(batch)))
        copies: list[tuple[int, int]] = []
        memo = self.memo
        if memo is not None:
            compute, first = [], {}
            for j, item in enumerate(batch):
                if item.digest in memo:
                    results[j] = memo[item.digest]
                elif item.digest in first:
                    copies.append((j, first[item.digest]))
                else:
                    first[item.digest] = j
                    compute.append(j)
        started = time.perf_counter()
        outputs = self._infer([batch[j].data for j in compute]) if compute else []
        compute_s = time.perf_counter() - started
        for j, out in zip(compute, outputs):
            results[j] = out
            if memo is not None and not isinstance(out, _Failed) and len(memo) < MEMO_LIMIT:
                memo[batch[j].digest] = out  # type: ignore[index]
        for j, source in copies:
            results[j] = results[source]
        ok: list[tuple[Item, Any]] = []
        for item, result in zip(batch, results):
            if isinstance(result, _Failed):
                self._item_failed(item.run, item.key, "infer", result.error)
            else:
                ok.append((item, result))
        timings = {
            "items": len(batch),
            "read_s": sum(item.load_s for item in batch),
            "wait_s": wait_s,
            "compute_s": compute_s,
        }
        if self.records:
            for item, result in ok:
                run = item.run
                with run.lock:
                    run.rows.append((item.order, item.key, result))
                    run.ok += 1
                self._resolve(run)
            self.metrics.batch(write_s=0.0, **timings)
        elif not ok:
            self.metrics.batch(write_s=0.0, **timings)
        else:
            parts = min(self.config.writer_threads, len(ok))
            tracker = _BatchWrites(parts, self.metrics, **timings)
            for p in range(parts):
                self.writers.submit(self._guarded(self._write_files), ok[p::parts], tracker)

    def _infer(self, data: list[Any]) -> list[Any]:
        """handler.infer with failure isolation and out-of-memory adaptation."""
        try:
            out = list(self.handler.infer(data))
            if len(out) != len(data):
                raise ValueError(f"handler returned {len(out)} results for {len(data)} items")
        except Exception as exc:  # noqa: BLE001 - isolated below
            if is_out_of_memory(exc):
                self.handler.on_out_of_memory()
                self.max_batch = max(1, min(self.max_batch, len(data) // 2))
                self._clean_batches = 0
            if len(data) == 1:
                return [_Failed(exc)]
            middle = len(data) // 2
            return self._infer(data[:middle]) + self._infer(data[middle:])
        if self.max_batch < self.config.batch_size and len(data) >= self.max_batch:
            self._clean_batches += 1
            if self._clean_batches >= GROW_AFTER_BATCHES:
                self.max_batch = min(self.config.batch_size, self.max_batch + max(1, self.max_batch // 4))
                self._clean_batches = 0
        return out

    # -- writing (writer threads) -----------------------------------------------------------
    def _write_files(self, pairs: list[tuple[Item, Any]], tracker: _BatchWrites) -> None:
        started = time.perf_counter()
        suffix = self.handler.file_suffix
        for item, result in pairs:
            try:
                data = self.handler.serialize(result)
            except Exception as exc:  # noqa: BLE001
                self._item_failed(item.run, item.key, "write", exc)
                continue
            if item.run.outputs is not None:
                item.run.outputs.add(item.key + suffix, data)
            else:
                path = self.out_dir / (item.key + suffix)
                parent = path.parent
                if parent not in self._made_dirs:
                    parent.mkdir(parents=True, exist_ok=True)
                    self._made_dirs.add(parent)
                write_atomic(path, data)
            with item.run.lock:
                item.run.ok += 1
            self._resolve(item.run)
        tracker.part_done(time.perf_counter() - started)

    # -- settling ----------------------------------------------------------------------------
    def _resolve(self, run: ChunkRun, n: int = 1) -> None:
        with run.lock:
            run.pending -= n
            settle = run.pending == 0
        if settle:
            try:
                pool = self.deliveries if run.outputs is not None else self.writers
                pool.submit(self._guarded(self._settle), run)
            except RuntimeError:  # pool shut down: settle here
                self._settle(run)

    def _item_failed(self, run: ChunkRun, key: str, stage: str, error: BaseException) -> None:
        self.failures.record(chunk=run.chunk.id, token=run.claim.token, item=key, stage=stage, error=error)
        with run.lock:
            run.failed += 1
        self._resolve(run)

    def _drop(self, items: list[Item]) -> None:
        for item in items:
            item.run.incomplete = True
            self._resolve(item.run)

    def _settle(self, run: ChunkRun) -> None:
        with self._lock:
            if self.runs.pop(run.chunk.id, None) is None:
                return
        write_s = 0.0
        if run.claim.lost:
            self._discard_bulk(run)
            self.queue.release(run.claim)  # forgets it; the files belong to the new holder
            run.outcome = "lost"
        elif run.incomplete or self.fatal is not None:
            self._deliver(run, releasing=True)
            self.queue.release(run.claim)
            run.outcome = "released"
        else:
            if run.outputs is not None:
                started = time.perf_counter()
                self._deliver(run, releasing=False)
                write_s = time.perf_counter() - started
            if self.records:
                started = time.perf_counter()
                self._write_rows(run)
                write_s = time.perf_counter() - started
            info = {
                "items": run.ok + run.skipped,
                "failed": run.failed,
                "skipped": run.skipped,
                "node": self.metrics.node,
                "proc": self.metrics.proc,
                "seconds": round(time.monotonic() - run.started, 3),
            }
            run.outcome = "done" if self.queue.mark_done(run.claim, info) else "lost"
        self.metrics.chunk(
            chunk=run.chunk.id,
            outcome=run.outcome,
            items=run.ok + run.skipped,
            failed=run.failed,
            skipped=run.skipped,
            resumed=run.claim.resumed,
            seconds=round(time.monotonic() - run.started, 3),
            write_s=round(write_s, 6),
        )
        run.settled.set()
        self.on_change()

    def _deliver(self, run: ChunkRun, *, releasing: bool) -> None:
        outputs, run.outputs = run.outputs, None
        if outputs is None or self.bulk is None:
            return
        self._discard_bulk(run)
        if not releasing:
            self.bulk.deliver(run.chunk.id, run.claim.token, outputs)
            return
        try:  # what is finished, so that the next holder skips it; shortly: we are stopping
            self.bulk.deliver(run.chunk.id, run.claim.token, outputs, wait_s=RELEASE_ACK_S)
        except (OSError, RuntimeError):
            pass  # best effort on the way out: the next holder computes them again

    def _discard_bulk(self, run: ChunkRun) -> None:
        BulkClient.discard(run.local)
        run.local = None
        if run.outputs is not None and run.claim.lost:
            run.outputs.close()
            run.outputs = None

    def _write_rows(self, run: ChunkRun) -> None:
        run.rows.sort(key=lambda row: row[0])
        files: list[str] = []
        positions: dict[str, int] = {}
        records = []
        for _order, key, _result in run.rows:
            rel, _, line = key.rpartition(":")
            if rel not in positions:
                positions[rel] = len(files)
                files.append(rel)
            records.append([positions[rel], int(line)])
        index = {"chunk": run.chunk.id, "rows": len(run.rows), "files": files, "records": records}
        write_atomic(self.out_dir / f"{run.chunk.id}.index.json", dumps(index))
        data = self.handler.serialize_rows([row[2] for row in run.rows])
        write_atomic(self.out_dir / f"{run.chunk.id}{self.handler.rows_suffix}", data)

    # -- errors --------------------------------------------------------------------------------
    def _check_mount(self, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno in _MOUNT_GONE:
            raise exc

    def _guarded(self, fn: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - reported to the runner
                if self.fatal is None:
                    self.fatal = exc
                self._stopping.set()
                self.on_change()

        return run
