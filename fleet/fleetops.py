"""One command's session with a fleet, and `up`.

`Fleet` holds the session's resources: its spec, its files under `.fleet/<name>/`
(keys, known_hosts, ssh_config, state.db), its provider and its SSH executor
(connections opened once, reused across phases), and the views of its nodes. `up()`
converges once: the reconciler's plan (`fleet.reconcile`) carried out by the one
applier (`fleet.applier`), whose bring-up steps are `fleet.bringup`'s; a failed node is
reported and the others carry on. Teardown is `fleet.teardown` (`down()` here calls it):
everything the provider finds by label, even with no local state.
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from fleet.errors import ProviderError, UsageError
from fleet.model import Node, NodeRequest, NodeState, Role, head_name
from fleet.providers import Provider, ProviderContext, get_provider
from fleet.providers.base import CleanupReport
from fleet.providers.localnode import generate_ed25519_keypair
from fleet.reconcile import Create, Delete, Plan, Probe, head_request, worker_request
from fleet.reconcile import plan as plan_actions
from fleet.runtime import Runtime, env_assignments
from fleet.share import ShareEndpoint
from fleet.spec.models import FleetSpec
from fleet.ssh import Executor, GroupResult, HostKeyStore, Target, write_ssh_config
from fleet.ssh.quote import home_path
from fleet.state import State, exclusive_lock, make_private_dir

Log = Callable[[str], None]
UP_LOCK = "up.lock"  # in .fleet/<name>/: one `fleet up` of a fleet at a time


@dataclass(frozen=True)
class FleetPaths:
    state_dir: Path
    key: Path
    generated_key: bool
    mount_key: Path
    known_hosts: Path
    ssh_config: Path
    db: Path

    @classmethod
    def for_spec(cls, spec: FleetSpec, spec_path: Path) -> FleetPaths:
        state_dir = spec_path.resolve().parent / ".fleet" / spec.name
        key = Path(os.path.expanduser(spec.ssh.key)) if spec.ssh.key else state_dir / "id_ed25519"
        if spec.ssh.key and not key.is_absolute():
            key = spec_path.resolve().parent / key
        return cls(
            state_dir=state_dir,
            key=key,
            generated_key=spec.ssh.key is None,
            mount_key=state_dir / "mount_ed25519",
            known_hosts=state_dir / "known_hosts",
            ssh_config=state_dir / "ssh_config",
            db=state_dir / "state.db",
        )


@dataclass
class UpResult:
    nodes: list[Node] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def _q(value: str) -> str:
    return shlex.quote(value)




class Fleet:
    """One CLI invocation's handle on a fleet."""

    def __init__(
        self,
        spec: FleetSpec,
        spec_path: Path,
        *,
        log: Log | None = None,
        on_line: Callable[[str, str, str], None] | None = None,
        clock: Callable[[], float] = time.time,
        cancel: threading.Event | None = None,
    ) -> None:
        self.spec = spec
        self.cancel = cancel or threading.Event()  # set: every wait of this handle ends
        self.is_session = False  # made by session(): a monitor's own handle
        self.spec_path = Path(spec_path)
        self.paths = FleetPaths.for_spec(spec, self.spec_path)
        self.log: Log = log or (lambda message: None)
        self.clock = clock
        self._on_line = on_line
        self._provider: Provider | None = None
        self._executor: Executor | None = None
        self._state: State | None = None
        self.user = spec.ssh_user(getpass.getuser())
        self._vouched: dict[str, str] = {}  # node -> host key the provider vouched for
        self.share: ShareEndpoint | None = None  # set by export_shared
        self._warned_tofu: set[str] = set()
        self.runtime = Runtime(self)

    # -- lazily built parts --------------------------------------------------------------
    @property
    def state(self) -> State:
        if self._state is None:
            self._state = State(self.paths.db, clock=self.clock)
        return self._state

    def public_key(self) -> str:
        pub = Path(f"{self.paths.key}.pub")
        if pub.exists():
            return pub.read_text().strip()
        if self.paths.generated_key or not self.paths.key.exists():
            if not self.paths.generated_key:
                raise UsageError(f"ssh.key {self.paths.key} does not exist")
            make_private_dir(self.paths.state_dir)
            return generate_ed25519_keypair(self.paths.key, f"fleet-{self.spec.name}")
        raise UsageError(f"the public key {pub} of ssh.key is missing", hint=f"ssh-keygen -y -f {self.paths.key} > {pub}")

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            context = ProviderContext(
                spec=self.spec, state_dir=self.paths.state_dir, public_key=self.public_key(), ssh_user=self.user,
                cancel=self.cancel,
            )
            self._provider = get_provider(context)
        return self._provider

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self.public_key()  # make sure the key exists
            self._executor = Executor(
                self.paths.key,
                HostKeyStore(self.paths.known_hosts),
                parallelism=self.spec.ssh.parallelism,
                connect_timeout=self.spec.ssh.connect_timeout,
                command_timeout=self.spec.ssh.command_timeout,
                on_line=self._on_line,
                cancel=self.cancel,
            )
        return self._executor

    def session(self, cancel: threading.Event) -> Fleet:
        """A handle on the same fleet with SSH connections, cloud clients and a state
        connection of its own, whose waits end when `cancel` is set: the monitor's, so
        that a pass never waits on the follower's connections nor outlives its stop."""
        session = Fleet(self.spec, self.spec_path, log=self.log, clock=self.clock, cancel=cancel)
        session.is_session = True
        return session

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
        if self._provider is not None:
            self._provider.close()
        if self._state is not None:
            self._state.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observing -----------------------------------------------------------------------
    def existing_head(self) -> Node | None:
        head = self.spec.head
        if not head.host:
            return None
        return Node(
            name=head_name(self.spec.name), fleet=self.spec.name, role=Role.HEAD, state=NodeState.RUNNING,
            address=head.host, port=head.port, zone="existing", spot=False, machine="existing",
        )

    def observe(self) -> list[Node]:
        """Every node the provider reports (one list call), plus an existing head."""
        nodes = self.provider.list()
        head = self.existing_head()
        if head is not None:
            nodes = [head, *[n for n in nodes if n.role != Role.HEAD]]
        return sorted(nodes, key=lambda n: (n.role != Role.HEAD, n.slot, n.generation))

    def alive(self, nodes: Sequence[Node] | None = None) -> list[Node]:
        return [n for n in (self.observe() if nodes is None else nodes) if n.state == NodeState.RUNNING]

    def head(self, nodes: Sequence[Node] | None = None) -> Node | None:
        return next((n for n in self.alive(nodes) if n.role == Role.HEAD), None)

    def target(self, node: Node) -> Target:
        """How to reach `node`. Its host key is the one the provider vouched for (or the
        spec's `head.host_key` for an existing head); a node with none is only trusted on
        first use when the spec lists its name in `ssh.trust_on_first_use`."""
        existing = node.role == Role.HEAD and bool(self.spec.head.host)
        user = self.spec.head.user if existing and self.spec.head.user else self.user
        host_key = node.host_key or self._vouched.get(node.name) or (self.spec.head.host_key if existing else None)
        tofu = node.name in self.spec.ssh.trust_on_first_use and host_key is None
        if tofu and node.name not in self._warned_tofu and self.executor.known_hosts.get(node.name) is None:
            self._warned_tofu.add(node.name)
            self.log(f"warning: {node.name}: trusting the host key it shows on first contact "
                     "(ssh.trust_on_first_use); an attacker on the path could answer instead")
        return Target(
            name=node.name, address=node.address or "", port=node.port, user=user,
            host_key=host_key, trust_on_first_use=tofu,
        )

    def fetch_vouched_host_keys(self, nodes: Sequence[Node]) -> None:
        """Ask the provider for the host keys of the nodes not pinned yet (new nodes, or
        known_hosts was lost), before the first connection to them."""
        missing = [n for n in nodes if not n.host_key and n.name not in self._vouched
                   and self.executor.known_hosts.get(n.name) is None
                   and not (n.role == Role.HEAD and self.spec.head.host)]
        if missing:
            self.log(f"reading the host keys the provider vouches for of {len(missing)} node(s)")
            self._vouched.update(self.provider.vouched_host_keys(missing, timeout=self.spec.ssh.ready_timeout))

    def select(self, nodes: Sequence[Node], selector: str) -> list[Node]:
        """`all`, `head`, `workers`, or a comma-separated list of node names."""
        alive = self.alive(nodes)
        if selector == "all":
            return alive
        if selector == "head":
            return [n for n in alive if n.role == Role.HEAD]
        if selector == "workers":
            return [n for n in alive if n.role == Role.WORKER]
        names = [name.strip() for name in selector.split(",") if name.strip()]
        by_name = {n.name: n for n in nodes}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise UsageError(f"no node named {', '.join(unknown)} in fleet {self.spec.name}",
                             hint="`fleet status` lists the nodes")
        return [by_name[name] for name in names]

    def shared_path_for(self, node: Node) -> str:
        return self.spec.shared.path if node.role == Role.HEAD else self.spec.shared.mount

    def node_env_prefix(self, node: Node, rank: int, count: int, extra: dict[str, str] | None = None) -> str:
        """`export ...;` for FLEET_* variables; FLEET_SHARED is resolved on the node."""
        words = [
            f"FLEET_NODE_NAME={_q(node.name)}",
            f"FLEET_NODE_RANK={rank}",
            f"FLEET_NUM_NODES={count}",
            f"FLEET_FLEET={_q(self.spec.name)}",
            f"FLEET_SHARED={home_path(self.shared_path_for(node))}",
        ]
        # umask 002: the head user and the share account share the shared dir by group.
        if self.runtime.enabled:
            words.extend(env_assignments())
        for key, value in (extra or {}).items():
            words.append(f"{key}={_q(value)}")
        return "umask 002; export " + " ".join(words) + "; "

    # -- exec ----------------------------------------------------------------------------
    def exec(self, nodes: Sequence[Node], command: str, *, timeout: float | None = None,
             stream: bool = False, extra_env: dict[str, str] | None = None,
             stdin: bytes | None = None) -> GroupResult:
        ranks = {n.name: i for i, n in enumerate(nodes)}
        by_name = {n.name: n for n in nodes}

        def command_for(target: Target) -> str:
            node = by_name[target.name]
            return self.node_env_prefix(node, ranks[node.name], len(nodes), extra_env) + command

        return self.executor.run([self.target(n) for n in nodes], command_for, timeout=timeout, stream=stream,
                                 stdin=stdin)

    # -- up ------------------------------------------------------------------------------
    def plan(self, observed: Sequence[Node], probes: Mapping[str, Probe] | None = None, *,
             now: float | None = None, replacements_left: int | None = None) -> Plan:
        """The reconciler's plan for this fleet (`fleet.reconcile.plan`); `probes=None`: `up`'s."""
        return plan_actions(self.spec, observed, self.state.nodes(include_gone=True), probes,
                            self.clock() if now is None else now, replacements_left=replacements_left,
                            stockouts=self.state.stockouts())

    def plan_requests(self, observed: Sequence[Node]) -> tuple[list[NodeRequest], list[Node]]:
        """What `up` would create and delete (`up --dry-run`): stopped nodes it would
        start are neither."""
        planned = self.plan(observed)
        return [c.request for c in planned.of(Create)], [d.node for d in planned.of(Delete)]

    def head_request(self) -> NodeRequest:
        return head_request(self.spec)

    def hourly_prices(self, names: Iterable[str]) -> dict[str, float]:
        """USD per hour of each named node of this fleet, estimated as `up --dry-run` does
        from the spec's head and worker machines; nodes of unknown price are left out."""
        requests = [self.worker_request(1, 1)] if self.spec.head.host else [self.head_request(), self.worker_request(1, 1)]
        by_role = {p.role: p.price_per_hour for p in self.provider.plan(requests) if p.price_per_hour is not None}
        head = head_name(self.spec.name)
        prices = {}
        for name in names:
            price = by_role.get(Role.HEAD.value if name == head else Role.WORKER.value)
            if price is not None:
                prices[name] = price
        return prices

    def worker_request(self, slot: int, generation: int) -> NodeRequest:
        return worker_request(self.spec, slot, generation)

    def create_nodes(self, requests: Sequence[NodeRequest], result: UpResult) -> list[Node]:
        for request in requests:
            self.state.add_event("requested", request.name, f"{request.role.value} slot {request.slot} "
                                 f"generation {request.generation}{' spot' if request.spot else ''}")
        created: list[Node] = []
        for outcome in self.provider.create(requests):
            name = outcome.request.name
            for zone in outcome.stockouts:
                self.state.record_stockout(zone, f"no capacity for {name}")
                self.state.add_event("zone_stockout", name, f"no capacity in {zone}: new nodes avoid it for "
                                     f"monitor.zone_cooldown ({self.spec.monitor.zone_cooldown:g} s)")
            if outcome.node is None:
                message = str(outcome.error or "unknown error")
                result.failures[name] = message
                self.state.add_event("create_failed", name, message)
                self.log(f"{name}: could not be created: {message}")
                continue
            node = outcome.node
            created.append(node)
            result.created.append(name)
            self.state.upsert_node(node)
            self.state.add_event("running", name, f"{node.address}:{node.port} zone {node.zone}")
        return created

    def forget_machine(self, name: str) -> None:
        """The machine under `name` is gone: drop its connection and its pinned host key
        (a head replaced under the same name shows a new one, vouched for again)."""
        self.executor.drop(name)
        self.executor.known_hosts.forget(name)
        self._vouched.pop(name, None)

    def delete_nodes(self, nodes: Sequence[Node], reason: str) -> list[str]:
        if not nodes:
            return []
        deleted = self.provider.delete([n.name for n in nodes])
        for node in nodes:
            self.forget_machine(node.name)
            self.state.mark_gone(node.name, node.state.value)
            self.state.add_event("deleted", node.name, reason)
        return deleted

    def up(self) -> UpResult:
        # One `up` of a fleet at a time (two would create the same nodes, install on one
        # node at once): a second waits, then finds what the first made.
        make_private_dir(self.paths.state_dir)
        with exclusive_lock(self.paths.state_dir / UP_LOCK,
                            lambda: self.log("another `fleet up` of this fleet is running: waiting for it")):
            return self._up()

    def _up(self) -> UpResult:
        """Converge once: the reconciler's plan without probes (every live node brought
        forward, back-off ignored), carried out by the one applier."""
        from fleet.applier import Applier, PassReport

        self.provider.check()
        if self.spec.ray.enabled:  # before anything is created: loopback nodes cannot run Ray
            from fleet.ray.cluster import RayCluster

            RayCluster(self).check_supported()
        result = UpResult()
        planned = self.plan(self.observe())
        result.nodes = Applier(self, monitor=False).apply(planned, result, PassReport(), prepare=True)
        self.write_ssh_config(result.nodes)
        return result

    def write_ssh_config(self, nodes: Sequence[Node]) -> None:
        alive = [n for n in nodes if n.address]
        write_ssh_config(self.paths.ssh_config, self.spec.name, [self.target(n) for n in alive],
                         self.paths.key, self.paths.known_hosts)

    # -- preempt / down ------------------------------------------------------------------
    def preempt(self, name: str, *, notice_s: float = 0.0) -> None:
        nodes = self.observe()
        node = next((n for n in nodes if n.name == name), None)
        if node is None:
            raise UsageError(f"no node named {name!r} in fleet {self.spec.name}", hint="`fleet status` lists the nodes")
        if node.role == Role.HEAD and self.spec.head.host:
            raise UsageError(f"{name} is an existing machine that fleet does not own; it cannot be preempted")
        self.provider.preempt(name, notice_s=notice_s)
        self.executor.drop(name)
        self.state.add_event("preempt_requested", name, f"fleet preempt (notice {notice_s:g} s)")

    def down(self, *, keep_data: bool = False) -> CleanupReport:
        """`fleet.teardown.down` on this session."""
        from fleet.teardown import down

        return down(self, keep_data=keep_data)

    def close_connections(self) -> None:
        """Close this session's SSH connections (a later call opens new ones)."""
        if self._executor is not None:
            self._executor.close()
            self._executor = None



def remove_state_dir(paths: FleetPaths) -> None:
    shutil.rmtree(paths.state_dir, ignore_errors=True)


def describe_failure(error: BaseException) -> str:
    if isinstance(error, ProviderError):
        return str(error)
    return f"{type(error).__name__}: {error}"
