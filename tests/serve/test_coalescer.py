"""The coalescer's policy (`fleet.serve.coalescer`), with a gated request function in
place of the network so what is queued when is known without timing guesses: items
gather while the servers are busy and share requests of at most `max_items`, every
caller keeps its own deadline, and each item's future is set exactly once. (The real
path, through SSH to the servers of a local fleet, is `test_serving.py`.)"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from fleet.serve.coalescer import Coalescer, wait_for_items


class GatedSend:
    """Records each request's items and deadline; each request waits for a permit."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.requests: list[list[Any]] = []
        self.deadlines: list[float] = []
        self.sent = threading.Semaphore(0)
        self.permits = threading.Semaphore(0)
        self.fail = fail

    def grant(self, count: int = 1) -> None:
        self.permits.release(count)

    def __call__(self, values: list[Any], deadline: float) -> list[Any]:
        self.requests.append(list(values))
        self.deadlines.append(deadline)
        self.sent.release()
        assert self.permits.acquire(timeout=30)
        if self.fail is not None:
            raise self.fail
        return [f"r:{value}" for value in values]

    def wait_sent(self, count: int = 1) -> None:
        for _ in range(count):
            assert self.sent.acquire(timeout=30), "no request was sent"


def coalescer(send: GatedSend, *, servers: int = 1, max_items: int = 4) -> Coalescer:
    return Coalescer(send, name="test", max_items=max_items, servers=lambda: servers)


def test_items_gather_while_the_servers_are_busy_and_share_requests() -> None:
    send = GatedSend()
    batcher = coalescer(send, servers=1, max_items=4)
    try:
        far = time.monotonic() + 60
        first = batcher.submit(["a"], far)
        send.wait_sent()  # nothing was in flight: "a" went alone, at once
        later = [batcher.submit([value], far) for value in "bcd"]
        assert not send.sent.acquire(timeout=0.3), "a partial batch went to a busy server"
        later.append(batcher.submit(["e"], far))
        send.wait_sent()  # a full batch goes at once: the server's next batch, waiting there
        later += [batcher.submit([value], far) for value in "fghij"]  # two requests out: these wait
        assert not send.sent.acquire(timeout=0.3), "a third request went to one server"
        send.grant(10)
        results = [wait_for_items(futures, far) for futures in [first, *later]]
    finally:
        batcher.close()
    assert send.requests == [["a"], ["b", "c", "d", "e"], ["f", "g", "h", "i"], ["j"]]
    assert results == [[f"r:{value}"] for value in "abcdefghij"]
    assert batcher.requests == 4 and batcher.in_flight == 0


def test_a_free_server_takes_its_fair_share_at_once() -> None:
    send = GatedSend()
    batcher = coalescer(send, servers=2, max_items=8)
    try:
        far = time.monotonic() + 60
        first = batcher.submit(["a"], far)
        send.wait_sent()
        # The other server is free: it gets its share of the five items in the system
        # (three) at once, not all four queued; the fourth waits for a server to answer.
        later = batcher.submit(list("bcde"), far)
        send.wait_sent()
        assert not send.sent.acquire(timeout=0.3), "a third request went to two busy servers"
        send.grant(3)
        assert wait_for_items(first, far) == ["r:a"]
        assert wait_for_items(later, far) == [f"r:{v}" for v in "bcde"]
    finally:
        batcher.close()
    assert send.requests == [["a"], ["b", "c", "d"], ["e"]]


def test_each_caller_keeps_its_own_deadline_in_a_shared_request() -> None:
    send = GatedSend()
    batcher = coalescer(send, servers=1, max_items=4)
    try:
        now = time.monotonic()
        blocker = batcher.submit(["x"], now + 60)
        send.wait_sent()
        gave_up = batcher.submit(["early"], now + 0.2)  # leaves before any request takes it
        shared_short = batcher.submit(["short"], now + 60)
        assert wait_for_items(gave_up, now + 0.2) is None
        assert gave_up[0].cancelled()
        soon = time.monotonic() + 0.5
        impatient = batcher.submit(["impatient"], soon)
        patient = batcher.submit(["patient"], now + 60)
        send.grant()  # "x" returns; the lane is free: the next request leaves with what gathered
        send.wait_sent()
        assert wait_for_items(impatient, soon) is None  # its own deadline, while its request is out
        assert time.monotonic() - soon < 1.5
        send.grant()
        assert wait_for_items(patient, now + 60) == ["r:patient"]
        assert wait_for_items(shared_short, now + 60) == ["r:short"]
        assert wait_for_items(blocker, now + 60) == ["r:x"]
    finally:
        send.grant(10)
        batcher.close()
    assert send.requests == [["x"], ["short", "impatient", "patient"]]  # "early" was left out
    assert send.deadlines[1] == pytest.approx(now + 60)  # the latest of its items
    assert impatient[0].cancelled()


def test_a_failed_request_fails_each_of_its_callers_once() -> None:
    send = GatedSend(fail=RuntimeError("the model broke"))
    batcher = coalescer(send, servers=1, max_items=4)
    try:
        far = time.monotonic() + 60
        first = batcher.submit(["a"], far)
        send.wait_sent()
        rest = [batcher.submit([value], far) for value in "bc"]
        send.grant(2)
        for futures in [first, *rest]:
            with pytest.raises(RuntimeError, match="the model broke"):
                wait_for_items(futures, far)
    finally:
        batcher.close()
    assert send.requests == [["a"], ["b", "c"]]
