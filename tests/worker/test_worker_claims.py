"""Claims, leases and takeover on a real directory, with real threads and processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

from fleet.worker.claims import PREV_PREFIX, TAKE_PREFIX, ChunkQueue, job_status, scan
from fleet.worker.layout import JobLayout

IDS = [f"c{i:06d}" for i in range(20)]


def _layout(tmp_path: Path) -> JobLayout:
    layout = JobLayout.at(tmp_path / "shared" / "jobs" / "j")
    layout.make_dirs()
    return layout


def _queue(layout: JobLayout, node: str, lease: float = 10.0, clock=time.time) -> ChunkQueue:
    return ChunkQueue(layout, IDS, node=node, proc=0, lease_seconds=lease, clock=clock)


def test_each_chunk_is_claimed_by_exactly_one_of_many_threads(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    got: dict[str, list[str]] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        queue = _queue(layout, f"n{n}")
        barrier.wait()
        while (claim := queue.next_claim()) is not None:
            with lock:
                got.setdefault(claim.chunk, []).append(f"n{n}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == IDS
    assert all(len(holders) == 1 for holders in got.values())


def test_workers_visit_chunks_in_different_orders(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    firsts = {_queue(layout, f"n{i}").next_claim().chunk for i in range(6)}
    assert len(firsts) == 6  # six workers, six different chunks
    orders = {tuple(ChunkQueue(layout, IDS, node=f"n{i}", proc=0, lease_seconds=10)._order) for i in range(5)}
    assert len(orders) == 5


def _stale_takeover_round(tmp_path: Path, round_no: int) -> None:
    layout = _layout(tmp_path / f"r{round_no}")
    dead = _queue(layout, "dead")
    claim = dead.next_claim()
    old = time.time() - 100
    os.utime(layout.claims / claim.chunk, (old, old))
    for other in IDS:  # everything else is done: only the stale chunk is left
        if other != claim.chunk:
            (layout.done / other).write_text("{}")
    winners = []
    barrier = threading.Barrier(8)

    def taker(n: int) -> None:
        queue = _queue(layout, f"t{n}")
        barrier.wait()
        won = queue.next_claim()
        if won is not None:
            winners.append((n, won))

    threads = [threading.Thread(target=taker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1, f"round {round_no}: {winners}"
    assert winners[0][1].chunk == claim.chunk and winners[0][1].resumed
    body = json.loads((layout.claims / claim.chunk).read_text())
    assert body["node"] == f"t{winners[0][0]}"
    assert dead.heartbeat() == [claim] and claim.lost
    assert dead.mark_done(claim, {"items": 1}) is False
    assert not (layout.done / claim.chunk).exists()


def test_stale_claim_is_taken_over_by_exactly_one_taker(tmp_path: Path) -> None:
    for round_no in range(40):  # the race has narrow windows: give it many chances
        _stale_takeover_round(tmp_path, round_no)


def test_a_taker_that_died_holding_the_take_lock_does_not_block_the_chunk(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    claim = _queue(layout, "dead").next_claim()
    old = time.time() - 100
    os.utime(layout.claims / claim.chunk, (old, old))
    lock = layout.claims / f"{TAKE_PREFIX}{claim.chunk}.{claim.token}.0"
    lock.write_text("{}")
    assert _queue(layout, "busy").take_over(claim.chunk) is None  # a live taker holds the lock
    os.utime(lock, (old, old))  # ... which died before moving the claim
    won = _queue(layout, "next").take_over(claim.chunk)
    assert won is not None and won.resumed
    assert (layout.claims / f"{TAKE_PREFIX}{claim.chunk}.{claim.token}.1").exists()
    queue = _queue(layout, "next")
    queue.held[won.chunk] = won
    assert queue.mark_done(won, {"items": 1})
    assert os.listdir(layout.claims) == []  # set-aside claim and take locks cleaned up


def test_a_claim_whose_holder_died_before_writing_it_is_taken_over(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    empty = layout.claims / IDS[0]
    empty.write_bytes(b"")
    old = time.time() - 100
    os.utime(empty, (old, old))
    won = ChunkQueue(layout, IDS[:1], node="t", proc=0, lease_seconds=10).next_claim()
    assert won is not None and won.chunk == IDS[0] and won.resumed


def _race_takeover(job_dir: str, n: int, start: float, results: multiprocessing.Queue) -> None:
    queue = ChunkQueue(JobLayout.at(job_dir), IDS[:1], node=f"p{n}", proc=0, lease_seconds=60)
    while time.time() < start:
        time.sleep(0.001)
    claim = queue.next_claim()
    results.put((n, claim.chunk if claim else None))


def test_takeover_race_between_processes(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    holder = ChunkQueue(layout, IDS[:1], node="dead", proc=0, lease_seconds=60)
    claim = holder.next_claim()
    # Stale by far; the winner never heartbeats here, so a long lease keeps its claim live.
    os.utime(layout.claims / claim.chunk, (time.time() - 600, time.time() - 600))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = time.time() + 1.5
    procs = [
        ctx.Process(target=_race_takeover, args=(str(layout.job_dir), n, start, results)) for n in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = [results.get(timeout=5) for _ in procs]
    assert sorted(chunk for _n, chunk in outcomes if chunk) == [claim.chunk]


def test_live_claim_is_not_taken_and_heartbeat_keeps_it_alive(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    now = [1000.0]
    holder = ChunkQueue(layout, IDS[:1], node="h", proc=0, lease_seconds=30, clock=lambda: now[0])
    claim = holder.next_claim()
    other = ChunkQueue(layout, IDS[:1], node="o", proc=0, lease_seconds=30, clock=lambda: now[0])
    os.utime(layout.claims / claim.chunk, (now[0], now[0]))
    now[0] += 29
    assert other.next_claim() is None
    assert holder.heartbeat() == []
    assert os.stat(layout.claims / claim.chunk).st_mtime > 1e9  # refreshed to real time now
    now[0] = time.time() + 10
    assert other.next_claim() is None


def test_a_live_claim_is_never_moved(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    holder = _queue(layout, "h", lease=30)
    claim = holder.next_claim()
    taker = _queue(layout, "t", lease=30)
    assert taker.take_over(claim.chunk) is None  # it is fresh
    assert holder.still_ours(claim)
    assert os.listdir(layout.claims) == [claim.chunk]


def test_done_release_and_resume_hint(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    queue = _queue(layout, "a")
    first = queue.next_claim()
    assert queue.mark_done(first, {"items": 3, "failed": 0})
    assert not (layout.claims / first.chunk).exists()
    assert json.loads((layout.done / first.chunk).read_text())["token"] == first.token
    second = queue.next_claim()
    queue.release(second)
    assert any(n.startswith(f"{PREV_PREFIX}{second.chunk}.") for n in os.listdir(layout.claims))
    look = scan(layout)
    assert first.chunk in look.done and second.chunk in look.prev and second.chunk not in look.claimed
    again = ChunkQueue(layout, [second.chunk], node="b", proc=0, lease_seconds=10).next_claim()
    assert again is not None and again.resumed


def test_a_chunk_done_after_our_listing_is_not_claimed(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    queue = _queue(layout, "a")
    queue.refresh()
    for chunk in IDS:
        (layout.done / chunk).write_text("{}")
    assert queue.next_claim() is None
    assert queue.all_done()
    assert os.listdir(layout.claims) == []


def test_failures_of_an_earlier_holder_do_not_count_once_another_claim_finishes(tmp_path: Path) -> None:
    """A holder stopped mid-chunk (preempted: its mount vanished under a read) recorded a
    failure; its successor computed that item and finished the chunk."""
    layout = _layout(tmp_path)
    per_chunk = {c: 10 for c in IDS}
    stopped = ChunkQueue(layout, IDS[:1], node="a", proc=0, lease_seconds=10)
    first = stopped.next_claim()
    stopped.release(first)
    successor = ChunkQueue(layout, IDS[:1], node="b", proc=0, lease_seconds=10)
    second = successor.next_claim()
    assert successor.mark_done(second, {"items": 10, "failed": 1})
    (layout.failures / "a.0.jsonl").write_text(
        json.dumps({"chunk": IDS[0], "token": first.token, "item": "x"}) + "\n"
    )
    assert job_status(layout, per_chunk)["failed"] == 0
    # the finisher's own failure counts
    (layout.failures / "b.0.jsonl").write_text(
        json.dumps({"chunk": IDS[0], "token": second.token, "item": "y"}) + "\n"
    )
    status = job_status(layout, per_chunk)
    assert (status["failed"], status["done"]) == (1, 9)


def test_status_counts_from_listings(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    per_chunk = {c: 10 for c in IDS}
    queue = _queue(layout, "a")
    done = queue.next_claim()
    queue.mark_done(done, {"items": 9, "failed": 1})
    (layout.failures / "a.0.jsonl").write_text(
        json.dumps({"chunk": done.chunk, "item": "x"})
        + "\n"
        + json.dumps({"chunk": done.chunk, "item": "x"})
        + "\n"
        + json.dumps({"chunk": "c999999", "item": "y"})
        + "\n{partial"
    )
    queue.next_claim()
    status = job_status(layout, per_chunk)
    assert status == {
        "total": 200,
        "done": 9,
        "failed": 1,
        "chunks": 20,
        "chunks_done": 1,
        "claimed": 1,
        "frozen": True,
    }
