"""A fake Compute Engine API on loopback that the real `google-cloud-compute` client talks to.

It speaks the REST JSON the client sends (`POST /compute/v1/projects/P/zones/Z/instances`,
`GET .../aggregated/instances?filter=...`, zone and global operations, firewalls,
disks), keeps state, applies `labels.KEY = "VALUE"` filters, and injects the faults a
real cloud throws at a fleet: no capacity in a zone, quota exceeded, rate limits, and
the preemption of an instance, and HTTP faults (a 5xx, or an answer that comes too late
for the client's read timeout) for the next N calls. Every instance is backed by a real `LocalNode` (an sshd)
at its own loopback address (127.0.1.N) on the fleet's SSH port, with the keys of its
`ssh-keys` metadata, so that SSH to its `natIP` works; a preemption kills that node.
Disks are inserted, listed and deleted like a cloud's; an instance inserted with an
existing disk as `source` attaches it (one user at a time) and keeps it when deleted
unless `autoDelete`; each such disk is a directory of the fake (`<nodes_root>/.disks/`)
that the backing node gets as its data disk (bind-mounted at `fleet.model.DATA_MOUNT`
when isolated, FLEET_DATA_DIR on loopback), so it outlives every instance. Instances
stop and start (`instances.stop`/`start`; `host_maintenance(name)` stops one the way a
maintenance event stops a VM with `onHostMaintenance=TERMINATE`).
`backing=False` skips the sshd (for the scale benchmark). Every request is recorded
(`requests`), so tests can check what was sent and count calls.

    fake = FakeGce(nodes_root=tmp, ssh_port=2222).start()   # fake.endpoint: http://127.0.0.1:PORT
    ...; fake.stop()                                         # destroys every backing node

or as a process: `python -m fleet.testing.fake_gce --port PORT [--nodes-root DIR]
[--ssh-port P] [--address-base 127.0.1.1] [--no-backing]`, controlled over HTTP at
`POST /_fake/{no_capacity,quota,rate_limit,http_fault,preempt,host_maintenance,reset}` and `GET /_fake/{requests,state}`.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from fleet.providers.localnode import LocalNode
from fleet.providers.localns import FleetNetwork, IsolatedNode, missing_for_namespaces
from fleet.providers.netpolicy import render_tables
from fleet.testing.cloudpolicy import Caller, gce_rules
from fleet.testing.serve import backing_options, parse_loopback_args, parser_for, serve_until_signalled

API_ROOT = "https://www.googleapis.com/compute/v1"
_P = r"/compute/v1/projects/(?P<project>[^/]+)"


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.status,
                "message": self.message,
                "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
            }
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _last(link: str) -> str:
    return link.rstrip("/").rsplit("/", 1)[-1]


def _field(resource: dict[str, Any], path: str) -> Any:
    value: Any = resource
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


_CLAUSE = re.compile(r'^\(?\s*([\w.-]+)\s*(=|!=|eq|ne)\s*"?([^"()]*?)"?\s*\)?$')


def matches_filter(resource: dict[str, Any], text: str | None) -> bool:
    """The subset of the Compute filter language the providers use: clauses
    `field = "value"` / `field != value`, joined by AND."""
    if not text or not text.strip():
        return True
    for clause in re.split(r"\s+AND\s+|\)\s*\(", text.strip(), flags=re.IGNORECASE):
        found = _CLAUSE.match(clause.strip())
        if not found:
            raise ApiError(400, "invalid", f"Invalid value for field 'filter': '{text}'.")
        name, op, expected = found.groups()
        actual = _field(resource, name)
        equal = (str(actual) if actual is not None else None) == expected
        if equal != (op in ("=", "eq")):
            return False
    return True


@dataclass
class Faults:
    no_capacity: set[str] = field(default_factory=set)  # zones
    quota: dict[str, str] = field(default_factory=dict)  # zone or "*" -> quota metric
    rate_limited: int = 0  # the next N API calls answer rateLimitExceeded
    rate_limit_match: str | None = None  # only calls whose path contains this
    false_host_keys: set[str] = field(default_factory=set)  # instances whose guest attributes lie
    http_faults: int = 0  # the next N API calls (whose path contains http_fault_match) fail:
    http_fault_match: str | None = None
    http_fault_status: int = 503  # answered with this status (reason backendError), or
    http_fault_delay: float = 0.0  # answered normally only after this many seconds (> 0)
    http_fault_message: str = "Backend Error (injected)"


@dataclass
class _Op:
    data: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)


class FakeGce:
    """The fake's state and behaviour; `start()` serves it over HTTP on loopback."""

    def __init__(
        self,
        *,
        nodes_root: Path | None = None,
        ssh_port: int = 22,
        address_base: str = "127.0.1.1",
        backing: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        page_size: int = 500,
        isolation: str = "loopback",
        caller_address: str = "127.0.0.1",
        boot_delay: float = 0.0,
    ) -> None:
        self.backing = backing
        self.boot_delay = boot_delay  # seconds an instance stays STAGING before its node boots
        self.isolated = backing and (isolation == "namespaces"
                                     or (isolation == "auto" and missing_for_namespaces() is None))
        self.caller_address = caller_address
        self.ssh_port = ssh_port
        self.page_size = page_size
        self._own_root = nodes_root is None
        self.nodes_root = Path(nodes_root or tempfile.mkdtemp(prefix="fake-gce-nodes-"))
        self._next_address = int(ipaddress.IPv4Address(address_base))
        self._free_addresses: list[str] = []
        self.faults = Faults()
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}  # (zone, name) -> resource
        self.nodes: dict[tuple[str, str], LocalNode] = {}
        self.request_ops: dict[str, dict[str, Any]] = {}  # insert requestId -> its operation
        self.pending_nodes: dict[tuple[str, str], IsolatedNode] = {}  # isolated, reserved, booting
        self.disks: dict[tuple[str, str], dict[str, Any]] = {}
        self.firewalls: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, _Op] = {}
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self._ready: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.RLock()
        self._policy_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-gce-op")
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeGce:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-gce", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and destroy every backing node (even after a failed test)."""
        self._server.shutdown()
        self._server.server_close()
        self._pool.shutdown(wait=True, cancel_futures=False)
        with self._lock:
            nodes = [*self.nodes.values(), *self.pending_nodes.values()]
            self.nodes.clear()
            self.pending_nodes.clear()
        for node in nodes:
            node.destroy()
        if self.isolated:
            fleets = {node.fleet for node in nodes}
            if self.nodes_root.is_dir():
                fleets |= {entry.name for entry in self.nodes_root.iterdir()
                           if entry.is_dir() and not entry.name.startswith(".")}
            for fleet in fleets:
                FleetNetwork.of(self.nodes_root, fleet).remove()
        if self._own_root:
            shutil.rmtree(self.nodes_root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults and inspection (in-process API; the same over /_fake/) ------------------
    def set_no_capacity(self, zone: str, on: bool = True) -> None:
        with self._lock:
            (self.faults.no_capacity.add if on else self.faults.no_capacity.discard)(zone)

    def set_quota_exceeded(self, quota: str = "GPUS_ALL_REGIONS", zone: str = "*") -> None:
        with self._lock:
            self.faults.quota[zone] = quota

    def set_rate_limit(self, times: int, path_contains: str | None = None) -> None:
        with self._lock:
            self.faults.rate_limited, self.faults.rate_limit_match = times, path_contains

    def set_http_fault(self, times: int, *, status: int = 503, delay: float = 0.0,
                       path_contains: str | None = None, message: str | None = None) -> None:
        """The next `times` calls whose path contains `path_contains` answer `status`
        (a transient 5xx), or, with `delay`, answer normally `delay` seconds late."""
        with self._lock:
            faults = self.faults
            faults.http_faults, faults.http_fault_match = times, path_contains
            faults.http_fault_status, faults.http_fault_delay = status, delay
            if message:
                faults.http_fault_message = message

    def reset_faults(self) -> None:
        with self._lock:
            self.faults = Faults()

    def requests_matching(self, method: str, path_pattern: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["method"] == method and re.search(path_pattern, r["path"])]

    def instance(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return next((i for (z, n), i in self.instances.items() if n == name), None)

    def backing_node(self, name: str) -> LocalNode | None:
        with self._lock:
            return next((node for (z, n), node in self.nodes.items() if n == name), None)

    def vouch_false_host_key(self, name: str) -> None:
        """From now on, instance `name` publishes a host key its sshd does not have
        (what fleet sees when an impostor answers at the node's address)."""
        with self._lock:
            self.faults.false_host_keys.add(name)

    def guest_attributes(self, zone: str, name: str, query_path: str) -> dict[str, Any]:
        """`instances.getGuestAttributes`: the backing node's host key under `hostkeys/`,
        once the node runs, as the guest agent publishes it (type as key, base64 as value)."""
        with self._lock:
            resource = self.instances.get((zone, name))
            node = self.nodes.get((zone, name))
            lie = name in self.faults.false_host_keys
        if resource is None:
            raise ApiError(404, "notFound", f"The resource 'instances/{name}' was not found")
        items = resource.get("metadata", {}).get("items", [])
        enabled = any(i.get("key") == "enable-guest-attributes" and str(i.get("value")).upper() == "TRUE"
                      for i in items)
        if not enabled or node is None or not node.is_running():
            raise ApiError(404, "notFound", f"The resource 'instances/{name}/guestAttributes' was not found")
        key_type, blob = (_random_host_key() if lie else node.host_key_line).split()[:2]
        found = [{"namespace": "hostkeys", "key": key_type, "value": blob}] if query_path.startswith("hostkeys") else []
        return {"kind": "compute#guestAttributes", "queryPath": query_path, "queryValue": {"items": found}}

    def preempt(self, name: str) -> None:
        """Preempt a Spot VM the way GCE does: hard off, a `compute.instances.preempted`
        zone operation, then STOP (TERMINATED, disk kept) or DELETE per its scheduling."""
        with self._lock:
            key = next(((z, n) for (z, n) in self.instances if n == name), None)
            if key is None:
                raise ApiError(404, "notFound", f"The resource 'instances/{name}' was not found")
            resource = self.instances[key]
            scheduling = resource.get("scheduling", {})
            if scheduling.get("provisioningModel") != "SPOT" and not scheduling.get("preemptible"):
                raise ApiError(400, "invalid", f"instance {name} is not a Spot/preemptible VM")
            resource["status"] = "STOPPING"
            node = self.nodes.get(key)
        if node is not None:
            node.kill(preempted=True)
        zone = key[0]
        self._new_op(zone, "compute.instances.preempted", resource["selfLink"], done=True, user="system")
        if scheduling.get("instanceTerminationAction", "STOP") == "DELETE":
            self._remove_instance(key)
        else:
            with self._lock:
                resource["status"] = "TERMINATED"

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "instances": [
                    {
                        "name": n,
                        "zone": z,
                        "status": i["status"],
                        "labels": i.get("labels", {}),
                        "address": _nat_ip(i),
                        "host_key": self.nodes[(z, n)].host_key_line
                        if (z, n) in self.nodes and self.nodes[(z, n)].dir.exists()
                        else None,
                    }
                    for (z, n), i in self.instances.items()
                ],
                "firewalls": sorted(self.firewalls),
                "disks": [
                    {"name": n, "zone": z, "labels": d.get("labels", {}), "users": list(d.get("users", []))}
                    for (z, n), d in self.disks.items()
                ],
                "backing_nodes": [node.name for node in self.nodes.values() if node.is_running()],
                "in_flight": self.in_flight,
            }

    # -- operations --------------------------------------------------------------------
    def _new_op(
        self,
        zone: str | None,
        kind: str,
        target: str,
        *,
        done: bool,
        user: str = "fake@example.com",
        error: dict[str, Any] | None = None,
    ) -> _Op:
        name = f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        scope = f"zones/{zone}" if zone else "global"
        data: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(uuid.uuid4().int % 10**18),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "RUNNING",
            "progress": 0,
            "insertTime": _now(),
            "user": user,
            "selfLink": f"{API_ROOT}/projects/fake/{scope}/operations/{name}",
        }
        if zone:
            data["zone"] = f"{API_ROOT}/projects/fake/zones/{zone}"
        op = _Op(data)
        with self._lock:
            self.operations[name] = op
        if done:
            self._finish(op, error)
        return op

    def _finish(self, op: _Op, error: dict[str, Any] | None = None) -> None:
        with self._lock:
            op.data.update(status="DONE", progress=100, endTime=_now())
            if error:
                op.data["error"] = {"errors": [error]}
                op.data["httpErrorStatusCode"] = 400
        op.done.set()

    def _run_op(self, op: _Op, work: Any) -> None:
        def runner() -> None:
            error = None
            try:
                work()
            except ApiError as exc:
                error = {"code": exc.reason, "message": exc.message}
            except Exception as exc:  # noqa: BLE001 (the fake must finish every operation)
                error = {"code": "INTERNAL_ERROR", "message": str(exc)}
            self._finish(op, error)

        self._pool.submit(runner)

    # -- instances ---------------------------------------------------------------------
    def _allocate_address(self) -> str:
        with self._lock:
            if self._free_addresses:
                return self._free_addresses.pop(0)
            while True:
                address = str(ipaddress.IPv4Address(self._next_address))
                self._next_address += 1
                if address.endswith((".0", ".255")):
                    continue
                if not self.backing or _port_free(address, self.ssh_port):
                    return address

    def insert_instance(
        self, project: str, zone: str, body: dict[str, Any], request_id: str | None = None
    ) -> dict[str, Any]:
        with self._lock:
            if request_id and request_id in self.request_ops:  # Compute Engine dedupes on requestId
                return self.request_ops[request_id]
        data = self._insert_instance(project, zone, body)
        if request_id:
            with self._lock:
                self.request_ops[request_id] = data
        return data

    def _insert_instance(self, project: str, zone: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name") or ""
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'.")
        with self._lock:
            quota = self.faults.quota.get(zone) or self.faults.quota.get("*")
            if quota:
                where = "globally" if quota.endswith("ALL_REGIONS") else f"in region {zone.rsplit('-', 1)[0]}"
                raise ApiError(403, "quotaExceeded", f"Quota '{quota}' exceeded.  Limit: 0.0 {where}.")
            if any(n == name for (_z, n) in self.instances):
                raise ApiError(
                    409,
                    "alreadyExists",
                    f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists",
                )
            link = f"{API_ROOT}/projects/{project}/zones/{zone}/instances/{name}"
            if zone in self.faults.no_capacity:
                op = self._new_op(
                    zone,
                    "insert",
                    link,
                    done=True,
                    error={
                        "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                        "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough resources "
                        "available to fulfill the request.  Try a different zone, or try again later.",
                    },
                )
                return op.data
            resource = dict(
                body,
                id=str(uuid.uuid4().int % 10**18),
                status="PROVISIONING",
                zone=f"{API_ROOT}/projects/{project}/zones/{zone}",
                selfLink=link,
                creationTimestamp=_now(),
                kind="compute#instance",
            )
            key = (zone, name)
            for disk in resource.get("disks", []):
                if disk.get("source") and not disk.get("initializeParams"):
                    existing = self.disks.get((zone, _last(disk["source"])))
                    if existing is None:
                        raise ApiError(404, "notFound", f"The resource '{disk['source']}' was not found")
                    if existing.get("users"):
                        raise ApiError(400, "resourceInUseByAnotherResource",
                                       f"The disk resource '{existing['selfLink']}' is already being used by "
                                       f"'{existing['users'][0]}'")
            self.instances[key] = resource
            ready = self._ready[key] = threading.Event()
            for disk in resource.get("disks", []):
                if disk.get("source") and not disk.get("initializeParams"):
                    self.disks[(zone, _last(disk["source"]))]["users"] = [link]
                    continue
                params = disk.get("initializeParams", {})
                disk_name = params.get("diskName") or name
                disk["source"] = f"{API_ROOT}/projects/{project}/zones/{zone}/disks/{disk_name}"
                self.disks[(zone, disk_name)] = {
                    "name": disk_name,
                    "zone": resource["zone"],
                    "labels": dict(params.get("labels", {})),
                    "sizeGb": str(params.get("diskSizeGb", "10")),
                    "status": "READY",
                    "users": [link],
                    "selfLink": disk["source"],
                }
            op = self._new_op(zone, "insert", link, done=False)

        def boot() -> None:
            # PROVISIONING -> STAGING (an internal address) -> RUNNING (booted, natIP).
            try:
                isolated = self._reserve_isolated(key, resource) if self.isolated else None
                address = isolated.address if isolated is not None else self._allocate_address()
                interfaces = resource.setdefault("networkInterfaces", [{}])
                with self._lock:
                    interfaces[0]["networkIP"] = address  # never a made-up address
                    if resource["status"] == "PROVISIONING":
                        resource["status"] = "STAGING"
                time.sleep(self.boot_delay)
                if isolated is not None:
                    self._boot_isolated(key, resource, isolated)
                elif self.backing:
                    self._start_node(key, resource, address)
                with self._lock:
                    for config in interfaces[0].get("accessConfigs", []):
                        config["natIP"] = address
                    if key in self.instances and resource["status"] == "STAGING":
                        resource["status"] = "RUNNING"
            finally:
                ready.set()

        self._run_op(op, boot)
        return op.data

    def disk_dir(self, zone: str, name: str) -> Path:
        """Where the contents of disk `name` live: outside every backing node's directory."""
        return self.nodes_root / ".disks" / f"{zone}-{name}"

    def _data_dir_of(self, key: tuple[str, str], resource: dict[str, Any]) -> Path | None:
        """The directory of the first attached (non-boot) disk, the node's data disk."""
        for disk in resource.get("disks", []):
            if not disk.get("boot") and disk.get("source"):
                return self.disk_dir(key[0], _last(disk["source"]))
        return None

    def insert_disk(self, project: str, zone: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name") or ""
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'.")
        link = f"{API_ROOT}/projects/{project}/zones/{zone}/disks/{name}"
        with self._lock:
            if (zone, name) in self.disks:
                raise ApiError(409, "alreadyExists", f"The resource 'projects/{project}/zones/{zone}/disks/{name}' "
                               "already exists")
            self.disks[(zone, name)] = {
                "kind": "compute#disk", "name": name, "zone": f"{API_ROOT}/projects/{project}/zones/{zone}",
                "labels": dict(body.get("labels", {})), "sizeGb": str(body.get("sizeGb", "10")),
                "type": body.get("type", f"zones/{zone}/diskTypes/pd-standard"), "status": "READY", "users": [],
                "selfLink": link, "creationTimestamp": _now(), "id": str(uuid.uuid4().int % 10**18),
            }
        if self.backing:
            self.disk_dir(zone, name).mkdir(parents=True, exist_ok=True)
        return self._new_op(zone, "insert", link, done=True).data

    def get_disk(self, zone: str, name: str) -> dict[str, Any]:
        with self._lock:
            disk = self.disks.get((zone, name))
            if disk is None:
                raise ApiError(404, "notFound", f"The resource 'disks/{name}' was not found")
            return json.loads(json.dumps(disk))

    def remove_disk(self, zone: str, name: str) -> dict[str, Any]:
        with self._lock:
            disk = self.disks.get((zone, name))
            if disk is None:
                raise ApiError(404, "notFound", f"The resource 'disks/{name}' was not found")
            if disk.get("users"):
                raise ApiError(
                    400,
                    "resourceInUseByAnotherResource",
                    f"The disk resource '{name}' is already being used by '{disk['users'][0]}'",
                )
            del self.disks[(zone, name)]
        shutil.rmtree(self.disk_dir(zone, name), ignore_errors=True)
        return self._new_op(zone, "delete", disk["selfLink"], done=True).data

    def _start_node(self, key: tuple[str, str], resource: dict[str, Any], address: str) -> None:
        items = resource.get("metadata", {}).get("items", [])
        ssh_keys = next((i.get("value", "") for i in items if i.get("key") == "ssh-keys"), "")
        keys = [line.split(":", 1)[1] for line in ssh_keys.splitlines() if ":" in line]
        fleet_name = resource.get("labels", {}).get("fleet", "nofleet")
        node = LocalNode.create(
            self.nodes_root,
            name=key[1],
            fleet=fleet_name,
            authorized_keys=keys,
            address=address,
            port=self.ssh_port,
            labels=resource.get("labels", {}),
            data_dir=self._data_dir_of(key, resource),
        )
        with self._lock:
            self.nodes[key] = node

    def _reserve_isolated(self, key: tuple[str, str], resource: dict[str, Any]) -> IsolatedNode:
        node = IsolatedNode.reserve(self.nodes_root, name=key[1], fleet=resource.get("labels", {}).get("fleet", "nofleet"),
                                    user="", labels=resource.get("labels", {}))
        with self._lock:
            self.pending_nodes[key] = node
        return node

    def _boot_isolated(self, key: tuple[str, str], resource: dict[str, Any], node: IsolatedNode) -> None:
        """Boot the node with the instance's startup-script metadata, as the guest agent would."""
        items = resource.get("metadata", {}).get("items", [])
        script = next((i.get("value", "") for i in items if i.get("key") == "startup-script"), "") or "exit 0\n"
        self.apply_policy()
        node.start(script, ssh_port=self.ssh_port, data_dir=self._data_dir_of(key, resource))
        with self._lock:
            self.pending_nodes.pop(key, None)
            self.nodes[key] = node
        self.apply_policy()

    def apply_policy(self) -> None:
        """Enforce the firewall rules on each fleet's bridge (isolated backing only)."""
        if not self.isolated:
            return
        # Snapshot and write as one step: a stale snapshot written last would drop a node.
        with self._policy_lock:
            self._apply_policy_locked()

    def _apply_policy_locked(self) -> None:
        with self._lock:
            nodes = {**self.pending_nodes, **self.nodes}
            resources = {key: self.instances.get(key) for key in nodes}
            firewalls = [dict(f) for f in self.firewalls.values()]
        by_fleet: dict[str, dict[str, tuple[str, list[str], str]]] = {}
        for key, node in nodes.items():
            resource = resources.get(key) or {}
            tags = list(resource.get("tags", {}).get("items", []))
            network = (resource.get("networkInterfaces") or [{}])[0].get("network", "default")
            by_fleet.setdefault(node.fleet, {})[key[1]] = (node.address, tags, network)
        for fleet, instances in by_fleet.items():
            net = FleetNetwork.of(self.nodes_root, fleet)
            if net.subnet() is None:
                continue
            caller = Caller(public=self.caller_address, bridge=net.host_address())
            net.apply_policy(render_tables(net, gce_rules(instances, firewalls, caller)))

    def _remove_instance(self, key: tuple[str, str]) -> None:
        ready = self._ready.get(key)
        if ready is not None:
            ready.wait(60)
        with self._lock:
            resource = self.instances.pop(key, None)
            node = self.nodes.pop(key, None)
            self._ready.pop(key, None)
            if resource is not None:
                for disk in resource.get("disks", []):
                    if disk.get("autoDelete", False) and disk.get("source"):
                        self.disks.pop((key[0], _last(disk["source"])), None)
                        shutil.rmtree(self.disk_dir(key[0], _last(disk["source"])), ignore_errors=True)
                    elif disk.get("source") and (key[0], _last(disk["source"])) in self.disks:
                        self.disks[(key[0], _last(disk["source"]))]["users"] = []
        if node is not None:
            address = node.address
            node.destroy()
            with self._lock:
                if not self.isolated:
                    self._free_addresses.append(address)
            self.apply_policy()

    def delete_instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        key = (zone, name)
        with self._lock:
            if key not in self.instances:
                raise ApiError(
                    404,
                    "notFound",
                    f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
                )
            self.instances[key]["status"] = "STOPPING"
            op = self._new_op(zone, "delete", self.instances[key]["selfLink"], done=False)
        self._run_op(op, lambda: self._remove_instance(key))
        return op.data

    def stop_instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        key = (zone, name)
        with self._lock:
            if key not in self.instances:
                raise ApiError(
                    404,
                    "notFound",
                    f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
                )
            resource = self.instances[key]
            resource["status"] = "STOPPING"
            op = self._new_op(zone, "stop", resource["selfLink"], done=False)

        def stop() -> None:
            ready = self._ready.get(key)
            if ready is not None:
                ready.wait(60)
            node = self.nodes.get(key)
            if node is not None:
                node.kill(preempted=False)
            with self._lock:
                resource["status"] = "TERMINATED"

        self._run_op(op, stop)
        return op.data

    def start_instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        """`instances.start`: a TERMINATED instance boots again with its disks."""
        key = (zone, name)
        with self._lock:
            resource = self.instances.get(key)
            if resource is None:
                raise ApiError(404, "notFound",
                               f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found")
            if resource["status"] != "TERMINATED":
                return self._new_op(zone, "start", resource["selfLink"], done=True).data
            resource["status"] = "STAGING"
            node = self.nodes.get(key)
            op = self._new_op(zone, "start", resource["selfLink"], done=False)

        def boot() -> None:
            if node is not None:
                if isinstance(node, IsolatedNode):
                    self.apply_policy()
                    node.boot()
                    self.apply_policy()
                else:
                    node.boot()
            with self._lock:
                if resource["status"] == "STAGING":
                    resource["status"] = "RUNNING"

        self._run_op(op, boot)
        return op.data

    def host_maintenance(self, name: str) -> None:
        """A host maintenance event on a VM with `onHostMaintenance=TERMINATE` (GPU VMs):
        the machine goes off hard and the instance is TERMINATED (stopped, disks kept),
        with a `compute.instances.terminateOnHostMaintenance` zone operation."""
        with self._lock:
            key = next(((z, n) for (z, n) in self.instances if n == name), None)
            if key is None:
                raise ApiError(404, "notFound", f"The resource 'instances/{name}' was not found")
            resource = self.instances[key]
            resource["status"] = "STOPPING"
            node = self.nodes.get(key)
        if node is not None:
            node.kill(preempted=False)
        self._new_op(key[0], "compute.instances.terminateOnHostMaintenance", resource["selfLink"], done=True,
                     user="system")
        with self._lock:
            resource["status"] = "TERMINATED"

    def list_scoped(
        self, table: dict[tuple[str, str], dict[str, Any]], zone: str | None, query: dict[str, str], kind: str
    ) -> dict[str, Any]:
        with self._lock:
            found = [
                (z, r)
                for (z, _n), r in sorted(table.items())
                if (zone is None or z == zone) and matches_filter(r, query.get("filter"))
            ]
            found = [(z, json.loads(json.dumps(r))) for z, r in found]
        size = min(int(query.get("maxResults", self.page_size)), self.page_size)
        start = int(query.get("pageToken") or 0)
        page = found[start : start + size]
        result: dict[str, Any] = {}
        if start + size < len(found):
            result["nextPageToken"] = str(start + size)
        if zone is None:
            items: dict[str, Any] = {}
            for z, r in page:
                items.setdefault(f"zones/{z}", {kind: []})[kind].append(r)
            result["items"] = items
        else:
            result["items"] = [r for _z, r in page]
        return result


def _random_host_key() -> str:
    """A fresh ed25519 public key line that no node has."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _nat_ip(resource: dict[str, Any]) -> str | None:
    for interface in resource.get("networkInterfaces", []):
        for config in interface.get("accessConfigs", []):
            if config.get("natIP"):
                return str(config["natIP"])
    return None


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


# -- HTTP routing ------------------------------------------------------------------------
def _route_table(fake: FakeGce) -> list[tuple[str, re.Pattern[str], Any]]:
    def op_of(name: str) -> _Op:
        op = fake.operations.get(name)
        if op is None:
            raise ApiError(404, "notFound", f"The resource 'operations/{name}' was not found")
        return op

    def wait_op(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        op = op_of(m["op"])
        op.done.wait(120)  # the real wait returns after at most 2 minutes
        return op.data

    def guest_attributes(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        return fake.guest_attributes(m["zone"], m["name"], q.get("queryPath", ""))

    def get_instance(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        resource = fake.instances.get((m["zone"], m["name"]))
        if resource is None:
            raise ApiError(404, "notFound", f"The resource 'instances/{m['name']}' was not found")
        return resource

    def list_ops(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        ops = [
            op.data
            for op in list(fake.operations.values())
            if op.data.get("zone", "").endswith(f"/zones/{m['zone']}")
            and matches_filter(op.data, q.get("filter"))
        ]
        return {"items": ops}

    def insert_firewall(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        name = b.get("name", "")
        with fake._lock:
            if name in fake.firewalls:
                raise ApiError(
                    409,
                    "alreadyExists",
                    f"The resource 'projects/{m['project']}/global/firewalls/{name}' already exists",
                )
            link = f"{API_ROOT}/projects/{m['project']}/global/firewalls/{name}"
            fake.firewalls[name] = dict(b, selfLink=link, kind="compute#firewall")
        fake.apply_policy()
        return fake._new_op(None, "insert", link, done=True).data

    def get_firewall(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        if m["name"] not in fake.firewalls:
            raise ApiError(404, "notFound", f"The resource 'firewalls/{m['name']}' was not found")
        return fake.firewalls[m["name"]]

    def delete_firewall(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        with fake._lock:
            resource = fake.firewalls.pop(m["name"], None)
        if resource is None:
            raise ApiError(404, "notFound", f"The resource 'firewalls/{m['name']}' was not found")
        fake.apply_policy()
        return fake._new_op(None, "delete", resource["selfLink"], done=True).data

    def patch_firewall(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        with fake._lock:
            rule = fake.firewalls.get(m["name"])
            if rule is None:
                raise ApiError(404, "notFound", f"The resource 'firewalls/{m['name']}' was not found")
            rule.update({k: v for k, v in b.items() if k not in ("name", "selfLink", "kind")})
        fake.apply_policy()
        return fake._new_op(None, "patch", rule["selfLink"], done=True).data

    def list_firewalls(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        return {"items": [f for f in fake.firewalls.values() if matches_filter(f, q.get("filter"))]}

    def delete_disk(m: dict[str, str], q: dict[str, str], b: Any) -> Any:
        return fake.remove_disk(m["zone"], m["name"])

    zone = _P + r"/zones/(?P<zone>[^/]+)"
    return [
        (
            "GET",
            re.compile(_P + r"/aggregated/instances$"),
            lambda m, q, b: fake.list_scoped(fake.instances, None, q, "instances"),
        ),
        (
            "GET",
            re.compile(zone + r"/instances$"),
            lambda m, q, b: fake.list_scoped(fake.instances, m["zone"], q, "instances"),
        ),
        (
            "POST",
            re.compile(zone + r"/instances$"),
            lambda m, q, b: fake.insert_instance(m["project"], m["zone"], b, q.get("requestId")),
        ),
        ("GET", re.compile(zone + r"/instances/(?P<name>[^/]+)$"), get_instance),
        ("GET", re.compile(zone + r"/instances/(?P<name>[^/]+)/getGuestAttributes$"), guest_attributes),
        (
            "DELETE",
            re.compile(zone + r"/instances/(?P<name>[^/]+)$"),
            lambda m, q, b: fake.delete_instance(m["project"], m["zone"], m["name"]),
        ),
        (
            "POST",
            re.compile(zone + r"/instances/(?P<name>[^/]+)/start$"),
            lambda m, q, b: fake.start_instance(m["project"], m["zone"], m["name"]),
        ),
        (
            "POST",
            re.compile(zone + r"/instances/(?P<name>[^/]+)/stop$"),
            lambda m, q, b: fake.stop_instance(m["project"], m["zone"], m["name"]),
        ),
        ("GET", re.compile(zone + r"/operations/(?P<op>[^/]+)$"), lambda m, q, b: op_of(m["op"]).data),
        ("POST", re.compile(zone + r"/operations/(?P<op>[^/]+)/wait$"), wait_op),
        ("GET", re.compile(zone + r"/operations$"), list_ops),
        ("GET", re.compile(_P + r"/global/operations/(?P<op>[^/]+)$"), lambda m, q, b: op_of(m["op"]).data),
        ("POST", re.compile(_P + r"/global/operations/(?P<op>[^/]+)/wait$"), wait_op),
        ("POST", re.compile(_P + r"/global/firewalls$"), insert_firewall),
        ("GET", re.compile(_P + r"/global/firewalls$"), list_firewalls),
        ("GET", re.compile(_P + r"/global/firewalls/(?P<name>[^/]+)$"), get_firewall),
        ("DELETE", re.compile(_P + r"/global/firewalls/(?P<name>[^/]+)$"), delete_firewall),
        ("PATCH", re.compile(_P + r"/global/firewalls/(?P<name>[^/]+)$"), patch_firewall),
        (
            "GET",
            re.compile(_P + r"/aggregated/disks$"),
            lambda m, q, b: fake.list_scoped(fake.disks, None, q, "disks"),
        ),
        (
            "GET",
            re.compile(zone + r"/disks$"),
            lambda m, q, b: fake.list_scoped(fake.disks, m["zone"], q, "disks"),
        ),
        ("DELETE", re.compile(zone + r"/disks/(?P<name>[^/]+)$"), delete_disk),
        ("POST", re.compile(zone + r"/disks$"), lambda m, q, b: fake.insert_disk(m["project"], m["zone"], b)),
        ("GET", re.compile(zone + r"/disks/(?P<name>[^/]+)$"), lambda m, q, b: fake.get_disk(m["zone"], m["name"])),
    ]


def _control(fake: FakeGce, action: str, body: dict[str, Any]) -> Any:
    if action == "no_capacity":
        fake.set_no_capacity(body["zone"], bool(body.get("on", True)))
    elif action == "quota":
        fake.set_quota_exceeded(body.get("quota", "GPUS_ALL_REGIONS"), body.get("zone", "*"))
    elif action == "rate_limit":
        fake.set_rate_limit(int(body["times"]), body.get("path_contains"))
    elif action == "http_fault":
        fake.set_http_fault(int(body["times"]), status=int(body.get("status", 503)),
                            delay=float(body.get("delay", 0.0)), path_contains=body.get("path_contains"),
                            message=body.get("message"))
    elif action == "preempt":
        fake.preempt(body["name"])
    elif action == "host_maintenance":
        fake.host_maintenance(body["name"])
    elif action == "false_host_key":
        fake.vouch_false_host_key(body["name"])
    elif action == "reset":
        fake.reset_faults()
    elif action == "requests":
        with fake._lock:
            return list(fake.requests)
    elif action == "state":
        return fake.state()
    else:
        raise ApiError(404, "notFound", f"unknown control action {action}")
    return {"ok": True}


def _handler_for(fake: FakeGce) -> type[BaseHTTPRequestHandler]:
    routes = _route_table(fake)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self, method: str) -> None:
            with fake._lock:
                fake.in_flight += 1
            try:
                status, payload = self._dispatch(method)
            finally:
                with fake._lock:
                    fake.in_flight -= 1
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a read timeout, maybe injected)

        def _dispatch(self, method: str) -> tuple[int, Any]:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                return 400, ApiError(400, "parseError", "body is not JSON").body()
            try:
                if url.path.startswith("/_fake/"):
                    return 200, _control(fake, url.path.removeprefix("/_fake/"), body)
                with fake._lock:
                    fake.requests.append(
                        {
                            "method": method,
                            "path": url.path,
                            "query": query,
                            "body": body,
                            "time": time.time(),
                        }
                    )
                    limited = fake.faults.rate_limited > 0 and (
                        fake.faults.rate_limit_match is None or fake.faults.rate_limit_match in url.path
                    )
                    if limited:
                        fake.faults.rate_limited -= 1
                    faults = fake.faults
                    faulty = faults.http_faults > 0 and (
                        faults.http_fault_match is None or faults.http_fault_match in url.path
                    )
                    if faulty:
                        faults.http_faults -= 1
                if limited:
                    raise ApiError(403, "rateLimitExceeded", "Rate Limit Exceeded")
                if faulty and faults.http_fault_delay > 0:
                    time.sleep(faults.http_fault_delay)
                elif faulty:
                    raise ApiError(faults.http_fault_status, "backendError", faults.http_fault_message)
                for verb, pattern, action in routes:
                    found = pattern.match(url.path)
                    if verb == method and found:
                        return 200, action(found.groupdict(), query, body)
                raise ApiError(404, "notFound", f"no route for {method} {url.path}")
            except ApiError as exc:
                return exc.status, exc.body()
            except (KeyError, TypeError, ValueError) as exc:
                return 400, ApiError(400, "invalid", f"bad request: {exc}").body()

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def do_PATCH(self) -> None:
            self._serve("PATCH")

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = parser_for("fleet.testing.fake_gce", __doc__.split("\n")[0], address_base="127.0.1.1")
    args = parse_loopback_args(parser, argv)
    fake = FakeGce(**backing_options(args))
    return serve_until_signalled(fake, "fake GCE")


if __name__ == "__main__":
    raise SystemExit(main())
