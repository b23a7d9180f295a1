"""The one applier: carry out a `fleet.reconcile` plan on a fleet, for `up` and the monitor.

In order: record what was lost, delete remains, start stopped nodes (a head that cannot
be started is replaced instead), create the new ones, then one bring-up of every node
the plan touched (SSH ready -> runtime -> setup -> export -> mounts). Each step's
outcome goes into the node's record: a completed step clears its failures, a failed one
counts a failure in a row and sets when to try again (`monitor.backoff`, doubling).
A replacement that fails on its own (setup, SSH) is deleted and its slot backs off; one
that is only waiting for the head (the head's export failed) is kept and brought
forward once the head is back. The nodes that came up get the running job
(`on_replaced`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleet.bringup import BringUp
from fleet.errors import FleetError
from fleet.model import Node, NodeState, Role, head_name
from fleet.reconcile import BringForward, Create, Delete, Exhausted, Lost, Plan, Start

if TYPE_CHECKING:
    from fleet.fleetops import Fleet, UpResult

OnReplaced = Callable[[list[Node], list[Node]], None]  # (nodes that came up, every alive node)


@dataclass
class PassReport:
    observed: list[Node] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)  # old (or "(slot N)") -> new
    started: list[str] = field(default_factory=list)
    brought_forward: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    exhausted: bool = False
    replacements: int = 0  # new nodes in place of lost ones that came up


class Applier:
    def __init__(self, fleet: Fleet, *, on_replaced: OnReplaced | None = None, monitor: bool = True,
                 clock: Callable[[], float] | None = None) -> None:
        self.fleet = fleet
        self.clock = clock or fleet.clock
        self.on_replaced = on_replaced
        # The monitor deletes a replacement that failed on its own (and tries a new one
        # after the back-off); `up` keeps it to show the error and retries it next time.
        self.monitor = monitor
        self.exhausted = False

    def _retry_in(self, attempt: int) -> float:
        return self.fleet.spec.monitor.backoff * (2 ** (attempt - 1))

    def _fail(self, name: str, step: str, message: str, attempt: int, kind: str | None) -> None:
        delay = self._retry_in(attempt)
        state = self.fleet.state
        state.record_failure(name, step, message, failures=attempt, retry_at=self.clock() + delay)
        if kind is not None:
            state.add_event(kind, name, f"{message}; next try in {delay:g} s")

    def apply(self, plan: Plan, result: UpResult, report: PassReport, *, prepare: bool = False) -> list[Node]:
        """Carry out `plan`; failures per node go to `result.failures`. Returns the nodes
        the plan brought up (set up, exported or mounted)."""
        fleet, state = self.fleet, self.fleet.state
        for lost in plan.of(Lost):
            state.add_event(lost.kind, lost.name, lost.detail)
            if lost.gone:
                state.mark_gone(lost.name, lost.state)
                fleet.forget_machine(lost.name)
            else:  # stopped: the same machine (and host key) comes back
                state.set_node_state(lost.name, lost.state)
                fleet.executor.drop(lost.name)
            report.lost.append(lost.name)
        if plan.of(Exhausted) and not self.exhausted:
            self.exhausted = True
            state.add_event("replacements_exhausted", None, plan.of(Exhausted)[0].detail)
        report.exhausted = self.exhausted
        deletes: list[Delete] = plan.of(Delete)
        for reason in dict.fromkeys(d.reason for d in deletes):
            result.deleted.extend(fleet.delete_nodes([d.node for d in deletes if d.reason == reason], reason))
        if prepare:
            # Every time, not only when creating: the firewall follows the caller's address.
            for item in fleet.provider.prepare():
                fleet.log(f"cloud resources: {item}")

        creates: list[Create] = plan.of(Create)
        started = self._start(plan.of(Start), creates, result, report)
        created = self._create(creates, result, report)
        forwards: list[BringForward] = plan.of(BringForward)
        for forward in forwards:
            record = state.node(forward.node.name)
            if record is None or record.gone:
                state.upsert_node(forward.node)
            if forward.reason != "bring-up":
                fleet.log(f"{forward.node.name}: bringing it forward: {forward.reason}")
        nodes = [*started, *created.values(), *[f.node for f in forwards]]
        nodes.sort(key=lambda n: n.role != Role.HEAD)
        if not nodes:
            return []
        ready = BringUp(fleet).bring_up(nodes, result)
        ready_names = {n.name for n in ready}
        head = head_name(fleet.spec.name)
        head_failure = result.failures.get(head) if head not in ready_names else None
        given: list[Node] = []
        attempts = {c.request.name: c for c in creates}
        for node in nodes:
            ok = node.name in ready_names
            create = attempts.get(node.name)
            forward = next((f for f in forwards if f.node.name == node.name), None)
            attempt = create.attempt if create else forward.attempt if forward else 1
            if ok:
                given.append(node)
                if create is not None and create.replacement and self.monitor:
                    old = create.stands_for
                    report.replaced[old] = node.name
                    report.replacements += 1
                    state.add_event("replaced", node.name, f"replaces {old} in slot {node.slot}")
                elif create is None and forward is not None and forward.reason != "bring-up":
                    report.brought_forward.append(node.name)
                    state.add_event("brought_forward", node.name, forward.reason)
                continue
            own = node.name in result.failures
            message = result.failures.get(node.name) or (
                f"waits for the head: {head}: {head_failure}" if head_failure is not None
                else "the shared directory could not be mounted")
            result.failures.setdefault(node.name, message)
            report.failed[node.name] = message
            record = state.node(node.name)
            step = record.step if record is not None else "created"
            if create is not None and create.replacement and own and self.monitor and node.role == Role.WORKER:
                # Of no use: do not leave it running; the slot tries a new one after the back-off.
                self._fail(node.name, step, message, attempt, "replace_failed")
                fleet.delete_nodes([node], "failed replacement")
            else:
                # Kept (its head is the problem, or `up` shows the error): brought forward later.
                self._fail(node.name, step, message, attempt,
                           "replace_failed" if create is not None and create.replacement else "bring_up_failed")
        if given and self.monitor:
            alive = fleet.alive()
            fleet.write_ssh_config(alive)
            if self.on_replaced is not None:
                self.on_replaced(given, alive)
        return ready

    def _start(self, starts: Sequence[Start], creates: list[Create], result: UpResult,
               report: PassReport) -> list[Node]:
        """Start stopped nodes; those the provider cannot start are replaced (their
        fallback joins `creates`)."""
        if not starts:
            return []
        fleet = self.fleet
        names = [s.node.name for s in starts]
        fleet.log(f"starting stopped node(s): {', '.join(names)}")
        error = ""
        try:
            done = set(fleet.provider.start(names))  # a node not named in it was not started
        except FleetError as failure:
            done, error = set(), str(failure)
        nodes = []
        for item in starts:
            name = item.node.name
            fleet.executor.drop(name)
            if name in done:
                fleet.state.add_event("started", name, "a stopped node was started (its disks kept)")
                report.started.append(name)
                # PENDING: the bring-up lists it again until it has its (maybe new) address.
                nodes.append(dataclasses.replace(item.node, state=NodeState.PENDING, address=None))
                continue
            why = error or f"the provider cannot start it ({item.node.state.value})"
            fleet.state.add_event("start_failed", name, f"{why}; replacing it")
            result.deleted.extend(fleet.delete_nodes([item.node], "could not be started: replaced"))
            creates.append(item.fallback)
        return nodes

    def _create(self, creates: Sequence[Create], result: UpResult, report: PassReport) -> dict[str, Node]:
        if not creates:
            return {}
        fleet = self.fleet
        for create in creates:
            request = create.request
            fleet.state.record_request(request.name, role=request.role.value, slot=request.slot,
                                       generation=request.generation, spot=request.spot)
        fleet.log(f"creating {len(creates)} node(s): {', '.join(c.request.name for c in creates)}")
        nodes = {n.name: n for n in fleet.create_nodes([c.request for c in creates], result)}
        for create in creates:
            name = create.request.name
            if name in nodes:
                continue
            message = result.failures.get(name, "not created")
            report.failed[name] = message
            # (create_nodes recorded the create_failed event)
            self._fail(name, "requested", message, create.attempt, "replace_failed" if create.replacement else None)
            fleet.state.mark_gone(name, "TERMINATED")
        return nodes
