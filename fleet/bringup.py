"""The bring-up steps of new or lagging nodes: addresses, SSH, the node runtime, setup,
the head's export of the shared directory and the workers' sshfs mounts.

`BringUp(fleet).bring_up(nodes, result)` takes each node as far as it gets and records
each step in the fleet's state (the reconciler's lifecycle columns); the one applier
(`fleet.applier`) calls it for `fleet up` and for the monitor's replacements. The
session's resources (state, provider, SSH executor) stay `Fleet`'s; planning is
`fleet.reconcile`; teardown is `fleet.teardown`.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.model import Node, NodeState, Role
from fleet.providers.localnode import generate_ed25519_keypair
from fleet.reconcile import step_rank
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
from fleet.ssh import CommandResult, GroupResult
from fleet.ssh.quote import home_path, receive_files

if TYPE_CHECKING:
    from fleet.fleetops import Fleet, UpResult

SSHFS_KEX = "curve25519-sha256"  # one name: sshfs splits -o values at commas


def mount_public_key(fleet: Fleet) -> str:
    """The workers' mount key (made once per fleet, under .fleet/<name>/)."""
    pub = Path(f"{fleet.paths.mount_key}.pub")
    if pub.exists() and fleet.paths.mount_key.exists():
        return pub.read_text().strip()
    return generate_ed25519_keypair(fleet.paths.mount_key, f"fleet-{fleet.spec.name}-mount")


def mount_key_line(fleet: Fleet) -> str:
    """The mount key's line in the head user's authorized_keys (unconfined heads)."""
    shared = fleet.spec.shared.path
    if not shared.startswith("/"):
        shared = "%d/" + shared.removeprefix("~/")  # %d: sshd's token for the home directory
    return fallback_key_line(mount_public_key(fleet), shared)


class BringUp:
    """The steps that take nodes from created to mounted, on one fleet session."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.spec = fleet.spec
        self.paths = fleet.paths
        self.log = fleet.log

    def bring_up(self, nodes: Sequence[Node], result: UpResult) -> list[Node]:
        """SSH ready -> setup -> head export -> worker mounts, each node as far as it gets."""
        nodes = self.await_addresses(nodes, result)
        if not nodes:
            return []
        self.fleet.fetch_vouched_host_keys(nodes)
        self.log(f"waiting for SSH on {len(nodes)} node(s)")
        ready_results = self.fleet.executor.wait_ready([self.fleet.target(n) for n in nodes], timeout=self.spec.ssh.ready_timeout)
        ready = self._keep_ok(nodes, ready_results, result, "ssh_ready", "SSH answers")
        self._advance(ready, "ssh_ready")
        ready = self.fleet.runtime.ensure(ready, result)
        self._advance(ready, "runtime")
        needs_setup = [n for n in ready if not self._flag(n.name, "setup_done")]
        if needs_setup and self.spec.setup:
            self.log(f"running setup on {len(needs_setup)} node(s)")
            script = "set -e\n" + "\n".join(self.spec.setup)
            setup_results = self.fleet.exec(needs_setup, script)
            ok = self._keep_ok(needs_setup, setup_results, result, "setup_done", "setup commands succeeded")
            ready = [n for n in ready if n in ok or n not in needs_setup]
        for node in needs_setup:
            if node in ready:
                self.fleet.state.set_node_flags(node.name, setup_done=True)
        self._advance(ready, "setup_done")
        head = next((n for n in ready if n.role == Role.HEAD), None)
        workers = [n for n in ready if n.role == Role.WORKER]
        if head is None and workers:
            # Replacements come up without their head: it is already running and exported.
            head = self.fleet.head()
        if head is None:
            for node in workers:
                result.failures.setdefault(node.name, "no head node is up: the shared directory cannot be mounted")
            self.fleet.runtime.finish(None, result)
            return [n for n in ready if n.name not in result.failures]
        if not self.export_shared(head, result):
            self.fleet.state.add_event("exported_failed", head.name, result.failures.get(head.name, ""))
            return [n for n in ready if n.role != Role.WORKER]
        self._advance([head], "exported")
        mounted = self.mount_shared(head, workers, result) if workers else []
        # The wheelhouse lives on the shared directory: workers install from it once mounted.
        before = set(result.failures)
        self.fleet.runtime.finish(head, result)
        if self.spec.ray.enabled:  # Ray needs the runtime (it comes with it): last
            from fleet.ray.cluster import RayCluster

            RayCluster(self.fleet).ensure(head, [n for n in mounted if n.name not in result.failures], result)
        failed = set(result.failures) - before
        done = [n for n in [*[n for n in ready if n.role == Role.HEAD], *mounted] if n.name not in failed]
        self._advance([n for n in done if n.role == Role.WORKER], "mounted")
        return done

    def _advance(self, nodes: Sequence[Node], step: str) -> None:
        """Record that `nodes` completed `step` (never moving a record back)."""
        for node in nodes:
            record = self.fleet.state.node(node.name)
            if record is not None and step_rank(record.step) <= step_rank(step):
                self.fleet.state.set_step(node.name, step)

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
        while waiting and not self.fleet.cancel.wait(min(delay, max(0.0, deadline - time.monotonic()))):
            delay = min(delay * 1.5, 5.0)
            for listed in self.fleet.provider.list():
                if listed.name in waiting and listed.name in current:
                    current[listed.name] = listed
                    if listed.state == NodeState.RUNNING and listed.address:
                        waiting.discard(listed.name)
                        self.fleet.state.upsert_node(listed)
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
            self.fleet.state.add_event("ssh_ready_failed", name, message)
            self.log(f"{name}: {message}")
        return ready

    def _flag(self, name: str, flag: str) -> bool:
        record = self.fleet.state.node(name)
        return bool(record and getattr(record, flag))

    def _keep_ok(self, nodes: Sequence[Node], results: GroupResult, result: UpResult, event: str, detail: str) -> list[Node]:
        ok = []
        for node in nodes:
            outcome: CommandResult | None = results.results.get(node.name)
            if outcome is not None and outcome.ok:
                ok.append(node)
                self.fleet.state.add_event(event, node.name, detail)
            else:
                message = outcome.describe() if outcome is not None else "no result"
                result.failures[node.name] = message
                self.fleet.state.add_event(f"{event}_failed", node.name, message)
                self.log(f"{node.name}: {message}")
        return ok

    def export_shared(self, head: Node, result: UpResult) -> bool:
        """Create the shared directory on the head and let the workers' mount key in:
        confined to a share account (see fleet.share) where the head can be root and fleet
        created it; else on the head user's account with forced SFTP."""
        shared = home_path(self.spec.shared.path)
        keys = '"$HOME/.ssh/authorized_keys"'
        # Earlier versions authorised the mount key with `restrict` alone: drop that line.
        legacy = shlex.quote(f"restrict {mount_public_key(self.fleet)}")
        drop_legacy = (f"if [ -f {keys} ] && grep -qxF {legacy} {keys}; then (umask 077 && grep -vxF {legacy} {keys} "
                       f"> {keys}.fleet-tmp) ; mv {keys}.fleet-tmp {keys}; fi; ")
        if not self.spec.head.host:
            confine = drop_legacy + as_root(confine_script(shared_path=shared, head_user_word='"$(id -un)"',
                                                           mount_public_key=mount_public_key(self.fleet)))
            outcome = self.fleet.executor.run([self.fleet.target(head)], confine).results[head.name]
            if not outcome.ok:
                result.failures[head.name] = f"could not confine the share account: {outcome.describe()}"
                return False
            found = parse_share(outcome.stdout)
            if found is not None:
                if self.fleet.share is None or self.fleet.share.user != found[0]:
                    # The head user joined the share group: its next login must see it.
                    self.fleet.executor.drop(head.name)
                self.fleet.share = ShareEndpoint(user=found[0], path=found[1], confined=True)
                return True
            reason = outcome.stdout.strip().removeprefix("UNCONFINED ") or "no root on the head"
            self.log(f"warning: {head.name}: the mount key is not confined to a share account ({reason}); "
                     "it gets forced SFTP on the head user's account")
        line = mount_key_line(self.fleet)
        script = drop_legacy + (
            f"set -e; {data_disk_check()}; {link_data_script(shared)}; mkdir -p {shared}; umask 077; "
            "mkdir -p \"$HOME/.ssh\"; "
            f"touch \"$HOME/.ssh/authorized_keys\"; "
            f"grep -qxF {shlex.quote(line)} \"$HOME/.ssh/authorized_keys\" || echo {shlex.quote(line)} >> \"$HOME/.ssh/authorized_keys\""
        )
        outcome = self.fleet.executor.run([self.fleet.target(head)], script).results[head.name]
        if not outcome.ok:
            result.failures[head.name] = f"could not export the shared directory: {outcome.describe()}"
            return False
        self.fleet.share = self._unconfined_share(head)
        return True

    def _unconfined_share(self, head: Node) -> ShareEndpoint:
        # The key's forced `internal-sftp -d <shared>` starts there: paths are relative to it.
        return ShareEndpoint(user=self.fleet.target(head).user, path=".", confined=False)

    def mount_command(self, head: Node, head_key: str | None = None) -> str:
        """The shell command that mounts the head's shared directory on a worker. With
        `head_key`, it first pins the head's (public) host key in the worker's
        known_hosts, which saves an upload per worker."""
        shared = self.spec.shared
        share = self.fleet.share or self._unconfined_share(head)
        address = head.internal_address or head.address
        options = [
            'IdentityFile="$HOME/.fleet/mount_key"',
            'UserKnownHostsFile="$HOME/.fleet/known_hosts"',
            f"HostKeyAlias={shlex.quote(head.name)}",
            "StrictHostKeyChecking=yes",
            "BatchMode=yes",
            # The spec's connect timeout (a dropped mount fails in that time, not a hang), but
            # at least 5 s: the head's sshd answers many mounting workers at once.
            f"ConnectTimeout={max(5, round(self.spec.ssh.connect_timeout))}",
            f"port={head.port}",
            *[shlex.quote(option) for option in shared.options],
        ]
        if not any(option.lower().startswith("kexalgorithms") for option in shared.options):
            # The key exchange the executor's own (paramiko) connections use: OpenSSH's
            # default sntrup761 hybrid costs the head ~0.1 s of CPU per mounting worker.
            options.append(f"KexAlgorithms={SSHFS_KEX}")
        if shared.max_conns > 1:
            options.append(f"max_conns={shared.max_conns}")
        remote = shlex.quote(f"{share.user}@{address}:{share.path}")
        mount = home_path(shared.mount)
        pin = ""
        if head_key is not None:
            pin = (f"(umask 077 && mkdir -p \"$HOME/.fleet\" && printf '%s\\n' {shlex.quote(f'{head.name} {head_key}')} "
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
        head_key = self.fleet.executor.known_hosts.get(head.name)
        if head_key is None:
            for node in workers:
                result.failures[node.name] = f"the head's host key is not pinned yet ({head.name})"
            return []
        private = self.paths.mount_key.read_bytes()
        share = self.fleet.share or self._unconfined_share(head)
        described = share.describe(host=head.internal_address or head.address or "", port=head.port,
                                   identity_file="~/.fleet/mount_key", known_hosts="~/.fleet/known_hosts",
                                   alias=head.name).encode()
        # One SSH operation per worker: the mount key and the share's description come on
        # the mount command's stdin (never on a command line, which other users can read).
        self.log(f"mounting the shared directory on {len(workers)} worker(s)")
        command = receive_files([(".fleet/mount_key", len(private)), (SHARE_FILE, len(described))]) \
            + self.mount_command(head, head_key)
        mounts = self.fleet.exec(workers, command, stdin=private + described)
        mounted = self._keep_ok(workers, mounts, result, "mounted", f"{head.name}:{self.spec.shared.path}")
        self._name_missing_rule(head, workers, mounts, result)
        for node in mounted:
            self.fleet.state.set_node_flags(node.name, mounted=True)
        return mounted

    def _name_missing_rule(self, head: Node, workers: Sequence[Node], mounts: GroupResult,
                           result: UpResult) -> None:
        """Workers whose mount failed: when they cannot even open a TCP connection to the
        head (sshfs only says "read: Connection reset by peer"), the network dropped it:
        name the rule the provider needs, in that worker's error."""
        rule = self.fleet.provider.intra_fleet_rule()
        failed = [n for n in workers if n.name in mounts.results and not mounts.results[n.name].ok]
        if not rule or not failed:
            return
        address, port = head.internal_address or head.address, head.port
        seconds = max(1, round(self.spec.ssh.connect_timeout))
        probe = self.fleet.exec(failed, f"timeout {seconds} bash -c {shlex.quote(f'exec 3<>/dev/tcp/{address}/{port}')}",
                          timeout=seconds + 30)
        for node in failed:
            outcome = probe.results.get(node.name)
            if outcome is not None and outcome.exit_code not in (0, None):
                result.failures[node.name] = (
                    f"cannot connect to the head {head.name} at {address}:{port} within {seconds}s, so the "
                    f"shared directory cannot be mounted: {rule}")
                self.fleet.state.add_event("mounted_failed", node.name, result.failures[node.name])
