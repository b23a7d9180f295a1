"""The reusable DynamicBatcher and its BatchQueue: real threads, no mocks."""

from __future__ import annotations

import random
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fleet.worker.batcher import BatchQueue, DynamicBatcher


def test_64_concurrent_callers_each_get_their_own_result() -> None:
    batch_sizes: list[int] = []

    def run_batch(items: list[tuple[int, int]]) -> list[str]:
        batch_sizes.append(len(items))
        time.sleep(0.002)
        return [f"{caller}:{n}:{caller * 1000 + n}" for caller, n in items]

    with DynamicBatcher(run_batch, max_batch_size=32, max_wait_ms=5) as batcher:

        def caller(c: int) -> list[bool]:
            ok = []
            for n in range(25):
                got = batcher.submit((c, n)).result(timeout=30)
                ok.append(got == f"{c}:{n}:{c * 1000 + n}")
            return ok

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(caller, range(64)))
    assert all(all(r) for r in results)
    assert sum(batch_sizes) == 64 * 25
    assert max(batch_sizes) > 8, "concurrent callers should have been batched together"


def test_a_failing_batch_fails_only_its_own_futures() -> None:
    batches: list[list[int]] = []
    lock = threading.Lock()

    def run_batch(items: list[int]) -> list[int]:
        with lock:
            batches.append(list(items))
        if any(x % 97 == 0 for x in items):
            raise ValueError("bad batch")
        return [x * 2 for x in items]

    with DynamicBatcher(run_batch, max_batch_size=16, max_wait_ms=2) as batcher:
        with ThreadPoolExecutor(64) as pool:
            futures = list(pool.map(batcher.submit, range(1, 2000)))
        outcomes = {}
        for x, future in zip(range(1, 2000), futures):
            exc = future.exception(timeout=30)
            outcomes[x] = exc if exc is not None else future.result()
    failed_batches = [b for b in batches if any(x % 97 == 0 for x in b)]
    failed_items = {x for b in failed_batches for x in b}
    assert failed_batches, "some batch must have failed for this test to mean anything"
    for x, outcome in outcomes.items():
        if x in failed_items:
            assert isinstance(outcome, ValueError)
        else:
            assert outcome == x * 2
    assert len(failed_items) < 1999


def test_wrong_result_count_fails_that_batch() -> None:
    with DynamicBatcher(lambda items: items[:-1], max_batch_size=4, max_wait_ms=50) as batcher:
        futures = batcher.submit_many([1, 2, 3, 4])
        with pytest.raises(ValueError, match="3 results for 4 items"):
            futures[0].result(timeout=10)


def test_partial_batch_is_released_after_max_wait() -> None:
    queue: BatchQueue[int] = BatchQueue()
    queue.put(1)
    started = time.monotonic()
    batch = queue.get_batch(64, 0.05)
    waited = time.monotonic() - started
    assert batch == [1] and 0.03 <= waited < 1.0


def test_full_batch_does_not_wait() -> None:
    queue: BatchQueue[int] = BatchQueue()
    queue.put_many(range(100))
    started = time.monotonic()
    assert queue.get_batch(64, 10.0) == list(range(64))
    assert time.monotonic() - started < 0.5


def test_capacity_blocks_producers_until_consumed() -> None:
    queue: BatchQueue[int] = BatchQueue(capacity=10)
    queue.put_many(range(10))
    done = threading.Event()

    def producer() -> None:
        queue.put(99)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.2), "put must block while the queue is full"
    assert len(queue.get_batch(5, 0)) == 5
    assert done.wait(5)
    thread.join()


def test_length_bucketing_groups_similar_sizes() -> None:
    rng = random.Random(7)
    sizes = [rng.randint(1, 1000) for _ in range(512)]
    queue: BatchQueue[int] = BatchQueue(capacity=512, size_of=lambda x: x)
    queue.put_many(sizes)
    spreads = []
    while len(queue):
        batch = queue.get_batch(64, 0)
        spreads.append(max(batch) - min(batch))
    # Random batches of 64 from 1..1000 spread ~940; bucketed ones far less.
    assert sum(spreads) / len(spreads) < 300


def test_bucketing_loses_nothing_and_does_not_starve() -> None:
    queue: BatchQueue[int] = BatchQueue(capacity=256, size_of=lambda x: 10_000 if x == 0 else x % 50)
    outlier_seen_after: list[int] = []
    produced = 0
    taken: list[int] = []
    queue.put(0)  # an outlier nobody resembles
    produced = 1
    while produced < 20_000:
        queue.put_many(range(produced, produced + 64))
        produced += 64
        batch = queue.get_batch(64, 0)
        taken.extend(batch)
        if 0 in batch:
            outlier_seen_after.append(produced)
    queue.close()
    while len(queue):
        taken.extend(queue.get_batch(64, 0))
    assert sorted(taken) == list(range(produced))
    assert outlier_seen_after and outlier_seen_after[0] < 8000, "the outlier waited too long"


def test_idle_batcher_does_not_busy_wait() -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        lambda items: items, max_batch_size=8, max_wait_ms=1, num_threads=4
    )
    try:
        time.sleep(0.1)
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert cpu < 0.1, f"idle batcher used {cpu:.3f}s of CPU in 1s"
        assert batcher.submit(5).result(timeout=5) == 5
    finally:
        batcher.close()


def test_submit_after_close_is_an_error_and_pending_items_still_run() -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(lambda items: [x + 1 for x in items], max_wait_ms=200)
    future = batcher.submit(1)
    batcher.close()
    assert future.result(timeout=5) == 2
    with pytest.raises(RuntimeError):
        batcher.submit(2)
