"""`Serving`: one served model, called by any number of threads of the caller.

- `batched_run(item)` / `batched_run([items])` blocks until the results of its
  (pre-processed) items come back (post-processed, same order). The items of calls made
  at the same time by any threads travel together, in requests of up to `batch_size`
  items (`fleet.serve.coalescer`: one request per server in flight, the next one
  gathering meanwhile); a call with `batch_size` items or more is a request of its own.
  Coalesced requests say so (`X-Fleet-No-Wait`): the server runs them without waiting
  `max_wait_ms` for more.
  The servers put the items of all requests into one dynamic batcher per model process.
- Transport: HTTP/1.1 (h11) over SSH direct-tcpip channels of the fleet's existing
  paramiko connections to `127.0.0.1:<port>` of the node (`fleet.worker.serve`); idle
  channels are kept per server and reused, one request at a time each.
- Spread: each request goes to the server process with the least outstanding items
  (each process is one model, so a node counts as many times as it has processes).
- Deadline: every call has one (`timeout`); when it passes, `ServingTimeout`, also when
  its items share a request with those of callers who wait longer. A request carries
  the latest deadline of its items; the server is told the time left (a header): past
  it, it drops the items it has not started (every caller has given up) and answers 504.
- Failover: a request whose channel breaks (node preempted, killed, unreachable) or
  that a draining server turns away (503) is sent again to another server: at least
  once to a model, exactly once to the caller (only one attempt is ever in flight).
- The pool: a thread re-reads the fleet (the provider's list) and the servers' registry
  (`jobs/<name>/servers/*.json` on the head) every `monitor.interval`, and at once
  after a failure: replacements join, dead or draining servers leave, and requests in
  flight on a node that is gone are aborted and sent elsewhere.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import paramiko

from fleet.errors import FleetError
from fleet.jobs import JobRunner
from fleet.model import NodeState
from fleet.serve.coalescer import Coalescer, wait_for_items
from fleet.serve.errors import ServingError, ServingTimeout
from fleet.serve.registry import read_registry
from fleet.spec.job import JobSpec
from fleet.ssh.results import Target
from fleet.worker import wire

_POLL_S = 0.25  # how often a waiting request looks whether its channel was aborted
_SUSPECT_S = 5.0  # a server whose channel broke is skipped this long (or until re-listed)
_RECV = 1 << 16


class _Lost(Exception):
    """The channel broke before the whole answer came: send the request elsewhere."""


class _Channel:
    """One HTTP/1.1 connection over one direct-tcpip channel (one request at a time)."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel
        self.http = h11.Connection(h11.CLIENT)
        self.aborted = False

    def close(self) -> None:
        self.aborted = True
        self.channel.close()

    def post(self, path: str, body: bytes, deadline: float, *, no_wait: bool = False) -> tuple[int, dict[str, str], bytes]:
        http = self.http
        left_ms = max(0, int((deadline - time.monotonic()) * 1000))  # the server drops the items after it
        headers = [("Host", "fleet"), ("Content-Type", wire.CONTENT_TYPE), ("Content-Length", str(len(body))),
                   (wire.TIMEOUT_HEADER, str(left_ms))]
        if no_wait:
            headers.append((wire.NO_WAIT_HEADER, "1"))
        data = http.send(h11.Request(method="POST", target=path, headers=headers))
        data = (data or b"") + (http.send(h11.Data(data=body)) or b"") + (http.send(h11.EndOfMessage()) or b"")
        try:
            self.channel.settimeout(max(0.01, deadline - time.monotonic()))
            self.channel.sendall(data)
            status, headers, chunks = 0, {}, []
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    if self.aborted:
                        raise _Lost("the server's node is gone")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    self.channel.settimeout(min(remaining, _POLL_S))
                    try:
                        received = self.channel.recv(_RECV)
                    except TimeoutError:
                        continue
                    if not received:
                        raise _Lost("the channel closed before the answer came")
                    http.receive_data(received)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise _Lost("the server closed the connection")
            http.start_next_cycle()
            return status, headers, b"".join(chunks)
        except TimeoutError:
            if self.aborted:
                raise _Lost("the server's node is gone") from None
            raise
        except (h11.ProtocolError, paramiko.SSHException, EOFError, OSError) as exc:
            raise _Lost(f"{type(exc).__name__}: {exc}") from None


@dataclass(eq=False)
class _Server:
    """One model process on one node, as the registry lists it."""

    node: str
    proc: int
    port: int
    pid: int
    target: Target
    outstanding: int = 0
    draining: bool = False
    suspect_until: float = 0.0
    removed: bool = False
    idle: list[_Channel] = field(default_factory=list)
    busy: set[_Channel] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.node, self.proc, self.port, self.pid)

    def usable(self, now: float) -> bool:
        return not (self.removed or self.draining) and now >= self.suspect_until


class _Pool:
    """The servers of one serving, kept current by a refresher thread."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.fleet = serving.connection.fleet
        self.runner = JobRunner(self.fleet, serving.job)
        self.interval = float(self.fleet.spec.monitor.interval)
        self.servers: dict[tuple[str, int, int, int], _Server] = {}
        self.cond = threading.Condition()
        self.turn = itertools.count()
        self.problem: str | None = None  # why the pool is empty, for the timeout's message
        self.refreshed_at = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"fleet-serving-{serving.name}", daemon=True)

    def start(self) -> None:
        self.refresh(first=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self.cond:
            servers = list(self.servers.values())
            self.servers.clear()
        for server in servers:
            self._retire(server, abort=True)

    # -- choosing a server -----------------------------------------------------------------
    def pick(self, items: int, deadline: float) -> _Server:
        with self.cond:
            while True:
                if self._stop.is_set():
                    raise ServingError("the serving was closed")
                now = time.monotonic()
                usable = [s for s in self.servers.values() if s.usable(now)]
                if usable:
                    turn = next(self.turn)
                    count = len(usable)
                    # least outstanding items; ties go round the servers in turn
                    server = min(enumerate(usable), key=lambda p: (p[1].outstanding, (p[0] - turn) % count))[1]
                    server.outstanding += items
                    return server
                remaining = deadline - now
                if remaining <= 0:
                    raise ServingTimeout(self.nobody(self.serving.timeout), hint="`fleet jobs` / `fleet logs "
                                         f"{self.serving.name}` show whether its servers run")
                self._wake.set()
                self.cond.wait(min(remaining, _POLL_S))

    def nobody(self, budget: float) -> str:
        known = len(self.servers)
        why = f": {self.problem}" if self.problem else ""
        return (f"no server of {self.serving.name!r} on fleet {self.fleet.spec.name} could take the request "
                f"within {budget:g} s ({known} known, none usable){why}")

    def usable_count(self) -> int:
        with self.cond:
            now = time.monotonic()
            return sum(1 for s in self.servers.values() if s.usable(now))

    def release(self, server: _Server, items: int) -> None:
        with self.cond:
            server.outstanding -= items
            self.cond.notify_all()

    def channel(self, server: _Server, deadline: float) -> _Channel:
        with self.cond:
            while server.idle:
                channel = server.idle.pop()
                if channel.channel.closed or channel.channel.eof_received:
                    channel.close()  # the server closed it while idle (keep-alive timeout)
                    continue
                server.busy.add(channel)
                return channel
        wait = max(0.5, min(self.fleet.spec.ssh.connect_timeout, deadline - time.monotonic()))
        try:
            raw = self.fleet.executor.forward(server.target, server.port, timeout=wait)
        except FleetError as exc:
            raise _Lost(f"cannot open a channel to {server.node}:{server.port}: {exc.message}") from None
        channel = _Channel(raw)
        with self.cond:
            server.busy.add(channel)
            if server.removed:
                channel.close()
        return channel

    def done_with(self, server: _Server, channel: _Channel, *, reusable: bool) -> None:
        with self.cond:
            server.busy.discard(channel)
            if reusable and not server.removed and not channel.aborted:
                server.idle.append(channel)
                return
        channel.close()

    def failed(self, server: _Server, *, draining: bool = False) -> None:
        with self.cond:
            if draining:
                server.draining = True
            else:
                server.suspect_until = time.monotonic() + _SUSPECT_S
            self.cond.notify_all()
        self._wake.set()

    # -- keeping the pool current ----------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            # at most a few refreshes a second, however many requests fail at once
            pause = self.refreshed_at + min(0.5, self.interval) - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep serving from what is known
                self.problem = f"{type(exc).__name__}: {exc}"

    def refresh(self, *, first: bool = False) -> None:
        """Re-read the fleet and the registry; add, keep and retire servers."""
        self.refreshed_at = time.monotonic()
        try:
            nodes = self.fleet.observe()
        except FleetError as exc:
            if first:
                raise ServingError(f"cannot list the nodes of fleet {self.fleet.spec.name}: {exc.message}") from None
            self.problem = exc.message
            return
        head = self.fleet.head(nodes)
        if head is None:
            self.problem = f"the head of fleet {self.fleet.spec.name} is not running"
            if first:
                raise ServingError(self.problem, hint="`fleet up` brings the fleet up, then `fleet serve` the model")
            self._apply(nodes, [])
            return
        try:
            records = read_registry(self.runner, head)
        except FleetError as exc:
            self.problem = exc.message
            if first:
                raise ServingError(self.problem) from None
            return
        self._apply(nodes, records)

    def _apply(self, nodes: list, records: list[dict[str, Any]]) -> None:
        alive = {n.name: n for n in nodes if n.state == NodeState.RUNNING}
        listed: dict[tuple[str, int, int, int], dict[str, Any]] = {}
        for record in records:
            try:
                key = (str(record["node"]), int(record["proc"]), int(record["port"]), int(record["pid"]))
            except (KeyError, TypeError, ValueError):
                continue
            if key[0] in alive:
                listed[key] = record
        retired: list[_Server] = []
        with self.cond:
            for key, server in list(self.servers.items()):
                if key not in listed:
                    server.removed = True
                    retired.append(self.servers.pop(key))
            for key, record in listed.items():
                server = self.servers.get(key)
                if server is None:
                    server = _Server(key[0], key[1], key[2], key[3], self.fleet.target(alive[key[0]]))
                    self.servers[key] = server
                server.draining = record.get("state") == "draining"
            if self.servers:
                self.problem = None
            elif not self.problem:
                self.problem = "the registry lists no running server"
            self.cond.notify_all()
        for server in retired:
            # its node is gone: what is in flight there is sent elsewhere now
            self._retire(server, abort=server.node not in alive)

    def _retire(self, server: _Server, *, abort: bool) -> None:
        with self.cond:
            channels = list(server.idle) + (list(server.busy) if abort else [])
            server.idle.clear()
        for channel in channels:
            channel.close()


class Serving:
    """A served model; thread-safe (see the module docstring)."""

    def __init__(self, connection: Any, job: JobSpec, *, preprocess: Callable[[Any], Any] | None,
                 postprocess: Callable[[Any], Any] | None, timeout: float) -> None:
        self.connection = connection
        self.job = job
        self.name = job.name
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.timeout = timeout
        self._lock = threading.Lock()
        self._stats: Counter[str] = Counter()
        self._answered_by: Counter[str] = Counter()
        self._pool = _Pool(self)
        self._pool.start()
        serve = job.serve
        self.batch_size = serve.batch_size if serve is not None else 64
        self._coalescer = Coalescer(partial(self._request, no_wait=True), name=self.name, max_items=self.batch_size,
                                    servers=self._pool.usable_count)

    # -- calls -----------------------------------------------------------------------------
    def batched_run(self, items: Any, *, timeout: float | None = None) -> Any:
        """One item -> its result; a list of items -> their results in order."""
        several = isinstance(items, list)
        values = list(items) if several else [items]
        if self.preprocess is not None:
            values = [self.preprocess(value) for value in values]
        budget = timeout if timeout is not None else self.timeout
        deadline = time.monotonic() + budget
        if len(values) >= self.batch_size:  # a batch already: a request of its own
            answers = self._request(values, deadline)
        else:
            answers = self._coalesced(values, deadline, budget)
        results = []
        for index, (result, node) in enumerate(answers):
            if isinstance(result, wire.ItemError):
                raise ServingError(f"{self.name}: item {index} failed on {node}: {result.message}")
            results.append(result)
        self._count("calls")
        if self.postprocess is not None:
            results = [self.postprocess(result) for result in results]
        return results if several else results[0]

    def map(self, items: Iterable[Any], *, concurrency: int = 16, timeout: float | None = None) -> Iterator[Any]:
        """Results of `batched_run(item)` for each item, in order, `concurrency` at a time."""
        from concurrent.futures import ThreadPoolExecutor

        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"fleet-map-{self.name}") as pool:
            window: deque = deque()
            for item in items:
                window.append(pool.submit(self.batched_run, item, timeout=timeout))
                if len(window) >= 2 * concurrency:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def _coalesced(self, values: list[Any], deadline: float, budget: float) -> list[tuple[Any, str]]:
        """The items sent with those of other threads' calls (`fleet.serve.coalescer`)."""
        try:
            answers = wait_for_items(self._coalescer.submit(values, deadline), deadline)
        except (RuntimeError, CancelledError):
            raise ServingError(f"{self.name}: the serving was closed") from None
        if answers is None:
            if not self._pool.usable_count():
                raise ServingTimeout(self._pool.nobody(budget), hint="`fleet jobs` / `fleet logs "
                                     f"{self.name}` show whether its servers run")
            raise ServingTimeout(f"{self.name}: no answer within the deadline ({budget:g} s)",
                                 hint="pass a longer `timeout=` to serving() or batched_run()")
        return answers

    def _request(self, values: list[Any], deadline: float, *, no_wait: bool = False) -> list[tuple[Any, str]]:
        """One request with `values` to the least loaded server (sent again elsewhere when
        its channel breaks or a draining server turns it away): (result, node) per item.
        `no_wait`: the server runs them without waiting `max_wait_ms` for more (the
        coalescer sent what it had; the rest waits for the next request)."""
        try:
            body = wire.encode(values)
        except wire.WireError as exc:
            raise ServingError(f"{self.name}: cannot send the items: {exc}") from None
        pool = self._pool
        while True:
            server = pool.pick(len(values), deadline)
            try:
                status, _headers, payload = self._attempt(server, body, deadline, no_wait=no_wait)
            except _Lost:
                pool.failed(server)
                self._count("resent")
                continue
            finally:
                pool.release(server, len(values))
            if status == 504:  # the server dropped the items: our deadline passed there
                raise ServingTimeout(f"{self.name}: no answer within the deadline ({self.timeout:g} s); "
                                     f"{server.node} dropped the request when it passed",
                                     hint="pass a longer `timeout=` to serving() or batched_run()")
            if status == 503:
                pool.failed(server, draining=True)
                self._count("redirected")
                continue
            if status != 200:
                raise ServingError(f"{self.name}: the server on {server.node} answered {status}: "
                                   f"{payload[:300].decode(errors='replace')}")
            results = wire.decode(payload)
            if len(results) != len(values):
                raise ServingError(f"{self.name}: {server.node} answered {len(results)} results for {len(values)} items")
            with self._lock:
                self._stats["requests"] += 1
                self._stats["items"] += len(values)
                self._answered_by[server.node] += 1
            return [(result, server.node) for result in results]

    def _attempt(self, server: _Server, body: bytes, deadline: float, *,
                 no_wait: bool) -> tuple[int, dict[str, str], bytes]:
        channel = self._pool.channel(server, deadline)
        reusable = False
        try:
            answer = channel.post("/infer", body, deadline, no_wait=no_wait)
            reusable = True
            return answer
        except TimeoutError:
            raise ServingTimeout(f"{self.name}: no answer within the deadline ({self.timeout:g} s); "
                                 f"the request was on {server.node}",
                                 hint="pass a longer `timeout=` to serving() or batched_run()") from None
        finally:
            self._pool.done_with(server, channel, reusable=reusable)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    # -- looking at it ---------------------------------------------------------------------
    def servers(self) -> list[dict[str, Any]]:
        """The servers in the pool now: node, proc, outstanding items, draining."""
        with self._pool.cond:
            return [{"node": s.node, "proc": s.proc, "outstanding": s.outstanding, "draining": s.draining,
                     "usable": s.usable(time.monotonic())} for s in self._pool.servers.values()]

    def stats(self) -> dict[str, Any]:
        """Counts since the start: `calls` answered (of batched_run, map's included),
        `requests` answered (the items of concurrent calls travel together, so fewer),
        their `items`, `resent` (attempts lost with their channel and sent again),
        `redirected` (turned away by a draining server before it took them), and
        requests answered per node."""
        with self._lock:
            return {"calls": self._stats["calls"], "requests": self._stats["requests"], "items": self._stats["items"],
                    "resent": self._stats["resent"], "redirected": self._stats["redirected"],
                    "answered_by": dict(self._answered_by)}

    def close(self) -> None:
        self._coalescer.close()
        self._pool.close()
