"""The `local` provider: every node is a real OpenSSH server on this machine.

The embedded default, so that `fleet up` works without a cloud account. Nodes live
under `local.root` (default `~/.local/state/fleet/local/<fleet>/`), which plays the part
of the cloud's inventory: `list()` reads it (plus a scan for processes of the fleet
whose directory is gone), never the fleet's local state database. A preemption kills
the node's sshd, every process started on it and its mounts at once; with a notice it
first sends SIGTERM to the node's programs, the way a cloud's ACPI soft-off does.

Two isolations (`local.isolation`): `namespaces` makes every node a machine of its own
(`fleet.providers.localns`: network, mount and PID namespaces on a per-fleet bridge,
booted by the same startup script a cloud node runs); `loopback` runs every node as an
sshd of the caller's on 127.0.0.1 (no root needed). `auto` picks namespaces when it can.

The head's data disk (`head.data_disk_gb` > 0) is the fleet's directory
`<root>/<fleet>/.data/`, outside every node's own directory: an isolated head gets it
bind-mounted at `fleet.model.DATA_MOUNT`, a loopback head is told its path
(FLEET_DATA_DIR); either way the shared directory lives in it, it outlives the head, and
the next head attaches it again. `destroy_all` deletes it unless asked to keep it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fleet.errors import FleetError, ProviderError, UsageError
from fleet.model import (
    LABEL_FLEET,
    LABEL_GENERATION,
    LABEL_ROLE,
    LABEL_SLOT,
    Node,
    NodeRequest,
    NodeState,
    Role,
)
from fleet.providers.base import CleanupReport, CreateResult, Provider, ProviderContext
from fleet.providers.localnode import (
    LocalNode,
    find_sftp_server,
    find_sshd,
    fuse_mounts_under,
    kill_fleet_orphans,
    require_sshfs,
)
from fleet.providers.localns import FleetNetwork, IsolatedNode, missing_for_namespaces, require_namespaces
from fleet.providers.startup import render_startup_script

DATA_DIR_NAME = ".data"  # under <root>/<fleet>/; never a node's name (those start with a letter)


def default_root() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "fleet" / "local"


class LocalProvider(Provider):
    name = "local"

    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        configured = self.spec.local.root
        self.root = Path(os.path.expanduser(configured)).resolve() if configured else default_root()
        wanted = self.spec.local.isolation
        self._isolation = wanted if wanted != "auto" else ("namespaces" if missing_for_namespaces() is None
                                                           else "loopback")

    @property
    def isolation(self) -> str:
        return self._isolation

    def check(self) -> None:
        find_sshd()
        find_sftp_server()
        require_sshfs()
        if self.isolation == "namespaces":
            require_namespaces()

    @property
    def data_dir(self) -> Path:
        """The head's data disk: the fleet's directory outside every node's own."""
        return self.root / self.spec.name / DATA_DIR_NAME

    def _data_dir_for(self, request: NodeRequest) -> Path | None:
        if request.role != Role.HEAD or self.spec.head.data_disk_gb == 0:
            return None
        return self.data_dir

    def _create_isolated(self, request: NodeRequest, labels: dict[str, str]) -> LocalNode:
        data_dir = self._data_dir_for(request)
        script = render_startup_script(
            provider="local", fleet_name=self.spec.name, node=request.name, role=request.role.value,
            user=self.context.ssh_user, public_key=self.context.public_key, ssh_port=22,
            data_disk=data_dir is not None,
        )
        return IsolatedNode.create_isolated(
            self.root, name=request.name, fleet=self.spec.name, user=self.context.ssh_user,
            startup_script=script, labels=labels, hidden=[self.context.state_dir.parent],
            boot_timeout=self.spec.ssh.ready_timeout, data_dir=data_dir,
        )

    def create(self, requests: Sequence[NodeRequest]) -> list[CreateResult]:
        self.root.mkdir(parents=True, exist_ok=True)

        def one(request: NodeRequest) -> CreateResult:
            labels = {
                LABEL_FLEET: self.spec.name,
                LABEL_ROLE: request.role.value,
                LABEL_SLOT: str(request.slot),
                LABEL_GENERATION: str(request.generation),
                "spot": "true" if request.spot else "false",
            }
            try:
                if self.isolation == "namespaces":
                    node = self._create_isolated(request, labels)
                else:
                    node = LocalNode.create(
                        self.root,
                        name=request.name,
                        fleet=self.spec.name,
                        authorized_keys=[self.context.public_key],
                        address=self.spec.local.address,
                        labels=labels,
                        data_dir=self._data_dir_for(request),
                    )
            except FleetError as error:
                return CreateResult(request, error=error)
            except OSError as error:
                return CreateResult(request, error=ProviderError(f"local node {request.name}: {error}"))
            return CreateResult(request, node=self._to_node(node))

        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(32, len(requests))) as pool:
            return list(pool.map(one, requests))

    def _to_node(self, local: LocalNode) -> Node:
        if local.is_running():
            state = NodeState.RUNNING
        elif local.preempted:
            state = NodeState.PREEMPTED
        else:
            state = NodeState.TERMINATED
        labels = local.labels
        return Node(
            name=local.name,
            fleet=local.fleet,
            role=Role(labels.get(LABEL_ROLE, "worker")),
            state=state,
            slot=int(labels.get(LABEL_SLOT, "0")),
            generation=int(labels.get(LABEL_GENERATION, "1")),
            address=local.address,
            port=local.port,
            zone="local",
            spot=labels.get("spot") == "true",
            machine="local",
            provider_id=local.id,
            host_key=local.host_key_line if local.host_key_path.exists() else None,
            reason="killed by fleet preempt" if local.preempted else None,
            created_at=local.created_at,
            labels=dict(labels),
        )

    def _local(self, name: str, *, deleting: bool = False) -> LocalNode | None:
        """The node named `name`; one being deleted only when `deleting` (to finish that)."""
        local = LocalNode.load(self.root / self.spec.name / name)
        return local if local is not None and (deleting or not local.deleting) else None

    def list(self) -> list[Node]:
        # A node being deleted is gone already: seen half-way (sshd killed, directory not
        # yet removed) it would look stopped, and a monitor would start it again.
        return [self._to_node(local) for local in LocalNode.list(self.root, self.spec.name) if not local.deleting]

    def delete(self, names: Sequence[str]) -> list[str]:
        deleted = []
        for name in names:
            for left in (self.root / self.spec.name).glob(f".{name}.deleted-*"):  # an interrupted delete's
                if not fuse_mounts_under(left):
                    shutil.rmtree(left, ignore_errors=True)
            local = self._local(name, deleting=True)
            if local is None:
                continue
            local.destroy()
            where = "isolated node, " if local.isolation == "namespaces" else ""
            deleted.append(f"local node {name} ({where}sshd on {local.address}:{local.port})")
        return deleted

    def start(self, names: Sequence[str]) -> list[str]:
        started = []
        for name in names:
            local = self._local(name)
            if local is None or local.is_running():
                continue
            if isinstance(local, IsolatedNode):
                local.boot(boot_timeout=self.spec.ssh.ready_timeout)
            else:
                local.boot()
            started.append(name)
        return started

    def stop(self, names: Sequence[str]) -> list[str]:
        stopped = []
        for name in names:
            local = self._local(name)
            if local is None or not local.is_running():
                continue
            local.kill(preempted=False)
            stopped.append(name)
        return stopped

    def preempt(self, name: str, *, notice_s: float = 0.0) -> None:
        local = self._local(name)
        if local is None or not local.is_running():
            raise UsageError(f"no running local node named {name!r} in fleet {self.spec.name}")
        if notice_s > 0:
            local.terminate()
            time.sleep(notice_s)
        local.kill(preempted=True)

    def destroy_all(self, keep_data: bool = False) -> CleanupReport:
        report = CleanupReport()
        locals_ = LocalNode.list(self.root, self.spec.name)
        report.deleted.extend(self.delete([local.name for local in locals_]))
        orphans = kill_fleet_orphans(self.root, self.spec.name, [local.id for local in locals_])
        if orphans:
            report.deleted.append(f"{orphans} orphaned processes of fleet {self.spec.name}")
        if os.geteuid() == 0 and missing_for_namespaces() is None:
            # Whatever the mode now: the fleet may have run isolated before, or lost its nodes' records.
            report.deleted.extend(FleetNetwork.of(self.root, self.spec.name).remove())
        if self.data_dir.is_dir():
            if keep_data:
                report.kept.append(f"local data disk {self.data_dir}")
                report.kept_hint = f"rm -rf {shlex.quote(str(self.data_dir))}"
            else:
                try:
                    shutil.rmtree(self.data_dir)
                    report.deleted.append(f"local data disk {self.data_dir}")
                except OSError as error:
                    report.errors.append(f"local data disk {self.data_dir}: {error}")
        fleet_dir = self.root / self.spec.name
        if fleet_dir.is_dir() and not any(fleet_dir.iterdir()):
            shutil.rmtree(fleet_dir, ignore_errors=True)
        return report
