"""The one reconciler's planner: what to do to bring a fleet to its spec.

`plan(spec, observed, records, probes, now)` is pure: it reads what the provider lists
(`observed`), the fleet's record of each node (`records`, with its lifecycle step,
failures in a row, back-off and unreachability), what the last SSH probe found
(`probes`), and the time, and returns the actions that `fleet.applier` carries out.
`fleet up` runs it once (`probes=None`: nothing judged unreachable, every live node
brought forward, back-off ignored: the user asked now); the monitor runs it every
pass. One liveness rule, one next-generation formula, for both.

A node's lifecycle, in its record: requested -> created -> ssh_ready -> runtime ->
setup_done -> exported (the head) / mounted (a worker) -> job_started. A live node
whose record is behind (its export failed, its create timed out after the machine
existed, `up` was killed midway, its mount died with the head) is brought forward.

Zone cool-down: a zone (AWS: a subnet or zone) that answered "no capacity" (`stockouts`,
zone -> when) is left out of the zones a new node may use for `monitor.zone_cooldown`
seconds, so replacements go to another allowed zone at once instead of asking the empty
one first every pass. When every zone is cooling down, all are tried, the one that ran
out longest ago first. A head whose data disk exists still goes to the disk's zone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from fleet.model import Accelerator, Node, NodeRequest, NodeState, Role, head_name, worker_name
from fleet.spec.models import FleetSpec
from fleet.state import NodeRecord

STEPS = ("requested", "created", "ssh_ready", "runtime", "setup_done", "ready", "job_started")
_RANK = {step: i for i, step in enumerate(STEPS)} | {"exported": STEPS.index("ready"), "mounted": STEPS.index("ready")}
DOWN = (NodeState.PREEMPTED, NodeState.TERMINATED)


def step_rank(step: str | None) -> int:
    return _RANK.get(step or "created", 1)


def ready_step(role: Role) -> str:
    """The step after which a node does its part: the head exports, a worker mounts."""
    return "exported" if role == Role.HEAD else "mounted"


@dataclass(frozen=True)
class Probe:
    """One SSH probe of a node: did it answer, and (a worker recorded as mounted) does
    its mount of the shared directory still answer (None: not asked)."""

    ssh: bool
    mounted: bool | None = None


# -- actions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lost:
    """A node the fleet owned is gone or dead: record it (event, record marked gone)."""

    name: str
    kind: str  # preempted | terminated | unreachable | stopped | create_lost
    detail: str
    state: str  # the state the record keeps
    gone: bool = True  # False: stopped, to be started (its record stays)


@dataclass(frozen=True)
class Delete:
    node: Node
    reason: str


@dataclass(frozen=True)
class Create:
    request: NodeRequest
    replaces: tuple[str, ...] = ()  # the lost nodes it stands in for
    attempt: int = 1  # failures in a row of this slot + 1, for the back-off of a failure
    replacement: bool = False  # in place of a lost node (False: the fleet's first of this slot)

    @property
    def stands_for(self) -> str:
        return ",".join(self.replaces) or f"(slot {self.request.slot})"


@dataclass(frozen=True)
class Start:
    """Start a stopped node (a head after host maintenance); keeps its disks and name.
    If the provider cannot start it (terminated for good), `fallback` replaces it."""

    node: Node
    fallback: Create
    attempt: int = 1


@dataclass(frozen=True)
class BringForward:
    """A live node whose record is behind: run the bring-up steps it lacks."""

    node: Node
    reason: str
    attempt: int = 1


@dataclass(frozen=True)
class Exhausted:
    detail: str


Action = Lost | Delete | Create | Start | BringForward | Exhausted


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)

    def of(self, kind: type) -> list:
        return [a for a in self.actions if isinstance(a, kind)]

    def __bool__(self) -> bool:
        return bool(self.actions)


# -- requests ------------------------------------------------------------------------------
def head_request(spec: FleetSpec, generation: int = 1) -> NodeRequest:
    head = spec.head
    return NodeRequest(
        name=head_name(spec.name), role=Role.HEAD, slot=0, generation=generation, spot=head.spot,
        machine=head.machine, disk_gb=head.disk_gb,
        accelerators=Accelerator(head.accelerators.type, head.accelerators.count) if head.accelerators else None,
    )


def worker_request(spec: FleetSpec, slot: int, generation: int) -> NodeRequest:
    workers = spec.workers
    return NodeRequest(
        name=worker_name(spec.name, slot, generation), role=Role.WORKER, slot=slot,
        generation=generation, spot=workers.spot, machine=workers.machine, disk_gb=workers.disk_gb,
        accelerators=Accelerator(workers.accelerators.type, workers.accelerators.count)
        if workers.accelerators else None,
    )


def allowed_zones(spec: FleetSpec) -> list[str]:
    """The zones (AWS: subnets, else zones) a new node may go to, in the spec's order;
    [] where the provider places nodes itself (local, an AWS region without zones)."""
    if spec.provider == "gcp" and spec.gcp is not None:
        return list(spec.gcp.zones)
    if spec.provider == "aws" and spec.aws is not None:
        return list(spec.aws.subnets or spec.aws.zones)
    return []


def zones_to_try(spec: FleetSpec, stockouts: Mapping[str, float], now: float) -> tuple[str, ...] | None:
    """The zones a new node is asked for, without those cooling down after a stockout;
    None: every allowed zone, in the spec's order (none is cooling down)."""
    allowed = allowed_zones(spec)
    cooldown = spec.monitor.zone_cooldown
    cooling = {zone: stockouts[zone] for zone in allowed if zone in stockouts and now - stockouts[zone] < cooldown}
    if not cooling:
        return None
    rest = tuple(zone for zone in allowed if zone not in cooling)
    return rest or tuple(sorted(allowed, key=lambda zone: cooling[zone]))


def next_generation(role: Role, slot: int, observed: Sequence[Node], records: Sequence[NodeRecord]) -> int:
    """The generation of a slot's next node: one more than any the fleet ever recorded
    or the provider lists for it (a record may be lost, a listing may lag)."""
    seen = [n.generation for n in observed if n.role == role and n.slot == slot]
    seen += [r.generation for r in records if r.role == role.value and r.slot == slot]
    return max([0, *seen]) + 1


# -- the one liveness rule -----------------------------------------------------------------
def is_lost(node: Node, record: NodeRecord | None, probe: Probe | None, now: float, grace: float) -> bool:
    """Dead for good: the provider says PREEMPTED/TERMINATED, or it is RUNNING/UNREACHABLE
    and the probes have failed for longer than `grace` (a node is never judged by a
    record alone: only a failing probe of this pass counts). PENDING is alive."""
    if node.state in DOWN:
        return True
    if probe is None or probe.ssh or record is None or record.unreachable_since is None:
        return False
    return now - record.unreachable_since >= grace


def _behind(node: Node, record: NodeRecord | None, probe: Probe | None) -> str | None:
    """Why a live, answering node needs bring-up steps, or None."""
    if record is None or record.gone:
        return "not in the fleet's record"
    if step_rank(record.step) < step_rank(ready_step(node.role)):
        failed = f" ({record.failed_step} failed: {record.last_error})" if record.failed_step else ""
        return f"its record stops at {record.step}{failed}"
    if probe is not None and probe.mounted is False:
        return "its mount of the shared directory does not answer"
    return None


def plan(
    spec: FleetSpec,
    observed: Sequence[Node],
    records: Sequence[NodeRecord],
    probes: Mapping[str, Probe] | None,
    now: float,
    *,
    replacements_left: int | None = None,
    stockouts: Mapping[str, float] | None = None,
) -> Plan:
    """The actions that bring the fleet to its spec. `probes=None` is `fleet up`: no
    node judged by SSH, every live node brought forward, back-off ignored.
    `replacements_left` (the monitor's `max_replacements` budget; None: no limit)
    bounds the nodes created in place of lost ones. `stockouts` (zone -> when it had no
    capacity) cools zones down: new nodes are asked for in the other zones."""
    up = probes is None
    zones = zones_to_try(spec, stockouts or {}, now)

    def placed(request: NodeRequest) -> NodeRequest:
        return request if zones is None else replace(request, zones=zones)

    probes = probes or {}
    grace = spec.monitor.grace
    out = Plan()
    by_name = {r.name: r for r in records}
    listed = {n.name for n in observed}
    budget = replacements_left
    exhausted = False

    def take_budget() -> bool:
        nonlocal budget, exhausted
        if budget is None:
            return True
        if budget <= 0:
            exhausted = True
            return False
        budget -= 1
        return True

    def lose(node: Node, record: NodeRecord | None, *, stopped: bool = False) -> None:
        if record is not None and (record.gone or (stopped and record.state == node.state.value)):
            return  # already recorded
        if stopped:
            out.actions.append(Lost(node.name, "stopped", node.reason or f"provider reports {node.state.value}",
                                    node.state.value, gone=False))
        elif node.state in DOWN:
            kind = "preempted" if node.state == NodeState.PREEMPTED else "terminated"
            out.actions.append(Lost(node.name, kind, node.reason or f"provider reports {node.state.value}",
                                    node.state.value))
        else:
            out.actions.append(Lost(node.name, "unreachable", f"no SSH answer for more than {grace:g} s",
                                    node.state.value))

    def vanish(record: NodeRecord) -> None:
        if record.step == "requested":
            out.actions.append(Lost(record.name, "create_lost", "requested, never listed by the provider",
                                    "TERMINATED"))
            return
        out.actions.append(Lost(record.name, "preempted" if record.spot else "terminated",
                                "gone from the provider's list without fleet deleting it",
                                "PREEMPTED" if record.spot else "TERMINATED"))

    def due(record: NodeRecord | None) -> bool:
        """Not backing off after a failure (`up` never waits: the user asked now)."""
        return up or record is None or record.retry_at is None or now >= record.retry_at

    # -- the head --------------------------------------------------------------------------
    head_moves = False  # (re)started or replaced in this plan: every worker remounts it
    head_usable = False  # workers can be mounted on it in this plan
    heads = [n for n in observed if n.role == Role.HEAD]
    head_record = by_name.get(head_name(spec.name))
    head_attempt = (head_record.failures if head_record is not None else 0) + 1
    existing = bool(spec.head.host)  # a machine fleet does not own: never started nor replaced
    alive = heads if existing else [n for n in heads
                                    if not is_lost(n, by_name.get(n.name), probes.get(n.name), now, grace)]
    if existing or alive:
        if alive:
            head = alive[0]
            if head.state == NodeState.RUNNING or (up and head.state == NodeState.PENDING):
                why = "bring-up" if up else _behind(head, head_record, probes.get(head.name))
                if why is None:
                    head_usable = True
                elif due(head_record):
                    out.actions.append(BringForward(head, why, attempt=head_attempt))
                    head_usable = True
    else:
        if heads:
            lost_head = heads[0]
            if lost_head.state in DOWN:  # stopped (host maintenance, a stopped instance): start it
                lose(lost_head, head_record, stopped=True)
                if due(head_record):
                    fallback = Create(placed(head_request(spec)), (lost_head.name,), head_attempt, replacement=True)
                    out.actions.append(Start(lost_head, fallback, attempt=head_attempt))
                    head_moves = True
            else:  # running, silent past the grace: a new head gets the data disk
                lose(lost_head, head_record)
                if due(head_record) and take_budget():
                    out.actions.extend(Delete(n, "remains of a lost head") for n in heads)
                    out.actions.append(Create(placed(head_request(spec)), (lost_head.name,), head_attempt,
                                              replacement=True))
                    head_moves = True
        else:
            if head_record is not None and not head_record.gone:
                vanish(head_record)
            first = head_record is None or (head_record.gone and head_record.failures == 0 and up)
            if due(head_record) and (first or take_budget()):
                replaces = (head_record.name,) if head_record is not None and not first else ()
                out.actions.append(Create(placed(head_request(spec)), replaces, head_attempt, replacement=not first))
                head_moves = True

    # -- the workers -----------------------------------------------------------------------
    workers = [n for n in observed if n.role == Role.WORKER]
    for record in records:
        if record.role == Role.WORKER.value and not record.gone and record.name not in listed:
            vanish(record)
    for slot in range(1, spec.workers.count + 1):
        in_slot = [n for n in workers if n.slot == slot]
        live = [n for n in in_slot if not is_lost(n, by_name.get(n.name), probes.get(n.name), now, grace)]
        if live:
            node = max(live, key=lambda n: n.generation)
            if node.state != NodeState.RUNNING and not (up and node.state == NodeState.PENDING):
                continue  # booting (`up` waits for it) or UNREACHABLE within its grace
            record = by_name.get(node.name)
            why = "bring-up" if up else _behind(node, record, probes.get(node.name))
            if why is None and head_moves:
                why = "the head was restarted or replaced: remount it"
            if why is None or not (head_usable or head_moves):
                continue  # in order, or nothing to mount yet (the head's own actions come first)
            if not head_moves and not due(record):
                continue
            attempt = (record.failures if record is not None and not record.gone else 0) + 1
            out.actions.append(BringForward(node, why, attempt=attempt))
            continue
        for node in in_slot:
            lose(node, by_name.get(node.name))
        slot_records = [r for r in records if r.role == Role.WORKER.value and r.slot == slot]
        latest = max(slot_records, key=lambda r: r.generation, default=None)
        if not due(latest) or not take_budget():
            continue
        out.actions.extend(Delete(n, "remains of a lost node") for n in in_slot)
        gone = [n.name for n in in_slot] + [r.name for r in slot_records if not r.gone and r.name not in listed]
        failures = latest.failures if latest is not None and latest.retry_at is not None else 0
        request = worker_request(spec, slot, next_generation(Role.WORKER, slot, observed, records))
        out.actions.append(Create(placed(request), tuple(gone), failures + 1, replacement=bool(slot_records or in_slot)))
    out.actions.extend(Delete(n, "beyond workers.count") for n in workers if n.slot > spec.workers.count)
    if exhausted:
        out.actions.append(Exhausted(f"monitor.max_replacements={spec.monitor.max_replacements} reached; "
                                     "lost nodes are no longer replaced"))
    return out
