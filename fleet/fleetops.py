"""Turn a spec into running, set-up, mounted nodes, and back to nothing.

`Fleet` is one command's session with a fleet: its spec, its files under
`.fleet/<name>/` (keys, known_hosts, ssh_config, state.db), its provider and its SSH
executor (connections opened once, reused across phases). `up()` converges: it creates
only what is missing, replaces dead nodes with a new generation, and re-runs setup and
mounts only where they are not done; a failed node is reported and the others carry
on. `down()` deletes everything the provider finds by label, even with no local state.
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

from fleet.errors import FleetError, ProviderError, UsageError
from fleet.model import Node, NodeRequest, NodeState, Role, head_name
from fleet.providers import Provider, ProviderContext, get_provider
from fleet.providers.base import CleanupReport
from fleet.providers.localnode import generate_ed25519_keypair
from fleet.reconcile import Create, Delete, Plan, Probe, head_request, step_rank, worker_request
from fleet.reconcile import plan as plan_actions
from fleet.runtime import Runtime, env_assignments
from fleet.share import (
    SHARE_FILE,
    ShareEndpoint,
    as_root,
    confine_script,
    data_disk_check,
    fallback_key_line,
    link_data_script,
    parse_share,
)
from fleet.spec.models import FleetSpec
from fleet.ssh import CommandResult, Executor, GroupResult, HostKeyStore, Target, write_ssh_config
from fleet.state import State, exclusive_lock, make_private_dir

Log = Callable[[str], None]
SSHFS_KEX = "curve25519-sha256"  # one name: sshfs splits -o values at commas
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


def _home_path(path: str) -> str:
    """A shell word for a path as the node sees it: relative paths are under $HOME."""
    if path.startswith("/"):
        return _q(path)
    path = path.removeprefix("~/")
    return f'"$HOME"/{_q(path)}'


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
            f"FLEET_SHARED={_home_path(self.shared_path_for(node))}",
        ]
        # umask 002: the head user and the share account share the shared dir by group.
        if self.runtime.enabled:
            words.extend(env_assignments())
        for key, value in (extra or {}).items():
            words.append(f"{key}={_q(value)}")
        return "umask 002; export " + " ".join(words) + "; "

    # -- exec ----------------------------------------------------------------------------
    def exec(self, nodes: Sequence[Node], command: str, *, timeout: float | None = None,
             stream: bool = False, extra_env: dict[str, str] | None = None) -> GroupResult:
        ranks = {n.name: i for i, n in enumerate(nodes)}
        by_name = {n.name: n for n in nodes}

        def command_for(target: Target) -> str:
            node = by_name[target.name]
            return self.node_env_prefix(node, ranks[node.name], len(nodes), extra_env) + command

        return self.executor.run([self.target(n) for n in nodes], command_for, timeout=timeout, stream=stream)

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

    def bring_up(self, nodes: Sequence[Node], result: UpResult) -> list[Node]:
        """SSH ready -> setup -> head export -> worker mounts, each node as far as it gets."""
        nodes = self.await_addresses(nodes, result)
        if not nodes:
            return []
        self.fetch_vouched_host_keys(nodes)
        self.log(f"waiting for SSH on {len(nodes)} node(s)")
        ready_results = self.executor.wait_ready([self.target(n) for n in nodes], timeout=self.spec.ssh.ready_timeout)
        ready = self._keep_ok(nodes, ready_results, result, "ssh_ready", "SSH answers")
        self._advance(ready, "ssh_ready")
        ready = self.runtime.ensure(ready, result)
        self._advance(ready, "runtime")
        needs_setup = [n for n in ready if not self._flag(n.name, "setup_done")]
        if needs_setup and self.spec.setup:
            self.log(f"running setup on {len(needs_setup)} node(s)")
            script = "set -e\n" + "\n".join(self.spec.setup)
            setup_results = self.exec(needs_setup, script)
            ok = self._keep_ok(needs_setup, setup_results, result, "setup_done", "setup commands succeeded")
            ready = [n for n in ready if n in ok or n not in needs_setup]
        for node in needs_setup:
            if node in ready:
                self.state.set_node_flags(node.name, setup_done=True)
        self._advance(ready, "setup_done")
        head = next((n for n in ready if n.role == Role.HEAD), None)
        workers = [n for n in ready if n.role == Role.WORKER]
        if head is None and workers:
            # Replacements come up without their head: it is already running and exported.
            head = self.head()
        if head is None:
            for node in workers:
                result.failures.setdefault(node.name, "no head node is up: the shared directory cannot be mounted")
            self.runtime.finish(None, result)
            return [n for n in ready if n.name not in result.failures]
        if not self.export_shared(head, result):
            self.state.add_event("exported_failed", head.name, result.failures.get(head.name, ""))
            return [n for n in ready if n.role != Role.WORKER]
        self._advance([head], "exported")
        mounted = self.mount_shared(head, workers, result) if workers else []
        # The wheelhouse lives on the shared directory: workers install from it once mounted.
        before = set(result.failures)
        self.runtime.finish(head, result)
        if self.spec.ray.enabled:  # Ray needs the runtime (it comes with it): last
            from fleet.ray.cluster import RayCluster

            RayCluster(self).ensure(head, [n for n in mounted if n.name not in result.failures], result)
        failed = set(result.failures) - before
        done = [n for n in [*[n for n in ready if n.role == Role.HEAD], *mounted] if n.name not in failed]
        self._advance([n for n in done if n.role == Role.WORKER], "mounted")
        return done

    def _advance(self, nodes: Sequence[Node], step: str) -> None:
        """Record that `nodes` completed `step` (never moving a record back)."""
        for node in nodes:
            record = self.state.node(node.name)
            if record is not None and step_rank(record.step) <= step_rank(step):
                self.state.set_step(node.name, step)

    def await_addresses(self, nodes: Sequence[Node], result: UpResult) -> list[Node]:
        """Nodes as the provider lists them once each is RUNNING with an address. A cloud
        answers a create with pending instances that have no public address yet (EC2's
        run_instances, GCE while PROVISIONING): list again, with backoff, until they have
        one or `ssh.ready_timeout` passes (then that node fails alone)."""
        waiting = {n.name for n in nodes if n.state == NodeState.PENDING or not n.address}
        if not waiting:
            return list(nodes)
        self.log(f"waiting for {len(waiting)} pending node(s) to get an address")
        current = {n.name: n for n in nodes}
        deadline = time.monotonic() + self.spec.ssh.ready_timeout
        delay = 0.5
        while waiting and not self.cancel.wait(min(delay, max(0.0, deadline - time.monotonic()))):
            delay = min(delay * 1.5, 5.0)
            for listed in self.provider.list():
                if listed.name in waiting and listed.name in current:
                    current[listed.name] = listed
                    if listed.state == NodeState.RUNNING and listed.address:
                        waiting.discard(listed.name)
                        self.state.upsert_node(listed)
                    elif not listed.is_alive:
                        waiting.discard(listed.name)
            if waiting and time.monotonic() >= deadline:
                break
        ready = []
        for name, node in current.items():
            if node.state == NodeState.RUNNING and node.address:
                ready.append(node)
                continue
            message = (f"still {node.state.value} without an address after {self.spec.ssh.ready_timeout:g}s"
                       if node.is_alive else f"{node.state.value} before it got an address")
            result.failures[name] = message
            self.state.add_event("ssh_ready_failed", name, message)
            self.log(f"{name}: {message}")
        return ready

    def _flag(self, name: str, flag: str) -> bool:
        record = self.state.node(name)
        return bool(record and getattr(record, flag))

    def _keep_ok(self, nodes: Sequence[Node], results: GroupResult, result: UpResult, event: str, detail: str) -> list[Node]:
        ok = []
        for node in nodes:
            outcome: CommandResult | None = results.results.get(node.name)
            if outcome is not None and outcome.ok:
                ok.append(node)
                self.state.add_event(event, node.name, detail)
            else:
                message = outcome.describe() if outcome is not None else "no result"
                result.failures[node.name] = message
                self.state.add_event(f"{event}_failed", node.name, message)
                self.log(f"{node.name}: {message}")
        return ok

    def mount_public_key(self) -> str:
        pub = Path(f"{self.paths.mount_key}.pub")
        if pub.exists() and self.paths.mount_key.exists():
            return pub.read_text().strip()
        return generate_ed25519_keypair(self.paths.mount_key, f"fleet-{self.spec.name}-mount")

    def export_shared(self, head: Node, result: UpResult) -> bool:
        """Create the shared directory on the head and let the workers' mount key in:
        confined to a share account (see fleet.share) where the head can be root and fleet
        created it; else on the head user's account with forced SFTP."""
        shared = _home_path(self.spec.shared.path)
        keys = '"$HOME/.ssh/authorized_keys"'
        # Earlier versions authorised the mount key with `restrict` alone: drop that line.
        legacy = _q(f"restrict {self.mount_public_key()}")
        drop_legacy = (f"if [ -f {keys} ] && grep -qxF {legacy} {keys}; then (umask 077 && grep -vxF {legacy} {keys} "
                       f"> {keys}.fleet-tmp) ; mv {keys}.fleet-tmp {keys}; fi; ")
        if not self.spec.head.host:
            confine = drop_legacy + as_root(confine_script(shared_path=shared, head_user_word='"$(id -un)"',
                                                           mount_public_key=self.mount_public_key()))
            outcome = self.executor.run([self.target(head)], confine).results[head.name]
            if not outcome.ok:
                result.failures[head.name] = f"could not confine the share account: {outcome.describe()}"
                return False
            found = parse_share(outcome.stdout)
            if found is not None:
                if self.share is None or self.share.user != found[0]:
                    # The head user joined the share group: its next login must see it.
                    self.executor.drop(head.name)
                self.share = ShareEndpoint(user=found[0], path=found[1], confined=True)
                return True
            reason = outcome.stdout.strip().removeprefix("UNCONFINED ") or "no root on the head"
            self.log(f"warning: {head.name}: the mount key is not confined to a share account ({reason}); "
                     "it gets forced SFTP on the head user's account")
        line = self.mount_key_line()
        script = drop_legacy + (
            f"set -e; {data_disk_check()}; {link_data_script(shared)}; mkdir -p {shared}; umask 077; "
            "mkdir -p \"$HOME/.ssh\"; "
            f"touch \"$HOME/.ssh/authorized_keys\"; "
            f"grep -qxF {_q(line)} \"$HOME/.ssh/authorized_keys\" || echo {_q(line)} >> \"$HOME/.ssh/authorized_keys\""
        )
        outcome = self.executor.run([self.target(head)], script).results[head.name]
        if not outcome.ok:
            result.failures[head.name] = f"could not export the shared directory: {outcome.describe()}"
            return False
        self.share = self._unconfined_share(head)
        return True

    def _unconfined_share(self, head: Node) -> ShareEndpoint:
        # The key's forced `internal-sftp -d <shared>` starts there: paths are relative to it.
        return ShareEndpoint(user=self.target(head).user, path=".", confined=False)

    def mount_key_line(self) -> str:
        """The mount key's line in the head user's authorized_keys (unconfined heads)."""
        shared = self.spec.shared.path
        if not shared.startswith("/"):
            shared = "%d/" + shared.removeprefix("~/")  # %d: sshd's token for the home directory
        return fallback_key_line(self.mount_public_key(), shared)

    def mount_command(self, head: Node, head_key: str | None = None) -> str:
        """The shell command that mounts the head's shared directory on a worker. With
        `head_key`, it first pins the head's (public) host key in the worker's
        known_hosts, which saves an upload per worker."""
        shared = self.spec.shared
        share = self.share or self._unconfined_share(head)
        address = head.internal_address or head.address
        options = [
            'IdentityFile="$HOME/.fleet/mount_key"',
            'UserKnownHostsFile="$HOME/.fleet/known_hosts"',
            f"HostKeyAlias={_q(head.name)}",
            "StrictHostKeyChecking=yes",
            "BatchMode=yes",
            # The spec's connect timeout (a dropped mount fails in that time, not a hang), but
            # at least 5 s: the head's sshd answers many mounting workers at once.
            f"ConnectTimeout={max(5, round(self.spec.ssh.connect_timeout))}",
            f"port={head.port}",
            *[_q(option) for option in shared.options],
        ]
        if not any(option.lower().startswith("kexalgorithms") for option in shared.options):
            # The key exchange the executor's own (paramiko) connections use: OpenSSH's
            # default sntrup761 hybrid costs the head ~0.1 s of CPU per mounting worker.
            options.append(f"KexAlgorithms={SSHFS_KEX}")
        if shared.max_conns > 1:
            options.append(f"max_conns={shared.max_conns}")
        remote = _q(f"{share.user}@{address}:{share.path}")
        mount = _home_path(shared.mount)
        pin = ""
        if head_key is not None:
            pin = (f"(umask 077 && mkdir -p \"$HOME/.fleet\" && printf '%s\\n' {_q(f'{head.name} {head_key}')} "
                   f"> \"$HOME/.fleet/known_hosts\") || exit 1; ")
        return (
            pin +
            # statfs asks the head every time; `ls` can be answered from sshfs's directory
            # cache by a mount whose head is gone (a replaced head then stayed unmounted).
            # (`mountpoint` stats the mount too; bounded as in the monitor's probe: a wait on
            # a dead sshfs ends with nothing, and must not hold the session's output.)
            f"if timeout -s KILL 10 mountpoint -q {mount} </dev/null >/dev/null 2>&1 "
            f"&& timeout -s KILL 10 stat -f {mount} </dev/null >/dev/null 2>&1; then exit 0; fi; "
            # Whatever is left (a mount whose head went away answers neither `mountpoint`
            # nor `ls`: ENOTCONN) goes first; nothing mounted: the unmounts fail quietly.
            f"fusermount3 -u -z {mount} 2>/dev/null || fusermount -u -z {mount} 2>/dev/null "
            f"|| umount -l {mount} 2>/dev/null; "
            f"mkdir -p {mount}; "
            f"command -v sshfs >/dev/null || {{ echo 'sshfs is not installed on this node (apt-get install sshfs)' >&2; exit 127; }}; "
            f"sshfs -o {','.join(options)} {remote} {mount}"
        )

    def mount_shared(self, head: Node, workers: Sequence[Node], result: UpResult) -> list[Node]:
        head_key = self.executor.known_hosts.get(head.name)
        if head_key is None:
            for node in workers:
                result.failures[node.name] = f"the head's host key is not pinned yet ({head.name})"
            return []
        targets = [self.target(n) for n in workers]
        private = self.paths.mount_key.read_bytes()
        share = self.share or self._unconfined_share(head)
        described = share.describe(host=head.internal_address or head.address or "", port=head.port,
                                   identity_file="~/.fleet/mount_key", known_hosts="~/.fleet/known_hosts",
                                   alias=head.name)
        puts = [self.executor.put(targets, private, ".fleet/mount_key", mode=0o600, dir_mode=0o700),
                self.executor.put(targets, described.encode(), SHARE_FILE, mode=0o600, dir_mode=0o700)]
        ok_workers = []
        for node in workers:
            failed = [p.results[node.name] for p in puts if not p.results[node.name].ok]
            if failed:
                result.failures[node.name] = f"could not upload the mount key: {failed[0].describe()}"
            else:
                ok_workers.append(node)
        self.log(f"mounting the shared directory on {len(ok_workers)} worker(s)")
        mounts = self.exec(ok_workers, self.mount_command(head, head_key))
        mounted = self._keep_ok(ok_workers, mounts, result, "mounted", f"{head.name}:{self.spec.shared.path}")
        self._name_missing_rule(head, ok_workers, mounts, result)
        for node in mounted:
            self.state.set_node_flags(node.name, mounted=True)
        return mounted

    def _name_missing_rule(self, head: Node, workers: Sequence[Node], mounts: GroupResult,
                           result: UpResult) -> None:
        """Workers whose mount failed: when they cannot even open a TCP connection to the
        head (sshfs only says "read: Connection reset by peer"), the network dropped it:
        name the rule the provider needs, in that worker's error."""
        rule = self.provider.intra_fleet_rule()
        failed = [n for n in workers if n.name in mounts.results and not mounts.results[n.name].ok]
        if not rule or not failed:
            return
        address, port = head.internal_address or head.address, head.port
        seconds = max(1, round(self.spec.ssh.connect_timeout))
        probe = self.exec(failed, f"timeout {seconds} bash -c {_q(f'exec 3<>/dev/tcp/{address}/{port}')}",
                          timeout=seconds + 30)
        for node in failed:
            outcome = probe.results.get(node.name)
            if outcome is not None and outcome.exit_code not in (0, None):
                result.failures[node.name] = (
                    f"cannot connect to the head {head.name} at {address}:{port} within {seconds}s, so the "
                    f"shared directory cannot be mounted: {rule}")
                self.state.add_event("mounted_failed", node.name, result.failures[node.name])

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
        """Delete everything the provider finds for this fleet (the head's data disk too,
        unless `keep_data`); clean up an existing head; remove the fleet's temporary keys
        and connection files."""
        report = self.provider.destroy_all(keep_data=keep_data)
        head = self.existing_head()
        if head is not None:
            try:
                outcome = self.executor.run([self.target(head)], self.existing_head_cleanup(), timeout=90)[head.name]
            except FleetError as error:
                report.errors.append(f"existing head {head.address}: {error}")
            else:
                if outcome.ok:
                    stopped = outcome.stdout.count("STOPPED ")
                    report.deleted.append(f"the fleet's mount key and {stopped} job process group(s) on "
                                          f"existing head {head.address}")
                else:
                    report.errors.append(f"existing head {head.address}: cleanup failed: {outcome.describe()}")
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        for record in self.state.nodes():
            self.state.mark_gone(record.name)
        self.state.add_event("down", None, f"deleted {len(report.deleted)} resource(s)")
        for path in (self.paths.mount_key, Path(f"{self.paths.mount_key}.pub"), self.paths.known_hosts,
                     self.paths.ssh_config):
            path.unlink(missing_ok=True)
        if self.paths.generated_key:
            self.paths.key.unlink(missing_ok=True)
            Path(f"{self.paths.key}.pub").unlink(missing_ok=True)
        return report

    def existing_head_cleanup(self) -> str:
        """Shell for an existing head (a machine fleet does not own): remove the mount
        key, and stop the job process groups the head's launchers recorded, each checked
        to be led by that job's launcher (never a pattern over command lines). Prints
        `STOPPED <pg>` per group; exits non-zero if one is still alive."""
        from fleet.jobs import NODE_JOBS, valid_group_check

        mount_pub = Path(f"{self.paths.mount_key}.pub")
        script = "set -u; "
        if mount_pub.exists():
            line = self.mount_key_line()
            keys = '"$HOME/.ssh/authorized_keys"'
            script += (f"if [ -f {keys} ]; then (umask 077 && grep -vxF {_q(line)} {keys} > {keys}.fleet-tmp); "
                       f"[ $? -le 1 ] || exit 1; mv {keys}.fleet-tmp {keys} || exit 1; fi; ")
        if self.spec.ray.enabled:
            from fleet.ray.cluster import stop_group_script

            script += stop_group_script()
        pid_name = _q(f"{head_name(self.spec.name)}.pid")
        script += (
            f"left=0; for f in {_home_path(self.spec.shared.path)}/jobs/*/pids/{pid_name}; do "
            '[ -f "$f" ] || continue; j=${f%/pids/*}; j=${j##*/}; '
            + valid_group_check('"$f"', f'"$HOME"/{NODE_JOBS}/"$j"/launch.sh') +
            '[ -n "$pg" ] || continue; kill -TERM -- -"$pg" 2>/dev/null; i=0; '
            'while kill -0 -- -"$pg" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done; '
            'kill -KILL -- -"$pg" 2>/dev/null; sleep 0.1; '
            'if kill -0 -- -"$pg" 2>/dev/null; then echo "ALIVE $pg"; left=1; else echo "STOPPED $pg"; fi; '
            'done; exit $left'
        )
        return script


def remove_state_dir(paths: FleetPaths) -> None:
    shutil.rmtree(paths.state_dir, ignore_errors=True)


def describe_failure(error: BaseException) -> str:
    if isinstance(error, ProviderError):
        return str(error)
    return f"{type(error).__name__}: {error}"
