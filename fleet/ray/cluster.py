"""The fleet's Ray cluster: a Ray head on the head node, every worker joined to it.

With `ray: {enabled: true}`, `Fleet.bring_up` (every `fleet up`, every replacement the
monitor makes) ends with `RayCluster.ensure`: each node gets `~/.fleet/ray/launch.sh`
(0700) and the fleet's token (0600, `auth: token`), and the launcher is started with
`setsid nohup`, so each node's Ray is a process group of its own under `ray start
--block`, led by the launcher (which restarts `ray start` when it exits, e.g. a raylet
that lost its GCS). Its pid is kept on the node (`~/.fleet/ray/pid`, never on the shared
directory) and checked to name this launcher's live group (`jobs.valid_group_check`)
before anything is signalled; stopping is SIGTERM to the group, then SIGKILL (never `ray
stop`, which kills every Ray on the host). A node whose Ray runs with other arguments
(a new head's address) is stopped and started again: workers re-join a new head.

The head runs the GCS on `ray.gcs_port` and the dashboard (Jobs API, state API) on its
loopback only, `ray.dashboard_port`: the control plane reaches it through an SSH
tunnel (`fleet.ray.tunnel`). Ray's ports are open only inside the fleet: the providers'
intra-fleet rule (local: the bridge admits the caller on SSH only). `ensure` waits until
every node is alive in Ray; each node advertises the resource `fleet_node:<name>` so
that Ray's nodes map back to the fleet's names.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.errors import FleetError, UsageError
from fleet.model import Node, Role
from fleet.worker.ray_jobs import NODE_RAY_DIR, RayApiError, RayJobs

if TYPE_CHECKING:
    from fleet.fleetops import Fleet, UpResult

RESOURCE_PREFIX = "fleet_node:"
TOKEN_FILE = "ray_token"
STOP_WAIT_S = 15

_LAUNCHER = r"""#!/bin/sh
# fleet's Ray node: started by `fleet up` (setsid nohup) from ~/.fleet/ray/launch.sh; the
# process group it leads is this node's Ray, stopped by a signal to the group.
# From the caller: FLEET_RAY_ARGS (`ray start` arguments, shell-quoted), FLEET_RAY_ENV
# (NAME=value words), FLEET_RAY_AUTH (token|none), FLEET_PYTHON.
dir="$HOME/.fleet/ray"
echo $$ > "$dir/.pid.tmp" && mv "$dir/.pid.tmp" "$dir/pid"
printf '%s\n' "$FLEET_RAY_ARGS" > "$dir/args"
export RAY_USAGE_STATS_ENABLED=0 $FLEET_RAY_ENV
if [ "$FLEET_RAY_AUTH" = token ]; then export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$dir/token"; fi
eval "set -- $FLEET_RAY_ARGS"
stopping=""
child=""
trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT
while [ -z "$stopping" ]; do
  "${FLEET_PYTHON:-python3}" -P -m ray.scripts.scripts start --block "$@" &
  child=$!
  rc=0
  wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
  [ -n "$stopping" ] && break
  echo "fleet: ray start exited with $rc; starting it again in 3 s" >&2
  sleep 3
done
"""


def _q(value: str) -> str:
    return shlex.quote(value)


def group_check() -> str:
    """Shell: `pg` = the process group of this node's Ray launcher, or empty."""
    from fleet.jobs import valid_group_check

    return valid_group_check(f'"$HOME"/{NODE_RAY_DIR}/pid', f'"$HOME"/{NODE_RAY_DIR}/launch.sh')


def stop_group_script(wait_s: int = STOP_WAIT_S) -> str:
    """Shell: SIGTERM this node's Ray group, SIGKILL what is left after `wait_s`."""
    tries = wait_s * 10
    return (group_check() + '[ -n "$pg" ] && { kill -TERM -- -"$pg" 2>/dev/null; i=0; '
            f'while kill -0 -- -"$pg" 2>/dev/null && [ $i -lt {tries} ]; do sleep 0.1; i=$((i + 1)); done; '
            'kill -KILL -- -"$pg" 2>/dev/null; sleep 0.2; echo "STOPPED $pg"; }; ')


@dataclass(frozen=True)
class RayNode:
    """One node as Ray's GCS knows it, named as the fleet names it."""

    fleet_node: str | None
    node_id: str
    ip: str
    state: str
    is_head: bool
    resources: dict[str, float]

    @property
    def alive(self) -> bool:
        return self.state == "ALIVE"

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.fleet_node, "node_id": self.node_id, "ip": self.ip, "state": self.state,
                "head": self.is_head, "cpus": self.resources.get("CPU", 0.0), "gpus": self.resources.get("GPU", 0.0),
                "memory_gb": round(self.resources.get("memory", 0.0) / 2**30, 2),
                "resources": {k: v for k, v in self.resources.items()
                              if not k.startswith(("node:", RESOURCE_PREFIX))}}


def ray_node(entry: dict[str, Any]) -> RayNode:
    resources = {k: float(v) for k, v in (entry.get("resources_total") or {}).items()}
    names = [k.removeprefix(RESOURCE_PREFIX) for k in resources if k.startswith(RESOURCE_PREFIX)]
    return RayNode(fleet_node=names[0] if names else None, node_id=str(entry.get("node_id", "")),
                   ip=str(entry.get("node_ip", "")), state=str(entry.get("state", "")),
                   is_head=bool(entry.get("is_head_node")), resources=resources)


class RayCluster:
    """One command's handle on the fleet's Ray cluster."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.spec = fleet.spec.ray

    @property
    def enabled(self) -> bool:
        return self.spec.enabled

    def check_supported(self) -> None:
        if self.fleet.spec.provider == "local" and self.fleet.provider.isolation == "loopback":
            raise UsageError(
                "ray.enabled needs local nodes with addresses of their own: loopback nodes all share 127.0.0.1 "
                "(one Ray node per address)",
                hint="run as root with `local.isolation: namespaces` (ip, nft and unshare installed)")

    # -- the token ------------------------------------------------------------------------
    @property
    def token_path(self) -> Path:
        return self.fleet.paths.state_dir / TOKEN_FILE

    def token(self) -> str | None:
        """The fleet's Ray token (made once, 0600), or None with `auth: none`."""
        if self.spec.auth == "none":
            return None
        path = self.token_path
        if not path.exists():
            from fleet.state import make_private_dir

            make_private_dir(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
        return path.read_text().strip()

    # -- what each node runs --------------------------------------------------------------
    @staticmethod
    def address_of(node: Node) -> str:
        return node.internal_address or node.address or ""

    def start_args(self, node: Node, head: Node) -> list[str]:
        spec = self.spec
        args = ["--node-ip-address", self.address_of(node), "--disable-usage-stats",
                "--resources", json.dumps({f"{RESOURCE_PREFIX}{node.name}": 1}, separators=(",", ":"))]
        if spec.object_store_mb:
            args += ["--object-store-memory", str(spec.object_store_mb * 2**20)]
        if node.role == Role.HEAD:
            args += ["--head", "--port", str(spec.gcs_port), "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(spec.dashboard_port), "--num-cpus", str(spec.head_cpus)]
            accelerators = self.fleet.spec.head.accelerators
        else:
            args += ["--address", f"{self.address_of(head)}:{spec.gcs_port}"]
            if spec.worker_cpus:
                args += ["--num-cpus", str(spec.worker_cpus)]
            accelerators = self.fleet.spec.workers.accelerators
        if accelerators is not None:
            args += ["--num-gpus", str(accelerators.count)]
        elif node.role == Role.HEAD:
            args += ["--num-gpus", "0"]
        return args

    def ray_env(self) -> str:
        """Ray settings of every node's processes: fast detection of a vanished node (they
        matter on the head, whose GCS does the health checks)."""
        spec = self.spec
        return (f"RAY_health_check_period_ms={spec.health_check_period_ms} "
                f"RAY_health_check_timeout_ms={spec.health_check_timeout_ms} "
                f"RAY_health_check_failure_threshold={spec.health_check_failure_threshold} "
                f"RAY_health_check_initial_delay_ms={min(spec.health_check_period_ms, 5000)}")

    def install(self, nodes: Sequence[Node]) -> dict[str, str]:
        """The launcher (0700) and the token (0600) in ~/.fleet/ray/ (0700) of each node."""
        targets = [self.fleet.target(n) for n in nodes]
        failures: dict[str, str] = {}
        files = [(_LAUNCHER.encode(), "launch.sh", 0o700)]
        token = self.token()
        if token is not None:
            files.append((f"{token}\n".encode(), "token", 0o600))
        for data, name, mode in files:
            put = self.fleet.executor.put(targets, data, f"{NODE_RAY_DIR}/{name}", mode=mode, dir_mode=0o700)
            for node_name, outcome in put.results.items():
                if not outcome.ok:
                    failures.setdefault(node_name, f"could not write ~/{NODE_RAY_DIR}/{name}: {outcome.describe()}")
        return failures

    def start(self, nodes: Sequence[Node], head: Node) -> dict[str, str]:
        """Start each node's Ray unless it runs with these arguments already (a node whose
        Ray runs with others is stopped first). Returns node -> why it failed."""
        failures = self.install(nodes)
        nodes = [n for n in nodes if n.name not in failures]
        if not nodes:
            return failures
        ray_dir = f'"$HOME"/{NODE_RAY_DIR}'
        by_name = {n.name: n for n in nodes}

        def command(target) -> str:
            node = by_name[target.name]
            args = shlex.join(self.start_args(node, head))
            env = {"FLEET_RAY_ARGS": args, "FLEET_RAY_ENV": self.ray_env(), "FLEET_RAY_AUTH": self.spec.auth}
            return self.fleet.node_env_prefix(node, 0, 1, env) + (
                group_check() +
                f'if [ -n "$pg" ] && [ "$(cat {ray_dir}/args 2>/dev/null)" = "$FLEET_RAY_ARGS" ]; then '
                'echo running; exit 0; fi; '
                + stop_group_script() +
                f'setsid nohup sh "$launcher" >> {ray_dir}/ray.log 2>&1 < /dev/null & echo started'
            )

        results = self.fleet.executor.run([self.fleet.target(n) for n in nodes], command, timeout=60)
        for name, outcome in results.results.items():
            if not outcome.ok:
                failures[name] = f"could not start Ray: {outcome.describe()}"
            else:
                word = outcome.stdout.strip().splitlines()[-1] if outcome.stdout.strip() else ""
                if word == "started":
                    self.fleet.state.add_event("ray_started", name, "head" if by_name[name].role == Role.HEAD
                                               else f"joins {head.name}")
        return failures

    def stop(self, nodes: Sequence[Node]) -> dict[str, bool]:
        """Stop the Ray of these nodes (signal to each node's Ray group). node -> stopped one."""
        results = self.fleet.executor.run([self.fleet.target(n) for n in nodes], stop_group_script() + "true",
                                          timeout=STOP_WAIT_S + 30)
        return {name: "STOPPED" in r.stdout for name, r in results.results.items() if r.ok}

    # -- up -------------------------------------------------------------------------------
    def ensure(self, head: Node | None, workers: Sequence[Node], result: UpResult) -> None:
        """Ray on the head and on these workers, then wait until each is alive in Ray;
        a node that does not get there is that node's failure in `result`."""
        if head is None:
            return
        self.check_supported()
        nodes = [head, *workers]
        self.fleet.log(f"starting Ray on {len(nodes)} node(s) (head {head.name})")
        failures = self.start(nodes, head)
        if head.name in failures:
            result.failures[head.name] = failures[head.name]
            return
        for name, why in failures.items():
            result.failures[name] = why
        wanted = {n.name for n in nodes if n.name not in failures}
        try:
            missing = self.wait_alive(head, wanted, timeout=self.spec.join_timeout)
        except FleetError as exc:
            result.failures[head.name] = f"the Ray head does not answer: {exc}"
            return
        for name in missing:
            message = (f"not alive in Ray after {self.spec.join_timeout:g} s (see ~/{NODE_RAY_DIR}/ray.log "
                       "on the node)")
            result.failures[name] = message
            self.fleet.state.add_event("ray_join_failed", name, message)
        for name in wanted - missing:
            self.fleet.state.add_event("ray_alive", name, "alive in the Ray cluster")

    def wait_alive(self, head: Node, names: set[str], *, timeout: float) -> set[str]:
        """Wait until every named node is ALIVE in Ray; returns those that are not."""
        deadline = time.monotonic() + timeout
        with self.api(head) as api:
            missing = set(names)
            while True:
                try:
                    alive = {n.fleet_node for n in map(ray_node, api.nodes()) if n.alive}
                    missing = names - alive
                    if not missing:
                        return set()
                except RayApiError:
                    pass  # the dashboard is still starting
                if time.monotonic() > deadline:
                    return missing
                time.sleep(1)

    # -- reaching the head ----------------------------------------------------------------
    @contextlib.contextmanager
    def api(self, head: Node | None = None, *, local_port: int = 0) -> Iterator[RayJobs]:
        """A Jobs/state API client of the head's dashboard, through a tunnel (closed after)."""
        from fleet.ray.tunnel import LocalForward

        head = head or self.head()
        with LocalForward(self.fleet.executor, self.fleet.target(head), self.spec.dashboard_port,
                          local_port=local_port) as tunnel:
            yield RayJobs(tunnel.url, self.token())

    def head(self) -> Node:
        if not self.enabled:
            raise UsageError(f"fleet {self.fleet.spec.name} runs no Ray cluster", hint="set `ray: {enabled: true}` "
                             "in the fleet spec and run `fleet up`")
        head = self.fleet.head()
        if head is None:
            raise UsageError(f"the head of fleet {self.fleet.spec.name} is not running", hint="run `fleet up` first")
        return head

    def nodes(self, api: RayJobs) -> list[RayNode]:
        return [ray_node(entry) for entry in api.nodes()]
