"""A fake EC2 on loopback: moto's server, with every instance backed by a real local node.

moto answers the EC2 API (boto3 reaches it through `AWS_ENDPOINT_URL`); a WSGI
middleware in front of it

- starts a `LocalNode` (an sshd) for each instance that `RunInstances` creates, at its
  own loopback address on the fleet's SSH port, with the imported key pair's public key,
  and rewrites moto's made-up addresses (54.x public, 10.x private) to that loopback
  address in every response, so that nothing ever tries to reach moto's addresses;
- reports each instance `pending` with no public address until its backing node has
  booted (the node starts in the background, after `boot_delay` seconds), as EC2's
  `RunInstances` does: its reply never carries a `PublicIpAddress`;
- kills the node when the instance is stopped or terminated, and boots it again (same
  directory, host key and address) when a stopped instance is started;
- gives a booting instance tagged `fleet-data-volume=<id>` that EBS volume as its data
  disk once it is attached (up to 60 s, as the guest's startup script waits for the
  device): a directory per volume (`<nodes_root>/.disks/<id>`) that outlives every
  instance, bind-mounted at `fleet.model.DATA_MOUNT` (isolated) or FLEET_DATA_DIR
  (loopback); and refuses what EC2 refuses and moto lets through: attaching a volume
  that is in use or in another availability zone;
- injects the errors moto never raises (capacity, limits, throttling, 5xx, answers
  later than the client's read timeout), per action (or every action: "*") and
  zone/subnet, a number of times or until cleared;
- records every request (action and parameters) so that tests can check what was sent
  and count the calls.

With `isolation="namespaces"` every backing node is an isolated local node
(`fleet.providers.localns`): it boots with the instance's user data (the fleet's
rendered startup script) as a cloud instance would, gets an address on a bridge of the
fleet's, and the security groups are enforced on that bridge (`cloudpolicy`): the
caller counts as `caller_address` (what the cloud would see as its public address).

`interrupt(instance)` simulates a spot interruption: the instance is terminated in
moto's backend with state reason `Server.SpotInstanceTermination`, and its node is
killed. In-process: `FakeEc2(...).start()` (`.endpoint`), or as a process:
`python -m fleet.testing.fake_ec2 --port PORT [--nodes-root DIR] [--ssh-port P]
[--address-base 127.0.2.1] [--no-backing]`, controlled at `POST /_fake/{fault,interrupt,
reset}` and `GET /_fake/{requests,state}`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import json
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs
from xml.etree import ElementTree

from fleet.errors import FleetError
from fleet.providers.localnode import LocalNode
from fleet.providers.localns import FleetNetwork, IsolatedNode, missing_for_namespaces
from fleet.providers.netpolicy import render_tables
from fleet.providers.vouched import CONSOLE_BEGIN, CONSOLE_END
from fleet.testing.cloudpolicy import Caller, ec2_rules
from fleet.testing.fake_gce import _port_free, _random_host_key
from fleet.testing.serve import backing_options, parse_loopback_args, parser_for, serve_until_signalled

_IPV4 = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")
_DNS = re.compile(r"<(dnsName|privateDnsName|publicDnsName)>[^<]*</\1>")
_INSTANCE_ID = re.compile(r"<instanceId>(i-[0-9a-f]+)</instanceId>")
_REGION = re.compile(r"Credential=[^/]+/\d+/([a-z0-9-]+)/")
_STATUS = {"RequestLimitExceeded": 503, "InsufficientInstanceCapacity": 500, "InsufficientCapacity": 500,
           "InternalError": 500, "Unavailable": 503}


@dataclass
class Fault:
    action: str
    code: str
    zone: str | None = None  # match Placement.AvailabilityZone or the subnet's zone
    subnet: str | None = None
    times: int | None = None  # None: until cleared
    message: str = ""
    after: bool = False  # answer the error only after moto did the work (a lost reply)
    delay: float = 0.0  # > 0: no error, the answer comes this many seconds late (a read timeout)


def _tags_of(instance: Any) -> dict[str, str]:
    return {str(t.get("key")): str(t.get("value")) for t in instance.get_tags()}


def _quiet_handler() -> Any:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class QuietHandler(MotoRequestHandler):  # type: ignore[misc]
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    return QuietHandler


def _moto_backend(region: str) -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    return ec2_backends[DEFAULT_ACCOUNT_ID][region]


class FakeEc2:
    def __init__(
        self,
        *,
        nodes_root: Path | None = None,
        ssh_port: int = 22,
        address_base: str = "127.0.2.1",
        backing: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        region: str = "us-east-1",
        boot_delay: float = 0.0,
        isolation: str = "loopback",
        caller_address: str = "127.0.0.1",
    ) -> None:
        self.backing = backing
        self.isolated = isolation == "namespaces" or (isolation == "auto" and missing_for_namespaces() is None)
        self.caller_address = caller_address
        self.boot_delay = boot_delay
        self.booting: set[str] = set()  # instance ids whose backing node is not up yet
        self.pending_nodes: dict[str, IsolatedNode] = {}  # isolated backing nodes reserved, booting
        self._boots: list[threading.Thread] = []
        self.ssh_port = ssh_port
        self.region = region
        self._own_root = nodes_root is None
        self.nodes_root = Path(nodes_root or tempfile.mkdtemp(prefix="fake-ec2-nodes-"))
        self._next_address = int(ipaddress.IPv4Address(address_base))
        self.faults: list[Fault] = []
        self.requests: list[dict[str, Any]] = []
        self.addresses: dict[str, str] = {}  # instance id -> loopback address
        self.rewrite: dict[str, str] = {}  # moto address -> loopback address
        self.nodes: dict[str, LocalNode] = {}
        self.stopped: dict[str, LocalNode] = {}  # stopped instances' nodes, booted again on start
        self.client_tokens: dict[str, bytes] = {}  # RunInstances ClientToken -> its reply
        self.false_host_keys: set[str] = set()  # instance names whose console output lies
        self._lock = threading.RLock()
        self._policy_lock = threading.Lock()
        self._host, self._port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeEc2:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.reset_moto()
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            self._host, self._port, self._middleware(app), threaded=True, request_handler=_quiet_handler()
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-ec2", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, destroy every backing node, forget moto's state."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for boot in list(self._boots):
            boot.join(timeout=120)
        with self._lock:
            nodes = [*self.nodes.values(), *self.stopped.values()]
            self.nodes.clear()
            self.stopped.clear()
        for node in nodes:
            node.destroy()
        if self.isolated:
            for fleet in {node.fleet for node in nodes} | set(_fleets_under(self.nodes_root)):
                FleetNetwork.of(self.nodes_root, fleet).remove()
        self.reset_moto()
        if self._own_root:
            shutil.rmtree(self.nodes_root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def reset_moto() -> None:
        from moto.moto_api._internal.models import moto_api_backend

        moto_api_backend.reset()

    # -- faults, interruptions, inspection ---------------------------------------------
    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def actions(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if name is None or r["action"] == name]

    def instance_id_of(self, name: str) -> str | None:
        backend = _moto_backend(self.region)
        for instance in backend.all_instances():
            if _tags_of(instance).get("Name") == name and instance.state != "terminated":
                return str(instance.id)
        return None

    def interrupt(self, instance: str) -> str:
        """Spot interruption of an instance (id or Name tag); returns the instance id."""
        from moto.ec2.models.instances import StateReason

        instance_id = instance if instance.startswith("i-") else self.instance_id_of(instance)
        if instance_id is None:
            raise KeyError(f"no live instance {instance}")
        with self._lock:
            node = self.nodes.pop(instance_id, None)
            self.booting.discard(instance_id)
        if node is not None:
            node.kill(preempted=True)
        moto_instance = _moto_backend(self.region).get_instance(instance_id)
        moto_instance.terminate()
        moto_instance.state_reason = StateReason(
            "Server.SpotInstanceTermination: Spot instance termination", "Server.SpotInstanceTermination"
        )
        return instance_id

    def wait_booted(self, timeout: float = 60.0) -> None:
        """Until every backing node that is booting has booted (for tests that look at
        addresses right after a create)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.booting:
                    return
            time.sleep(0.02)
        raise TimeoutError(f"backing nodes still booting after {timeout:g}s: {sorted(self.booting)}")

    def state(self) -> dict[str, Any]:
        backend = _moto_backend(self.region)
        with self._lock:
            return {
                "instances": [
                    {"id": i.id, "state": i.state, "tags": _tags_of(i), "address": self.addresses.get(i.id)}
                    for i in backend.all_instances()
                ],
                "security_groups": [
                    g.name for g in backend.describe_security_groups() if g.name != "default"
                ],
                "key_pairs": list(backend.key_pairs),
                "backing_nodes": [n.name for n in self.nodes.values() if n.is_running()],
                "booting": sorted(self.booting),
            }

    # -- the middleware ----------------------------------------------------------------
    def _middleware(self, app: Callable[..., Any]) -> Callable[..., Any]:
        def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            raw = environ["wsgi.input"].read(length) if length else b""
            path = environ.get("PATH_INFO", "")
            if path.startswith("/_fake/"):
                return self._control(path.removeprefix("/_fake/"), raw, start_response)
            params = {k: v[-1] for k, v in parse_qs(raw.decode(errors="replace")).items()}
            action = params.get("Action", "")
            region_match = _REGION.search(environ.get("HTTP_AUTHORIZATION", ""))
            region = region_match.group(1) if region_match else self.region
            with self._lock:
                self.requests.append({"action": action, "params": params, "time": time.time()})
            if action == "GetConsoleOutput":
                return self._console_output(params.get("InstanceId", ""), start_response)
            token = params.get("ClientToken") if action == "RunInstances" else None
            with self._lock:
                earlier = self.client_tokens.get(token) if token else None
            if earlier is not None:  # EC2's idempotency: the same token, the same instances
                start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(earlier)))])
                return [earlier]
            refusal = self._refuse(action, params, region)
            if refusal is not None:
                return _error(start_response, *refusal)
            fault = self._fault_for(action, params, region)
            if fault is not None and fault.delay > 0:
                time.sleep(fault.delay)
                fault = None
            if fault is not None and not fault.after:
                return _error(start_response, fault.code, fault.message or f"injected {fault.code}")
            environ["wsgi.input"] = io.BytesIO(raw)
            captured: dict[str, Any] = {}

            def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                captured["status"], captured["headers"] = status, headers
                return lambda data: None

            body = b"".join(app(environ, capture))
            if captured.get("status", "").startswith("200"):
                body = self._after(action, params, region, body)
                if token:
                    with self._lock:
                        self.client_tokens[token] = body
            if fault is not None:
                return _error(start_response, fault.code, fault.message or f"injected {fault.code}")
            headers = [(k, v) for k, v in captured.get("headers", []) if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
            start_response(captured.get("status", "500 Internal Server Error"), headers)
            return [body]

        return middleware

    @staticmethod
    def _refuse(action: str, params: dict[str, str], region: str) -> tuple[str, str] | None:
        """(code, message) of what EC2 refuses and moto would do: attaching a volume that
        is in use, or to an instance in another availability zone."""
        if action != "AttachVolume":
            return None
        backend = _moto_backend(region)
        volume = backend.volumes.get(params.get("VolumeId", ""))
        if volume is None:
            return "InvalidVolume.NotFound", f"The volume '{params.get('VolumeId')}' does not exist."
        if volume.attachment is not None:
            return "VolumeInUse", f"{volume.id} is already attached to an instance"
        try:
            instance = backend.get_instance(params.get("InstanceId", ""))
        except Exception:  # noqa: BLE001 (moto's own error for an unknown instance follows)
            return None
        if instance.availability_zone != getattr(volume.zone, "name", volume.zone):
            message = f"The volume '{volume.id}' is not in the same availability zone as instance '{instance.id}'"
            return "InvalidVolume.ZoneMismatch", message
        return None

    def disk_dir(self, volume_id: str) -> Path:
        """Where the contents of EBS volume `volume_id` live: outside every node's directory."""
        return self.nodes_root / ".disks" / volume_id

    def _data_dir_for(self, instance_id: str, tags: dict[str, str], region: str) -> Path | None:
        """The data volume the instance is tagged with, once it is attached to it (the
        guest's startup script waits for the device likewise)."""
        volume_id = tags.get("fleet-data-volume")
        if not volume_id or not self.backing:
            return None
        backend = _moto_backend(region)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            volume = backend.volumes.get(volume_id)
            attachment = volume.attachment if volume is not None else None
            if attachment is not None and attachment.instance.id == instance_id:
                path = self.disk_dir(volume_id)
                path.mkdir(parents=True, exist_ok=True)
                return path
            time.sleep(0.02)
        return None

    def _fault_for(self, action: str, params: dict[str, str], region: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.action not in (action, "*"):
                    continue
                if fault.subnet and params.get("SubnetId") != fault.subnet:
                    continue
                if fault.zone and self._zone_of(params, region) != fault.zone:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _zone_of(params: dict[str, str], region: str) -> str | None:
        if "Placement.AvailabilityZone" in params:
            return params["Placement.AvailabilityZone"]
        if "SubnetId" in params:
            with contextlib.suppress(Exception):
                return str(_moto_backend(region).get_subnet(params["SubnetId"]).availability_zone)
        return None

    def _after(self, action: str, params: dict[str, str], region: str, body: bytes) -> bytes:
        if action == "RunInstances":
            for instance_id in _INSTANCE_ID.findall(body.decode()):
                self._back(instance_id, params, region)
        elif action in ("TerminateInstances", "StopInstances"):
            for key, value in params.items():
                if key.startswith("InstanceId."):
                    with self._lock:
                        node = self.nodes.pop(value, None) or self.stopped.pop(value, None)
                        self.booting.discard(value)
                        if node is not None and action == "StopInstances":
                            self.stopped[value] = node
                    if node is not None:
                        node.destroy() if action == "TerminateInstances" else node.kill(preempted=False)
        elif action == "StartInstances":
            for key, value in params.items():
                if key.startswith("InstanceId."):
                    self._boot_again(value, region)
        elif action == "DeleteVolume":
            shutil.rmtree(self.disk_dir(params.get("VolumeId", "none")), ignore_errors=True)
        if action in ("TerminateInstances", "StopInstances", "AuthorizeSecurityGroupIngress",
                      "RevokeSecurityGroupIngress", "DeleteSecurityGroup"):
            self.apply_policy(region)
        if action in ("RunInstances", "DescribeInstances"):
            body = self._show_pending(body)
        if action in ("RunInstances", "DescribeInstances", "DescribeNetworkInterfaces", "DescribeAddresses"):
            text = body.decode()
            with self._lock:
                mapping = dict(self.rewrite)
            text = _IPV4.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)
            text = _DNS.sub(lambda m: f"<{m.group(1)}></{m.group(1)}>", text)
            body = text.encode()
        return body

    def _allocate_address(self) -> str:
        with self._lock:
            while True:
                address = str(ipaddress.IPv4Address(self._next_address))
                self._next_address += 1
                if address.endswith((".0", ".255")):
                    continue
                if not self.backing or _port_free(address, self.ssh_port):
                    return address

    def _back(self, instance_id: str, params: dict[str, str], region: str) -> None:
        backend = _moto_backend(region)
        instance = backend.get_instance(instance_id)
        if self.isolated and self.backing:
            self._back_isolated(instance_id, instance, params, region)
            return
        address = self._allocate_address()
        with self._lock:
            self.addresses[instance_id] = address
            for moto_address in (instance.public_ip, instance.private_ip):
                if moto_address:
                    self.rewrite[moto_address] = address
        if not self.backing:
            return
        keys = []
        pair = backend.key_pairs.get(params.get("KeyName", ""))
        if pair is not None:
            material = pair.material_public
            keys.append(material.decode() if isinstance(material, bytes) else str(material))
        tags = _tags_of(instance)
        with self._lock:
            self.booting.add(instance_id)

        def boot() -> None:
            time.sleep(self.boot_delay)
            with self._lock:
                if instance_id not in self.booting:  # terminated while it booted
                    return
            node = LocalNode.create(
                self.nodes_root,
                name=tags.get("Name", instance_id),
                fleet=tags.get("fleet", "nofleet"),
                authorized_keys=keys,
                address=address,
                port=self.ssh_port,
                labels=tags,
                data_dir=self._data_dir_for(instance_id, tags, region),
            )
            self._adopt(instance_id, node)

        self._boot_in_background(instance_id, boot)

    def _back_isolated(self, instance_id: str, instance: Any, params: dict[str, str], region: str) -> None:
        import base64

        tags = _tags_of(instance)
        node = IsolatedNode.reserve(self.nodes_root, name=tags.get("Name", instance_id),
                                    fleet=tags.get("fleet", "nofleet"), user="", labels=tags)
        user_data = base64.b64decode(params.get("UserData", "")).decode() if params.get("UserData") else "exit 0\n"
        with self._lock:
            self.addresses[instance_id] = node.address
            for moto_address in (instance.public_ip, instance.private_ip):
                if moto_address:
                    self.rewrite[moto_address] = node.address
            self.booting.add(instance_id)
            self.pending_nodes[instance_id] = node

        def boot() -> None:
            time.sleep(self.boot_delay)
            with self._lock:
                if instance_id not in self.booting:
                    node.destroy()
                    return
            self.apply_policy(region)
            try:
                node.start(user_data, ssh_port=self.ssh_port, data_dir=self._data_dir_for(instance_id, tags, region))
            except (FleetError, OSError):  # the instance stays pending without an address, as a broken image would
                return
            self._adopt(instance_id, node)

        self._boot_in_background(instance_id, boot)

    def _boot_again(self, instance_id: str, region: str) -> None:
        """A stopped instance started: its node boots again in the background (pending
        until it has)."""
        instance = _moto_backend(region).get_instance(instance_id)
        with self._lock:
            node = self.stopped.pop(instance_id, None)
            if node is None:
                return
            # moto gives a started instance a new public address: it too stands for the node's.
            for moto_address in (instance.public_ip, instance.private_ip):
                if moto_address:
                    self.rewrite[moto_address] = self.addresses[instance_id]
            self.booting.add(instance_id)

        def boot() -> None:
            time.sleep(self.boot_delay)
            try:
                if isinstance(node, IsolatedNode):
                    with self._lock:
                        self.pending_nodes[instance_id] = node
                    self.apply_policy(region)
                    node.boot()
                else:
                    node.boot()
            except (FleetError, OSError):
                with self._lock:
                    self.pending_nodes.pop(instance_id, None)
                    self.stopped[instance_id] = node
                return
            self._adopt(instance_id, node)
            self.apply_policy(region)

        self._boot_in_background(instance_id, boot)

    def _adopt(self, instance_id: str, node: LocalNode) -> None:
        """A booted node backs its instance from now on, unless the instance was
        terminated while it booted: then the node goes."""
        with self._lock:
            self.pending_nodes.pop(instance_id, None)
            if instance_id in self.booting:
                self.booting.discard(instance_id)
                self.nodes[instance_id] = node
                return
        node.destroy()

    def _boot_in_background(self, instance_id: str, boot: Callable[[], None]) -> None:
        thread = threading.Thread(target=boot, name=f"boot-{instance_id}", daemon=True)
        self._boots.append(thread)
        thread.start()

    def apply_policy(self, region: str | None = None) -> None:
        """Enforce the security groups on each fleet's bridge (isolated backing only)."""
        if not self.isolated:
            return
        # Snapshot and write as one step: a stale snapshot written last would drop a node.
        with self._policy_lock:
            self._apply_policy_locked(region)

    def _apply_policy_locked(self, region: str | None) -> None:
        backend = _moto_backend(region or self.region)
        with self._lock:
            nodes = {**self.pending_nodes, **self.nodes}
        groups = {g.id: [r for r in g.ingress_rules] for g in backend.describe_security_groups()}
        by_fleet: dict[str, dict[str, tuple[str, list[str]]]] = {}
        instances = {i.id: i for i in backend.all_instances()}
        for instance_id, node in nodes.items():
            if instance_id not in instances:
                continue
            group_ids = [g.id for g in instances[instance_id].security_groups]
            by_fleet.setdefault(node.fleet, {})[instance_id] = (node.address, group_ids)
        for fleet, instances in by_fleet.items():
            network = FleetNetwork.of(self.nodes_root, fleet)
            if network.subnet() is None:
                continue
            caller = Caller(public=self.caller_address, bridge=network.host_address())
            network.apply_policy(render_tables(network, ec2_rules(instances, groups, caller)))

    def _show_pending(self, body: bytes) -> bytes:
        """Instances still booting: state pending (code 0), no public address."""
        with self._lock:
            booting = set(self.booting)
        if not booting or not any(i.encode() in body for i in booting):
            return body
        root = ElementTree.fromstring(body)
        namespace = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
        ElementTree.register_namespace("", namespace.strip("{}"))
        for item in root.iter(f"{namespace}item"):
            instance_id = item.findtext(f"{namespace}instanceId")
            if instance_id not in booting or item.find(f"{namespace}instanceState") is None:
                continue
            state = item.find(f"{namespace}instanceState")
            state.find(f"{namespace}code").text = "0"  # type: ignore[union-attr]
            state.find(f"{namespace}name").text = "pending"  # type: ignore[union-attr]
            for public in item.findall(f"{namespace}ipAddress"):
                item.remove(public)
            for interface in item.iter(f"{namespace}item"):
                for association in interface.findall(f"{namespace}association"):
                    interface.remove(association)
        return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)

    def vouch_false_host_key(self, name: str) -> None:
        """From now on, instance `name` (its Name tag) prints a host key on its console
        that its sshd does not have (what fleet sees when an impostor answers)."""
        with self._lock:
            self.false_host_keys.add(name)

    def _console_output(self, instance_id: str, start_response: Callable[..., Any]) -> Iterable[bytes]:
        """GetConsoleOutput: cloud-init's host key block once the backing node runs."""
        with self._lock:
            node = self.nodes.get(instance_id)
            lie = node is not None and node.name in self.false_host_keys
        text = "fake EC2 console\n"
        if node is not None and node.is_running():
            key = _random_host_key() if lie else node.host_key_line
            text += f"{CONSOLE_BEGIN}\n{key} root@{node.name}\n{CONSOLE_END}\n"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<GetConsoleOutputResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
            f"<requestId>{uuid.uuid4()}</requestId><instanceId>{instance_id}</instanceId>"
            f"<timestamp>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime())}</timestamp>"
            f"<output>{base64.b64encode(text.encode()).decode()}</output></GetConsoleOutputResponse>"
        ).encode()
        start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def _control(self, action: str, raw: bytes, start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            body = json.loads(raw) if raw else {}
            if action == "fault":
                self.add_fault(Fault(**body))
                result: Any = {"ok": True}
            elif action == "interrupt":
                result = {"instance_id": self.interrupt(body["instance"])}
            elif action == "false_host_key":
                self.vouch_false_host_key(body["name"])
                result = {"ok": True}
            elif action == "reset":
                self.clear_faults()
                result = {"ok": True}
            elif action == "requests":
                result = self.actions()
            elif action == "state":
                result = self.state()
            else:
                raise KeyError(f"unknown control action {action}")
            status = "200 OK"
        except (KeyError, TypeError, ValueError) as exc:
            result, status = {"error": str(exc)}, "400 Bad Request"
        data = json.dumps(result, default=str).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


def _fleets_under(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return [entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")]


def _error(start_response: Callable[..., Any], code: str, message: str) -> Iterable[bytes]:
    data = (
        f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()
    status = _STATUS.get(code, 400)
    start_response(f"{status} Error", [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
    return [data]


def main(argv: list[str] | None = None) -> int:
    parser = parser_for("fleet.testing.fake_ec2", __doc__.split("\n")[0], address_base="127.0.2.1")
    parser.add_argument("--region", default="us-east-1", help="region whose instances are backed")
    args = parse_loopback_args(parser, argv)
    fake = FakeEc2(**backing_options(args), region=args.region)
    return serve_until_signalled(fake, "fake EC2")


if __name__ == "__main__":
    raise SystemExit(main())
