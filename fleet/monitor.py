"""The reconcile loop: keep the fleet at its spec while machines disappear under it.

Every `monitor.interval` one pass compares what the spec wants (a head and
`workers.count` worker slots) with what the provider reports (one list call) and with
what answers over SSH (connections are reused, so a probe is one cheap `true`):

- a worker that is PREEMPTED or TERMINATED, or that vanished from the provider's list
  without `fleet` deleting it, is replaced at once;
- a RUNNING worker that does not answer SSH for longer than `monitor.grace` is replaced;
- a replacement deletes the remains, creates the slot's next generation (a new name),
  sets it up and mounts the shared dir, then `on_replaced` gives it the running job;
- failed replacements back off (doubling from `monitor.backoff`), and replacements stop
  at `monitor.max_replacements` with a clear event.

Every decision is an event in the fleet's state. The clock and sleep are injectable so
that tests of the decisions do not wait for real.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleet.fleetops import Fleet, UpResult
from fleet.model import Node, NodeState, Role
from fleet.state import make_private_dir

OnReplaced = Callable[[list[Node], list[Node]], None]  # (new nodes, every alive node)
MONITOR_LOCK = "monitor.lock"


@contextlib.contextmanager
def monitor_lock(state_dir: Path) -> Iterator[None]:
    """The fleet's one monitor lock (`.fleet/<name>/monitor.lock`, flock), held for a pass."""
    make_private_dir(state_dir)
    fd = os.open(state_dir / MONITOR_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class PassReport:
    observed: list[Node] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)  # old -> new
    failed: dict[str, str] = field(default_factory=dict)
    exhausted: bool = False


class Monitor:
    def __init__(
        self,
        fleet: Fleet,
        *,
        on_replaced: OnReplaced | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        probe_ssh: bool = True,
    ) -> None:
        self.fleet = fleet
        self.spec = fleet.spec
        self.on_replaced = on_replaced
        self.clock = clock
        self.sleep = sleep
        self.probe_ssh = probe_ssh
        self.unreachable_since: dict[str, float] = {}
        self.failures_in_row: dict[int, int] = {}
        self.next_attempt: dict[int, float] = {}
        self.replacements = 0
        self.exhausted = False
        self._reported_lost: set[str] = set()
        # On a session of its own (`Fleet.session`), stop() also ends the waits of a pass.
        self._stop = fleet.cancel if fleet.is_session else threading.Event()

    # -- one pass -------------------------------------------------------------------------
    def reconcile_once(self) -> PassReport:
        """One pass, holding the fleet's monitor lock: two monitors (`fleet run` and
        `fleet watch`) never decide at once, so a lost slot gets one next generation
        (the second monitor's pass observes what the first one created)."""
        with monitor_lock(self.fleet.paths.state_dir):
            return self._reconcile_pass()

    def _reconcile_pass(self) -> PassReport:
        report = PassReport()
        state = self.fleet.state
        observed = self.fleet.observe()
        report.observed = observed
        now = self.clock()
        by_slot: dict[int, list[Node]] = {}
        for node in observed:
            if node.role == Role.WORKER:
                by_slot.setdefault(node.slot, []).append(node)
        # Nodes the record says are ours and alive, that the provider no longer lists.
        listed = {n.name for n in observed}
        vanished = [r for r in state.nodes() if r.role == "worker" and r.name not in listed]
        for record in vanished:
            if record.name not in self._reported_lost:
                self._reported_lost.add(record.name)
                state.add_event("preempted" if record.spot else "terminated", record.name,
                                "gone from the provider's list without fleet deleting it")
                state.mark_gone(record.name, "PREEMPTED" if record.spot else "TERMINATED")
                report.lost.append(record.name)

        running = [n for n in observed if n.state == NodeState.RUNNING and n.role == Role.WORKER]
        unreachable = self._probe(running, now) if self.probe_ssh and running else set()

        to_replace: dict[int, list[Node]] = {}
        for slot in range(1, self.spec.workers.count + 1):
            nodes = by_slot.get(slot, [])
            live = [n for n in nodes if n.state in (NodeState.RUNNING, NodeState.PENDING)]
            healthy = [n for n in live if n.name not in unreachable]
            if healthy:
                continue
            dead = [n for n in nodes if n not in healthy]
            for node in dead:
                if node.name in self._reported_lost:
                    continue
                self._reported_lost.add(node.name)
                if node.state in (NodeState.PREEMPTED, NodeState.TERMINATED):
                    kind = "preempted" if node.state == NodeState.PREEMPTED else "terminated"
                    state.add_event(kind, node.name, node.reason or f"provider reports {node.state.value}")
                else:
                    state.add_event("unreachable", node.name,
                                    f"no SSH answer for more than {self.spec.monitor.grace:g} s")
                report.lost.append(node.name)
            if now < self.next_attempt.get(slot, 0.0):
                continue
            to_replace[slot] = dead
        if to_replace:
            self._replace(to_replace, report)
        report.exhausted = self.exhausted
        return report

    def _probe(self, nodes: Sequence[Node], now: float) -> set[str]:
        """Names of nodes unreachable for longer than the grace period."""
        results = self.fleet.executor.run([self.fleet.target(n) for n in nodes], "true",
                                          timeout=self.spec.ssh.connect_timeout)
        lost = set()
        for node in nodes:
            if results.results[node.name].ok:
                if self.unreachable_since.pop(node.name, None) is not None:
                    self.fleet.state.add_event("reachable", node.name, "answers SSH again")
                continue
            self.fleet.executor.drop(node.name)
            since = self.unreachable_since.setdefault(node.name, now)
            if now - since >= self.spec.monitor.grace:
                lost.add(node.name)
        return lost

    def _replace(self, slots: dict[int, list[Node]], report: PassReport) -> None:
        state = self.fleet.state
        budget = self.spec.monitor.max_replacements - self.replacements
        if budget <= 0:
            if not self.exhausted:
                self.exhausted = True
                state.add_event("replacements_exhausted", None,
                                f"monitor.max_replacements={self.spec.monitor.max_replacements} reached; "
                                "lost nodes are no longer replaced")
            return
        chosen = dict(list(slots.items())[:budget])
        remains = [n for nodes in chosen.values() for n in nodes]
        if remains:
            self.fleet.delete_nodes(remains, "remains of a lost node")
            for node in remains:
                self.unreachable_since.pop(node.name, None)
        requests = []
        for slot, nodes in chosen.items():
            generation = max([state.max_generation(slot), *[n.generation for n in nodes]]) + 1
            requests.append(self.fleet.worker_request(slot, generation))
        result = UpResult()
        created = self.fleet.create_nodes(requests, result)
        # The head comes along: bring_up exports the shared dir from it (idempotent) and
        # mounts it on the new workers; without it no worker can be mounted.
        head = self.fleet.head(report.observed)
        ready = self.fleet.bring_up([head, *created] if head else created, result) if created else []
        ready_workers = [n for n in ready if n.role == Role.WORKER and n.name not in result.failures]
        old_by_slot = {slot: ",".join(n.name for n in nodes) or "(vanished)" for slot, nodes in chosen.items()}
        for node in ready_workers:
            self.replacements += 1
            self.failures_in_row.pop(node.slot, None)
            self.next_attempt.pop(node.slot, None)
            old = old_by_slot.get(node.slot, "")
            report.replaced[old] = node.name
            state.add_event("replaced", node.name, f"replaces {old} in slot {node.slot}")
        for request in requests:
            if request.name in result.failures:
                failures = self.failures_in_row.get(request.slot, 0) + 1
                self.failures_in_row[request.slot] = failures
                delay = self.spec.monitor.backoff * (2 ** (failures - 1))
                self.next_attempt[request.slot] = self.clock() + delay
                report.failed[request.name] = result.failures[request.name]
                state.add_event("replace_failed", request.name,
                                f"{result.failures[request.name]}; next try in {delay:g} s")
                # Whatever was created for it is of no use: do not leave it running.
                self.fleet.delete_nodes([n for n in created if n.name == request.name], "failed replacement")
        if ready_workers:
            self.fleet.write_ssh_config(self.fleet.alive())
            if self.on_replaced is not None:
                self.on_replaced(ready_workers, self.fleet.alive())

    # -- loop -----------------------------------------------------------------------------
    def run(self, *, until: Callable[[], bool] | None = None) -> None:
        """Reconcile every interval until `stop()` or `until()` says so."""
        while not self._stop.is_set() and not (until and until()):
            started = self.clock()
            try:
                self.reconcile_once()
            except Exception as error:  # noqa: BLE001 -- one bad pass must not end the watch
                self.fleet.state.add_event("monitor_error", None, f"{type(error).__name__}: {error}")
            remaining = self.spec.monitor.interval - (self.clock() - started)
            if remaining > 0:
                self._stop.wait(remaining) if self.sleep is time.sleep else self.sleep(remaining)

    def stop(self) -> None:
        """End the loop; a pass in progress gives up its waits (SSH readiness, cloud
        operations, commands) at once when the fleet handle is a session of its own."""
        self._stop.set()

    def replacing_head(self) -> bool:
        """Whether a new head is being brought up (`fleet run` waits for it past its
        grace). This monitor does not replace heads."""
        return False
