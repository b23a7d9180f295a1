"""Dynamic batching: many producers put items, a consumer takes them in batches.

`BatchQueue` is the primitive (a Condition, no busy waiting): `get_batch(max_size,
max_wait_s, max_tokens=None)` waits for a first item, then up to `max_wait_s` (counted
from when the oldest queued item arrived) for the batch to fill (`max_size` items, or
items whose sizes add up to `max_tokens`), like Triton's `max_queue_delay_microseconds`.

With a `size_of` function it buckets by length. A batch costs count x longest (what
the model computes, padding included) and must fit `max_tokens` (a single item always
fits). Among the runs of similar sizes (the queued items sorted by size) it takes the
full run (max_size items, or the budget's worth) that pads the least. When the queue
is short (the GPU outran the readers and the batch closed at `max_wait_s`), no run is
full: it takes the run with the most useful tokens weighted by its padding efficiency
(useful^2 / cost), so a few long items are not padded together with many short ones:
they go in a batch of their own, the rest right after. An item passed over while 16
windows of items went by is taken first, so none starves.
A `capacity` bounds the queue: producers block while it is full (bounded prefetch).

`DynamicBatcher` is the reusable online component built on it: any number of threads
`submit(item)` and get a `concurrent.futures.Future` for their own result; one or more
batch threads run `run_batch(items) -> results` (one result per item, same order). A
batch that raises fails its own futures only; results always reach their submitter.
The bulk pipeline (`fleet.worker.pipeline`) uses `BatchQueue` directly.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
STARVATION_WINDOWS = 16  # an item passed over while this many windows went by is taken first
R = TypeVar("R")


class QueueClosed(RuntimeError):
    """put() on a closed queue."""


@dataclass(slots=True)
class _Entry(Generic[T]):
    seq: int
    arrived: float
    size: int
    item: T


class BatchQueue(Generic[T]):
    """A bounded, thread-safe queue that hands out batches (see the module docstring)."""

    def __init__(self, capacity: int | None = None, size_of: Callable[[T], int] | None = None) -> None:
        self.capacity = capacity
        self.size_of = size_of
        self._entries: deque[_Entry[T]] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)  # consumers wait here
        self._not_full = threading.Condition(self._lock)  # producers wait here (capacity)
        self._closed = False
        self._seq = 0
        self._wanted = 1  # how many queued items would end a waiting consumer's wait
        self._wanted_size: int | None = None  # ... or what sum of sizes
        self._queued_size = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> None:
        self.put_many((item,))

    def put_many(self, items: Iterable[T]) -> None:
        """Add items; blocks while the queue is at capacity (may overshoot by one call)."""
        size_of = self.size_of
        with self._lock:
            while self.capacity is not None and len(self._entries) >= self.capacity and not self._closed:
                self._not_full.wait()
            if self._closed:
                raise QueueClosed("the batch queue is closed")
            was_empty = not self._entries
            now = time.monotonic()
            seq = self._seq
            append = self._entries.append
            added = 0
            for item in items:
                size = size_of(item) if size_of else 0
                append(_Entry(seq, now, size, item))
                added += size
                seq += 1
            self._seq = seq
            self._queued_size += added
            # Wake consumers only when it matters: the first item, or a full batch.
            if was_empty or self._full():
                self._not_empty.notify_all()

    def close(self) -> None:
        """No more puts; consumers get what is left, then empty batches."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def drain(self) -> list[T]:
        """Remove and return everything queued (used when stopping)."""
        with self._lock:
            items = [entry.item for entry in self._entries]
            self._entries.clear()
            self._queued_size = 0
            self._not_full.notify_all()
            return items

    def ready(self, max_size: int, max_tokens: int | None = None) -> bool:
        """A full batch is queued (get_batch would not wait), or the queue is closed."""
        with self._lock:
            if self._closed or len(self._entries) >= max_size:
                return True
            return max_tokens is not None and self.size_of is not None and self._queued_size >= max_tokens

    def _full(self) -> bool:
        """Enough is queued to end a waiting consumer's wait."""
        if len(self._entries) >= self._wanted:
            return True
        return self._wanted_size is not None and self._queued_size >= self._wanted_size

    def get_batch(
        self, max_size: int, max_wait_s: float, timeout: float | None = None, max_tokens: int | None = None
    ) -> list[T]:
        """Up to `max_size` items costing at most `max_tokens` (count x largest size; a
        single item always fits). Returns [] on timeout (no first item) or when closed
        and empty."""
        with self._lock:
            if not self._entries and not self._closed:
                self._wanted = 1
                self._not_empty.wait_for(lambda: self._entries or self._closed, timeout)
            if not self._entries:
                return []
            deadline = self._entries[0].arrived + max_wait_s
            self._wanted = max_size
            self._wanted_size = max_tokens if self.size_of is not None else None
            while not self._full() and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._not_empty.wait(remaining)
            self._wanted, self._wanted_size = 1, None
            batch = self._take(max_size, max_tokens)
            self._not_full.notify_all()
            return batch

    def _take(self, max_size: int, max_tokens: int | None) -> list[T]:
        entries = self._entries
        if self.size_of is None:
            count = min(max_size, len(entries))
            return [entries.popleft().item for _ in range(count)]
        ordered = sorted(entries, key=lambda entry: entry.size)
        oldest = entries[0]
        window = max(self.capacity or 0, max_size * 4)
        starving = oldest.seq < self._seq - STARVATION_WINDOWS * window
        lo, hi = _best_run([entry.size for entry in ordered], max_size, max_tokens)
        if starving and not any(entry is oldest for entry in ordered[lo:hi]):
            position = next(i for i, entry in enumerate(ordered) if entry is oldest)
            lo, hi = _run_from(position, [entry.size for entry in ordered], max_size, max_tokens)
        chosen = ordered[lo:hi]
        taken = {id(entry) for entry in chosen}
        if len(taken) == len(entries):
            entries.clear()
        else:
            self._entries = deque(entry for entry in entries if id(entry) not in taken)
        self._queued_size -= sum(entry.size for entry in chosen)
        return [entry.item for entry in chosen]


def _fits(count: int, longest: int, max_size: int, max_tokens: int | None) -> bool:
    return count <= max_size and (max_tokens is None or count == 1 or count * longest <= max_tokens)


def _run_from(start: int, sizes: list[int], max_size: int, max_tokens: int | None) -> tuple[int, int]:
    """The longest run of sorted sizes that starts at `start` and fits."""
    end = start + 1
    while end < len(sizes) and _fits(end + 1 - start, sizes[end], max_size, max_tokens):
        end += 1
    return start, end


def _best_run(sizes: list[int], max_size: int, max_tokens: int | None) -> tuple[int, int]:
    """[lo, hi) of the best batch among runs of the sorted `sizes` (see the module
    docstring). Full runs (max_size items, or as many as the token budget allows) come
    first, the one that pads the least (useful / cost); without one (a short queue), the
    longest fitting run from each start and to each end is scored by useful^2 / cost.
    O(n) with two pointers (a fitting run stays fitting when its start moves right)."""
    n = len(sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)

    def useful_and_cost(lo: int, hi: int) -> tuple[int, int]:
        return prefix[hi] - prefix[lo], (hi - lo) * sizes[hi - 1]

    best_full: tuple[int, int] | None = None
    full_efficiency = -1.0
    best, best_score = (0, 1), -1.0
    end = 1
    for start in range(n):  # the longest run from each start
        end = max(end, start + 1)
        while end < n and _fits(end + 1 - start, sizes[end], max_size, max_tokens):
            end += 1
        useful, cost = useful_and_cost(start, end)
        if end < n or end - start == max_size:  # stopped by a limit, not by the last item
            efficiency = useful / cost if cost else 1.0
            if efficiency > full_efficiency:
                best_full, full_efficiency = (start, end), efficiency
        elif best_full is None:
            value = useful * useful / cost if cost else float(end - start)
            if value > best_score:
                best, best_score = (start, end), value
    if best_full is not None:
        return best_full
    start = 0
    for end in range(1, n + 1):  # the longest run to each end
        while not _fits(end - start, sizes[end - 1], max_size, max_tokens):
            start += 1
        useful, cost = useful_and_cost(start, end)
        value = useful * useful / cost if cost else float(end - start)
        if value > best_score:
            best, best_score = (start, end), value
    return best


@dataclass(slots=True)
class _Request(Generic[T, R]):
    item: T
    future: Future[R]


class DynamicBatcher(Generic[T, R]):
    """Thread-safe online batching: `submit(item)` -> Future of that item's result."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 64,
        max_wait_ms: float = 10.0,
        size_of: Callable[[T], int] | None = None,
        num_threads: int = 1,
        max_pending: int | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1 or num_threads < 1:
            raise ValueError("max_batch_size and num_threads must be >= 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        item_size = (lambda request: size_of(request.item)) if size_of else None
        self._queue: BatchQueue[_Request[T, R]] = BatchQueue(max_pending, item_size)
        self.batches = 0
        self.items = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(num_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, item: T) -> Future[R]:
        future: Future[R] = Future()
        try:
            self._queue.put(_Request(item, future))
        except QueueClosed:
            raise RuntimeError("submit() on a closed DynamicBatcher") from None
        return future

    def submit_many(self, items: Iterable[T]) -> list[Future[R]]:
        requests = [_Request(item, Future()) for item in items]
        try:
            self._queue.put_many(requests)
        except QueueClosed:
            raise RuntimeError("submit_many() on a closed DynamicBatcher") from None
        return [request.future for request in requests]

    def close(self, *, wait: bool = True) -> None:
        """Stop accepting items; what was submitted is still run."""
        self._queue.close()
        if wait:
            for thread in self._threads:
                thread.join()

    def __enter__(self) -> DynamicBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            batch = self._queue.get_batch(self.max_batch_size, self.max_wait_s)
            if not batch:
                if self._queue.closed and not len(self._queue):
                    return
                continue
            live = [request for request in batch if request.future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batches += 1
            self.items += len(live)
            try:
                results = self.run_batch([request.item for request in live])
                if len(results) != len(live):
                    raise ValueError(f"run_batch returned {len(results)} results for {len(live)} items")
            except BaseException as exc:  # noqa: BLE001 - delivered to the submitters
                for request in live:
                    request.future.set_exception(exc)
                continue
            for request, result in zip(live, results):
                request.future.set_result(result)
