"""Coalescing: the items of concurrent `batched_run` calls travel in shared requests.

Every request costs the same round trip, SSH channel work and HTTP parsing whether it
carries one item or sixty-four, on the caller's CPU and on the node's; 64 threads each
sending one item made 64 requests where one would do. So the calls of all threads put
their (pre-processed) items into one queue, and a dispatcher thread sends them in
requests of up to `batch_size` items:

- a server process with nothing in flight gets what is queued at once (a lone caller
  waits for nobody, and a free model never waits for company), up to a fair share of
  the items in flight and queued (so a server that got one item of a burst does not
  keep getting one while another gets the rest);
- while every server has a request, items gather here, and the next server that
  answers takes what gathered: the busier the servers, the larger the requests
  ("batching while busy"; no timer). A second request per server (`depth`) goes only
  with a full batch: then the model has its next batch waiting, as with static
  batches; a partial one waits here, where it still grows, rather than there.

Each request is sent by a sender thread through `send(values, deadline)` (the
serving's one request path: the least-loaded server, failover, 503 redirects), with the
latest deadline of its items; each caller waits for its own items until its own
deadline and then gives up on them (a request not yet sent leaves them out). One
attempt per request is in flight at a time and every item's future is set once:
exactly once to the caller, as without coalescing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

_POLL_S = 0.25  # the dispatcher re-counts the usable servers at least this often
_MAX_SENDERS = 256  # threads sending requests (started as needed; 2 per server process are used)


@dataclass(slots=True, eq=False)
class _Item:
    value: Any
    deadline: float
    future: Future = field(default_factory=Future)


class Coalescer:
    """One queue of items for a serving, sent in shared requests (see the module docstring)."""

    def __init__(self, send: Callable[[list[Any], float], list[Any]], *, name: str, max_items: int,
                 servers: Callable[[], int], depth: int = 2) -> None:
        self.send = send
        self.max_items = max(1, max_items)
        self.servers = servers
        self.depth = max(1, depth)
        self.in_flight = 0  # requests out now
        self.in_flight_items = 0  # their items
        self.requests = 0  # requests sent since the start
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._senders = ThreadPoolExecutor(max_workers=_MAX_SENDERS, thread_name_prefix=f"fleet-send-{name}")
        self._thread = threading.Thread(target=self._dispatch, name=f"fleet-coalesce-{name}", daemon=True)
        self._thread.start()

    def submit(self, values: list[Any], deadline: float) -> list[Future]:
        """Queue the items of one call; their futures give (result, node) or raise."""
        items = [_Item(value, deadline) for value in values]
        with self._cond:
            if self._closed:
                raise RuntimeError("the serving was closed")
            self._queue.extend(items)
            self._cond.notify()
        return [item.future for item in items]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in left:
            item.future.cancel()
        self._thread.join(timeout=10)
        # Requests handed to a sender still run: they end at once with the pool closed,
        # and their callers hear so instead of waiting for their deadline.
        self._senders.shutdown(wait=False)

    # -- the dispatcher thread -------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
                self.in_flight += 1
                self.in_flight_items += len(batch)
                self.requests += 1
            try:
                self._senders.submit(self._deliver, batch)
            except RuntimeError:  # closed meanwhile
                for item in batch:
                    item.future.cancel()
                return

    def _next_batch(self) -> list[_Item] | None:
        """Wait (holding the condition) until a request should go; take its items."""
        queue = self._queue
        while not self._closed:
            while queue and queue[0].future.done():  # its caller gave up
                queue.popleft()
            if not queue:
                self._cond.wait()
                continue
            servers = max(1, self.servers())
            if self.in_flight >= servers and (self.in_flight >= servers * self.depth
                                              or len(queue) < self.max_items):
                # every server has a request: another one goes only with a full batch
                # (it waits there for the model); less waits here, where it still grows
                self._cond.wait(_POLL_S)
                continue
            # A fair share of the items in the system: an idle server that takes all that
            # gathered while another holds few would keep that split for good.
            share = -(-(len(queue) + self.in_flight_items) // servers)
            batch: list[_Item] = []
            while queue and len(batch) < min(self.max_items, share):
                item = queue.popleft()
                if not item.future.done():
                    batch.append(item)
            if batch:
                return batch
        return None

    # -- a sender thread -------------------------------------------------------------------
    def _deliver(self, batch: list[_Item]) -> None:
        try:
            outcome: list[Any] | BaseException = self.send([item.value for item in batch],
                                                          max(item.deadline for item in batch))
        except BaseException as exc:  # noqa: BLE001 - every caller of the request gets it
            outcome = exc
        finally:
            with self._cond:
                self.in_flight -= 1
                self.in_flight_items -= len(batch)
                self._cond.notify()
        for index, item in enumerate(batch):
            try:
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome[index])
            except InvalidStateError:  # the caller gave up on it meanwhile
                pass


def wait_for_items(futures: list[Future], deadline: float) -> list[Any] | None:
    """The futures' results in order, or None when `deadline` passes first (the futures
    still open are cancelled: a request not yet sent leaves their items out). An item's
    exception is raised (CancelledError: the coalescer was closed)."""
    results = []
    for future in futures:
        try:
            results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            if future.done():  # the item's own error
                raise
            for rest in futures:
                rest.cancel()
            return None
    return results
