"""The pipeline of one worker process: reader threads -> batcher -> model -> writers.

    add_chunk(claim) ─▶ reader pool ──put──▶ BatchQueue ──get_batch──▶ compute thread
                        (load + handler.load   (bounded: prefetch      (handler.infer_async,
                         + handler.prepare:     x batch_size items;     one batch in flight,
                         tokenised ahead; one   buckets by length,      OOM split + adapt,
                         task per file or       token budget)           memo)
                         per records segment)                                 │
                                                                               ▼
                 done/<chunk>  ◀── settle (all items resolved) ◀── writer pool (tmp + rename)

Items of several chunks flow together, so batches stay full across chunk boundaries.
A chunk "settles" when every one of its items is written or recorded as failed: then
(records mode) its rows are written, and it is marked done - unless its claim was lost
(another worker took it) or the chunk is incomplete (stopped mid-way), in which case it
is released with its outputs so far kept.

Bulk I/O delivers a chunk's outputs as packs, not one by one; what is computed and not
on the head yet is what a kill loses. The length buckets mix the items of every chunk in
the queue, so each batch's outputs are added to their chunk's pack, and once the outputs
not on the head reach half a chunk's worth (over every chunk in hand), a flush sends each
chunk's new outputs as a partial pack (atomic like any pack; the chunk is marked done
only once the packer acknowledged all of them). A kill loses at most that half chunk and
the batches in flight. Without length buckets a chunk's items, queued whole once
prepared, are computed first in first out: the chunks finish one after another and a
flush is only needed past a whole chunk's worth. The worker claims ahead while the items
that no batch has taken yet are fewer than the queue's window (or a chunk) and a batch:
the next chunks are fetched and tokenised while the current one computes.

Stopping (SIGTERM, a preemption notice): with outputs that land one by one, what is
queued is computed within the grace. With bulk I/O a notice may be short: no new batch
is started; the batch in flight is finished, and every chunk in hand goes to the head at
once, complete ones as done, the others as partial packs that the next holder skips.

The compute thread starts batch N+1 (`infer_async`) before it waits on batch N's
results, so the device never waits for the CPU's collate or the copies back; when no
full batch is queued it collects the batch in flight first.

Failures: an item that fails to load, prepare, infer or serialize is recorded and
skipped. A batch that raises is split in halves until the failing items are isolated;
a CUDA out-of-memory also halves the batch's token budget (or its count, for handlers
without sizes), which grows back by a quarter after 50 clean batches; the recovery
(`on_out_of_memory`, the retries) runs after the except block, with the traceback
dropped, so the failed pass's activations can be freed. A CUDA error that is not
out-of-memory (`is_device_failure`: the context is broken) is fatal: `DeviceFailed`,
the chunks in hand are released, never marked done with their items failed. An OSError
while writing outputs, or the shared mount going away, is fatal for the worker too (the
chunk is not marked done; another worker will redo it).
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
from fleet.worker.bulk import BulkClient, OutputPack, scratch_root
from fleet.worker.claims import ChunkQueue, Claim
from fleet.worker.config import WorkerConfig
from fleet.worker.errors import DeviceFailed
from fleet.worker.handlers import Handler, Pending, is_device_failure, is_out_of_memory
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


@dataclass(slots=True, eq=False)
class _InFlight:
    """A batch started on the device, its results not collected yet."""

    batch: list[Item]
    results: list[Any]
    compute: list[int]  # positions in `batch` the model computes
    copies: list[tuple[int, int]]  # (position, position of the same content)
    pending: Pending | None
    outputs: list[Any] | None  # already known (computed synchronously after an error)
    wait_s: float
    compute_s: float
    model_s: float | None


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
        self.parts: list[str] = []  # bulk: tokens of the partial packs delivered so far
        self.unsent = 0  # bulk: outputs in `outputs`, not delivered yet
        self.sending = threading.Lock()  # bulk: held while a pack of this chunk is written
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
        self.max_tokens = config.max_batch_tokens
        self._clean_batches = 0
        self._model_s = 0.0  # device time of the split retries of the current batch
        self.max_wait_s = config.max_wait_ms / 1000.0
        capacity = config.prefetch * config.batch_size
        sized = type(handler).size is not Handler.size  # size() defined
        bucket = sized and (config.bucket_by_length or config.max_batch_tokens is not None)
        self.batches: BatchQueue[Item] = BatchQueue(
            capacity, (lambda item: handler.size(item.data)) if bucket else None
        )
        self.memo: dict[bytes, Any] | None = {} if config.memoize else None
        self.runs: dict[str, ChunkRun] = {}
        self._by_id = chunks.by_id()
        self._lock = threading.Lock()
        self._backlog = 0  # items in hand not in the batch queue yet (unread, being prepared)
        self._unsent = 0  # bulk: outputs computed and not delivered yet, over every chunk
        self._flushing = False
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
        # Claims ahead: the queue's window (`prefetch` batches: the length buckets, reads
        # and bulk fetches of the next chunks in parallel) or a chunk, whichever is more,
        # and a batch. What a kill loses does not grow with it (see the module docstring).
        self.want_ahead = config.batch_size + max(chunks.chunk_size, capacity)
        # Bulk: outputs computed but not on the head yet are what a kill loses; past half a
        # chunk's worth (over every chunk in hand) they go to the head as partial packs.
        # Without length buckets the chunks are computed one after another (queued whole,
        # first in first out), so a chunk's worth is only reached by a chunk that is done.
        self.flush_at = max(1, chunks.chunk_size // 2 if bucket else chunks.chunk_size)
        self._compute = threading.Thread(
            target=self._guarded(self._compute_loop), name="fleet-compute", daemon=True
        )
        self._compute.start()

    # -- control (runner thread) -------------------------------------------------------
    def wants_work(self) -> bool:
        """True when the claimed items that no batch has taken yet are fewer than
        `want_ahead` (see __init__)."""
        return self._ahead() < self.want_ahead and not self._stopping.is_set()

    def _ahead(self) -> int:
        return self._backlog + len(self.batches)

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
                # Outputs an earlier holder handed over as a pack are settled first (their
                # ack awaited): they must be in place before this holder may mark done.
                handed = self._handed_over(chunk.id, rels)
                existing = self._existing_outputs(rels) | handed
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
                local = self.bulk.fetch(run.chunk.id, {rel for _, rel in todo}, stopping=self._stopping)
            except (OSError, ValueError) as exc:
                self._check_mount(exc)  # else an unreadable pack: read through the mount
        if local is None and (self._stopping.is_set() or run.claim.lost):
            run.incomplete = True  # stopped while waiting for the pack: nothing of it is read
            self._read_done(len(todo))
            self._resolve(run, len(todo) + 1)  # its items and the fetch task
            return
        if local is None:
            for position, rel in todo:
                self.readers.submit(self._guarded(self._read_file), run, position, rel)
            self._resolve(run)  # the fetch task
            return
        run.local = local
        run.outputs = self.bulk.output_pack()
        handler, memo, batch = self.handler, self.memo is not None, self.config.batch_size
        items: list[Item] = []
        for position, rel in todo:
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
        # Prepared (tokenised) a batch at a time, then queued at once: the chunk enters the
        # batching window whole, so its batches never wait on its own tokeniser.
        prepared: list[Item] = []
        seen = 0
        while seen < len(items):
            if self._stopping.is_set():  # stopping: a chunk not started is not worth preparing
                run.incomplete = True
                self._read_done(len(items) - seen)
                self._resolve(run, len(items) - seen)
                break
            prepared.extend(self._prepare(run, items[seen : seen + batch]))
            seen += batch
        self._enqueue(prepared)
        self._read_done(min(seen, len(items)))  # in the queue now (or failed, or dropped)
        self._resolve(run)  # the fetch task

    def stop(self, grace_s: float) -> None:
        """Stop reading; finish what is queued within `grace_s` (bulk I/O: at once, see
        the module docstring), then drop the rest. Returns when every chunk in hand is
        settled (done or released)."""
        self._stopping.set()
        if self.bulk is None:
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
        """`n` items of the backlog are in the batch queue now, or failed, or dropped."""
        with self._lock:
            self._backlog -= n
        self._fewer_ahead(n)

    def _fewer_ahead(self, n: int) -> None:
        """`n` items stopped waiting ahead: wake the claim loop when that crossed
        `want_ahead` (time to claim the next chunk)."""
        after = self._ahead()
        if after + n >= self.want_ahead > after:
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

    def _handed_over(self, chunk: str, rels: list[str]) -> set[str]:
        """Inputs whose output an earlier holder of `chunk` handed over in bulk mode."""
        if self.bulk is None:
            return set()
        suffix = self.handler.file_suffix
        placed = self.bulk.handed_over(chunk, {rel + suffix for rel in rels})
        return {name[: -len(suffix)] if suffix else name for name in placed}

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
        item = Item(run, (0, position), rel, data, 0.0)
        if self.memo is not None:
            item.digest = self.handler.digest(data)
        prepared = self._prepare(run, [item])
        item.load_s = time.perf_counter() - started
        if prepared:
            self._enqueue(prepared)
        self._read_done(1)

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
        with run.lock:
            run.pending += len(items) + len(failed)
        self._read_done(segment.items - len(items))  # the rest leave the backlog as they are queued
        for key, exc in failed:
            self._item_failed(run, key, "load", exc)
        read_share = (time.perf_counter() - started) / len(items) if items else 0.0
        # Prepared (tokenised) and queued a batch at a time, not the whole segment first:
        # the compute thread starts on the first batch while the rest is tokenised, and
        # the last segment of a job leaves no long tail of queuing behind its tokeniser.
        step = self.config.batch_size
        for start in range(0, len(items), step):
            began = time.perf_counter()
            group = self._prepare(run, items[start : start + step])
            share = read_share + (time.perf_counter() - began) / max(1, len(group))
            for item in group:
                item.load_s = share
            if group and not self._enqueue(group):
                self._drop(items[start + step :])  # stopping: the rest is never computed
                self._read_done(len(items) - start)
                break
            self._read_done(min(step, len(items) - start))
        self._resolve(run)  # this read task

    def _prepare(self, run: ChunkRun, items: list[Item]) -> list[Item]:
        """handler.prepare (tokenising) on a group of loaded items, here in the reader
        thread; a group that raises is prepared item by item to isolate the failures."""
        if not items:
            return items
        try:
            prepared = self.handler.prepare([item.data for item in items])
            if len(prepared) != len(items):
                raise ValueError(f"prepare returned {len(prepared)} items for {len(items)}")
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(items) == 1:
                self._item_failed(run, items[0].key, "prepare", exc)
                return []
            kept: list[Item] = []
            for item in items:
                kept.extend(self._prepare(run, [item]))
            return kept
        for item, data in zip(items, prepared):
            item.data = data
        return items

    def _enqueue(self, items: list[Item]) -> bool:
        """False when the queue is closed (the items are dropped)."""
        if not items:
            return True
        try:
            self.batches.put_many(items)
            return True
        except QueueClosed:
            self._drop(items)
            return False

    # -- computing (compute thread) ---------------------------------------------------------
    def _compute_loop(self) -> None:
        waited = 0.0
        inflight: _InFlight | None = None
        while True:
            if inflight is not None and not self.batches.ready(self.max_batch, self.max_tokens):
                self._finish(inflight)  # nothing full to start meanwhile: collect first
                inflight = None
            started = time.perf_counter()
            batch = self.batches.get_batch(self.max_batch, self.max_wait_s, timeout=0.25, max_tokens=self.max_tokens)
            if self.runs:
                waited += time.perf_counter() - started
            if not batch:
                if self.batches.closed and not len(self.batches):
                    if inflight is not None:
                        self._finish(inflight)
                    return
                continue
            self._fewer_ahead(len(batch))
            if self._abandon.is_set():
                self._drop(batch)  # never started: nothing of it is lost
                if inflight is not None:
                    if self.fatal is None:
                        self._finish(inflight)  # computed (or nearly): its outputs are kept
                    else:
                        self._drop(inflight.batch)
                    inflight = None
                continue
            if inflight is not None and self._awaits(batch, inflight):
                self._finish(inflight)  # its results feed this batch's memo look-ups
                inflight = None
            launched = self._launch(batch, waited)
            waited = 0.0
            if inflight is not None:
                self._finish(inflight)
            inflight = launched

    def _awaits(self, batch: list[Item], flight: _InFlight) -> bool:
        """Memoize: whether `batch` holds an input that the batch in flight computes (its
        result is in the memo only once that batch is finished)."""
        if self.memo is None:
            return False
        computing = {flight.batch[j].digest for j in flight.compute}
        return any(item.digest in computing for item in batch)

    def _launch(self, batch: list[Item], wait_s: float) -> _InFlight:
        """Memo look-ups, then start the model on the rest (not waiting for it)."""
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
        pending: Pending | None = None
        outputs: list[Any] | None = [] if not compute else None
        model_s: float | None = None
        if compute:
            data = [batch[j].data for j in compute]
            error: BaseException | None = None
            try:
                pending = self.handler.infer_async(data)
            except Exception as exc:  # noqa: BLE001 - recovered below, outside the handler
                error = exc.with_traceback(None)
            if error is not None:
                self._model_s = 0.0
                outputs = self._recover(data, error)
                model_s = self._model_s
        return _InFlight(batch, results, compute, copies, pending, outputs, wait_s, time.perf_counter() - started, model_s)

    def _finish(self, flight: _InFlight) -> None:
        """Wait for a started batch's results, then hand them to the writers."""
        started = time.perf_counter()
        batch, results, compute = flight.batch, flight.results, flight.compute
        outputs, model_s = flight.outputs, flight.model_s
        if outputs is None:
            assert flight.pending is not None
            data = [batch[j].data for j in compute]
            error: BaseException | None = None
            try:
                outputs = list(flight.pending.result())
                if len(outputs) != len(data):
                    raise ValueError(f"handler returned {len(outputs)} results for {len(data)} items")
                model_s = flight.pending.device_s
                self._note_clean(data)
            except Exception as exc:  # noqa: BLE001 - recovered below, outside the handler
                error = exc.with_traceback(None)
            flight.pending = None
            if error is not None:
                self._model_s = 0.0
                outputs = self._recover(data, error)
                model_s = self._model_s
        memo = self.memo
        for j, out in zip(compute, outputs):
            results[j] = out
            if memo is not None and not isinstance(out, _Failed) and len(memo) < MEMO_LIMIT:
                memo[batch[j].digest] = out  # type: ignore[index]
        for j, source in flight.copies:
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
            "wait_s": flight.wait_s,
            "compute_s": flight.compute_s + time.perf_counter() - started,
            "model_s": model_s,
        }
        if self.records:
            by_run: dict[int, tuple[ChunkRun, list[tuple[tuple[int, int], str, Any]]]] = {}
            for item, result in ok:
                by_run.setdefault(id(item.run), (item.run, []))[1].append((item.order, item.key, result))
            for run, rows in by_run.values():  # one lock and one resolve per chunk, not per item
                with run.lock:
                    run.rows.extend(rows)
                    run.ok += len(rows)
                self._resolve(run, len(rows))
            self.metrics.batch(write_s=0.0, **timings)
        elif not ok:
            self.metrics.batch(write_s=0.0, **timings)
        else:
            parts = min(self.config.writer_threads, len(ok))
            tracker = _BatchWrites(parts, self.metrics, **timings)
            for p in range(parts):
                self.writers.submit(self._guarded(self._write_files), ok[p::parts], tracker)

    def _infer(self, data: list[Any]) -> list[Any]:
        """The model on `data`, synchronously, with failure isolation (split retries).
        A retry still over a limit lowered meanwhile is split before it is tried."""
        over_tokens = self.max_tokens is not None and self._cost(data) > self.max_tokens
        if len(data) > 1 and (over_tokens or len(data) > self.max_batch):
            middle = len(data) // 2
            return self._infer(data[:middle]) + self._infer(data[middle:])
        error: BaseException | None = None
        try:
            pending = self.handler.infer_async(data)
            out = list(pending.result())
            if len(out) != len(data):
                raise ValueError(f"handler returned {len(out)} results for {len(data)} items")
            self._model_s += pending.device_s or 0.0
        except Exception as exc:  # noqa: BLE001 - recovered below, outside the handler
            error = exc.with_traceback(None)
        if error is not None:
            return self._recover(data, error)
        self._note_clean(data)
        return out

    def _recover(self, data: list[Any], error: BaseException) -> list[Any]:
        """After a batch raised (outside the except block: the failed pass's frames are
        gone, so `on_out_of_memory` can free its memory): a broken device is fatal; an
        out-of-memory lowers the budget; then the halves are retried to isolate the
        failing items."""
        if is_device_failure(error):
            raise DeviceFailed(
                f"the GPU failed ({type(error).__name__}: {error}); this process stops and "
                "releases its chunks"
            ) from error
        if is_out_of_memory(error):
            self._shrink(data)
            self.handler.on_out_of_memory()
        if len(data) == 1:
            return [_Failed(error)]
        middle = len(data) // 2
        return self._infer(data[:middle]) + self._infer(data[middle:])

    def _cost(self, data: list[Any]) -> int:
        """What a batch costs against the token budget: count x longest."""
        if self.batches.size_of is None or not data:
            return 0
        return len(data) * max(self.handler.size(item) for item in data)

    def _shrink(self, data: list[Any]) -> None:
        """Out of memory: halve the token budget below this batch's cost (or the count,
        when items have no size), unless the batch was over the budget already (a split
        half of a batch formed before an earlier cut)."""
        cost = self._cost(data)
        if cost > 0:
            if self.max_tokens is None or cost <= self.max_tokens:  # not a batch formed before a cut
                self.max_tokens = max(1, cost // 2)
        elif len(data) <= self.max_batch:
            self.max_batch = max(1, len(data) // 2)
        self._clean_batches = 0

    def _note_clean(self, data: list[Any]) -> None:
        """A batch near the lowered limit went through: after 50, grow it by a quarter."""
        limits = self.config.max_batch_tokens, self.config.batch_size
        if (self.max_tokens, self.max_batch) == limits:
            return
        cost = self._cost(data)
        near = (
            cost * 2 >= self.max_tokens
            if self.max_tokens is not None and self.max_tokens != limits[0] and cost
            else len(data) >= self.max_batch
        )
        if not near:
            return
        self._clean_batches += 1
        if self._clean_batches < GROW_AFTER_BATCHES:
            return
        self._clean_batches = 0
        if self.max_tokens is not None and self.max_tokens != limits[0]:
            grown = self.max_tokens + max(1, self.max_tokens // 4)
            self.max_tokens = grown if limits[0] is None else min(limits[0], grown)
        if self.max_batch < limits[1]:
            self.max_batch = min(limits[1], self.max_batch + max(1, self.max_batch // 4))

    # -- writing (writer threads) -----------------------------------------------------------
    def _write_files(self, pairs: list[tuple[Item, Any]], tracker: _BatchWrites) -> None:
        started = time.perf_counter()
        suffix = self.handler.file_suffix
        packed = 0
        for item, result in pairs:
            try:
                data = self.handler.serialize(result)
            except Exception as exc:  # noqa: BLE001
                self._item_failed(item.run, item.key, "write", exc)
                continue
            run = item.run
            if run.outputs is not None:
                with run.lock:  # a flush may swap the pack (`_take_outputs`)
                    if run.outputs is not None:
                        run.outputs.add(item.key + suffix, data)
                        run.unsent += 1
                        packed += 1
            else:
                path = self.out_dir / (item.key + suffix)
                parent = path.parent
                if parent not in self._made_dirs:
                    parent.mkdir(parents=True, exist_ok=True)
                    self._made_dirs.add(parent)
                write_atomic(path, data)
            with run.lock:
                run.ok += 1
            self._resolve(run)
        tracker.part_done(time.perf_counter() - started)
        if packed:
            self._unsent_changed(packed)

    def _unsent_changed(self, n: int) -> None:
        """Bulk: `n` more (or, negative, fewer) outputs are computed and not on the head;
        from `flush_at` on, a flush sends them (one at a time, on the delivery threads)."""
        with self._lock:
            self._unsent += n
            flush = self._unsent >= self.flush_at and not self._flushing and not self._stopping.is_set()
            if flush:
                self._flushing = True
        if flush:
            try:
                self.deliveries.submit(self._guarded(self._flush))
            except RuntimeError:  # shutting down: the settles deliver what is left
                self._flushing = False

    def _flush(self) -> None:
        """Every chunk in hand sends the outputs it computed since its last pack, as a
        partial pack (`<chunk>.<token><part>`, atomic like any pack; its ack is awaited
        before the chunk is marked done). A kill then loses at most what came after."""
        assert self.bulk is not None
        try:
            for run in list(self.runs.values()):
                if not run.sending.acquire(blocking=False):
                    continue  # being delivered (settled) right now
                try:
                    pack = self._take_outputs(run, keep=True)
                    if pack is None:
                        continue
                    token = f"{run.claim.token}{len(run.parts):04x}"
                    if not self.bulk.deliver(run.chunk.id, token, pack, wait_s=0):
                        run.parts.append(token)  # a pack on the head (else: through the mount)
                finally:
                    run.sending.release()
        finally:
            with self._lock:
                self._flushing = False
        self._unsent_changed(0)  # more came in meanwhile: flush again

    def _take_outputs(self, run: ChunkRun, *, keep: bool) -> OutputPack | None:
        """The chunk's gathered outputs (None when it has none to send), replaced by an
        empty pack when `keep` (a flush) and the chunk has one."""
        with run.lock:
            pack, sent = run.outputs, run.unsent
            if pack is None or (keep and not sent):
                return None
            run.outputs = self.bulk.output_pack() if keep and self.bulk is not None else None
            run.unsent = 0
        if sent:
            self._unsent_changed(-sent)
        return pack

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
        finished = not (run.incomplete or self.fatal is not None)
        if finished and run.outputs is not None and not run.claim.lost:
            started = time.perf_counter()
            finished = self._deliver(run)
            write_s = time.perf_counter() - started
        if run.claim.lost:
            self._discard_bulk(run)
            self.queue.release(run.claim)  # forgets it; the files belong to the new holder
            run.outcome = "lost"
        elif not finished:
            self._hand_over(run)
            self.queue.release(run.claim)
            run.outcome = "released"
        else:
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

    def _deliver(self, run: ChunkRun) -> bool:
        """A finished chunk's outputs to the head, and every partial pack it sent before
        in place; False when they were handed over instead (the worker is stopping and an
        ack is late): the chunk is then released."""
        assert self.bulk is not None
        self._discard_bulk(run)
        with run.sending:  # after a flush's pack of it is written
            outputs = self._take_outputs(run, keep=False)
            if outputs is not None and not self.bulk.deliver(
                run.chunk.id, run.claim.token, outputs, stopping=self._stopping
            ):
                return False
            if run.parts:
                names = {rel + self.handler.file_suffix for rel in self.chunks.chunk_files(run.chunk)}
                for token in run.parts:
                    if not self.bulk.await_part(run.chunk.id, token, names, stopping=self._stopping):
                        return False
            return True

    def _hand_over(self, run: ChunkRun) -> None:
        """What a released chunk finished goes to the head as a pack, with no wait for the
        ack: the next holder settles it (bulk.BulkClient.handed_over), so nothing is computed
        twice however slow the packer is."""
        if self.bulk is None:
            return
        self._discard_bulk(run)
        with run.sending:
            outputs = self._take_outputs(run, keep=False)
            if outputs is None:
                return
            try:
                self.bulk.deliver(run.chunk.id, run.claim.token, outputs, wait_s=0)
            except OSError:
                pass  # best effort on the way out: the next holder computes them again

    def _discard_bulk(self, run: ChunkRun) -> None:
        BulkClient.discard(run.local)
        run.local = None
        if run.claim.lost:
            outputs = self._take_outputs(run, keep=False)
            if outputs is not None:
                outputs.close()

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
