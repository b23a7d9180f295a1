"""Google Compute Engine provider: Spot/preemptible GPU VMs through google-cloud-compute.

Every VM carries the fleet's labels (`fleet`, `fleet-role`, `fleet-slot`,
`fleet-generation`, plus `gcp.labels`), the fleet's network tag (opened to SSH by one
firewall rule), and metadata: `ssh-keys` with the fleet's public key and a
`startup-script` rendered from `templates/startup/`. Zones are tried in the spec's
order: a capacity error moves on to the next zone (and the zone is skipped for the
rest of the call), a quota error stops with the quota's name, a rate limit backs off.
Cloud errors become `fleet.errors` here (`classify`) and nowhere else.

The head's data disk (`head.data_disk_gb` > 0): a persistent disk `<fleet>-data`
labelled `fleet-role=data`, attached to the head with `auto_delete=false` as device
`fleet-data` (the startup script mounts it). `create` finds it by label (also when the
local state is gone) and puts the head in its zone, or makes it in the zone being tried;
`destroy_all` deletes it unless asked to keep it.

`list()` is one `aggregated_list` filtered by `labels.fleet` (one call per 500 VMs),
plus one zone-operations call per zone that holds a stopped Spot VM, to tell a
preemption (`compute.instances.preempted`) from a stop.

Credentials come from Application Default Credentials only. When `gcp.api_endpoint`
is set, the clients talk to it (plain `http://` allowed, for tests and private
endpoints); only if ADC finds nothing AND that endpoint is an `http://` URL on a
loopback address are anonymous credentials used (a local fake such as
`fleet.testing.fake_gce` needs none). Credentials never reach output, logs or state.
"""

from __future__ import annotations

import ipaddress
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from fleet.errors import (
    CapacityError,
    CredentialsError,
    FleetError,
    ProviderError,
    QuotaError,
    SpecError,
)
from fleet.model import (
    DATA_ROLE,
    LABEL_FLEET,
    LABEL_GENERATION,
    LABEL_ROLE,
    LABEL_SLOT,
    Node,
    NodeRequest,
    NodeState,
    Role,
    data_disk_name,
)
from fleet.providers.base import CleanupReport, CreateResult, PlannedNode, Provider, ProviderContext
from fleet.providers.gcp_errors import classify, classify_insert, operation_error
from fleet.providers.netaddr import AddressDetector, canonical_ranges, resolve_source_ranges
from fleet.providers.prices import estimate
from fleet.providers.retry import Sleep, with_backoff
from fleet.providers.startup import render_startup_script
from fleet.providers.vouched import poll_host_keys
from fleet.spec.models import GcpNodeOptions

_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
_PAGE = 500
_OP_TIMEOUT_S = 900.0
_WAIT_SLICE_S = 5.0  # one operation wait call: the cancel token is looked at between two
_STATE_MAP = {
    "PROVISIONING": NodeState.PENDING,
    "STAGING": NodeState.PENDING,
    "RUNNING": NodeState.RUNNING,
    "REPAIRING": NodeState.UNREACHABLE,
}
_STOPPED = {"STOPPING", "TERMINATED", "SUSPENDING", "SUSPENDED"}
DATA_DEVICE = "fleet-data"  # the data disk's device name: /dev/disk/by-id/google-fleet-data on the VM


def is_loopback_http(endpoint: str | None) -> bool:
    if not endpoint:
        return False
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def resolve_credentials(endpoint: str | None) -> Any:
    """ADC credentials; anonymous ones only for a loopback http:// endpoint without ADC."""
    import google.auth
    import google.auth.exceptions
    from google.auth.credentials import AnonymousCredentials

    try:
        credentials, _project = google.auth.default(scopes=_SCOPES)
        return credentials
    except google.auth.exceptions.DefaultCredentialsError:
        if is_loopback_http(endpoint):
            return AnonymousCredentials()
        raise CredentialsError(
            "no Google Cloud credentials found (Application Default Credentials)",
            hint="run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
            "to a service account key file",
        ) from None


class _Bounded:
    """A compute_v1 client whose calls wait `timeout` seconds at most for an answer and
    do not retry on their own (the client's default retries 503s for up to 600 s, with
    real sleeps): `with_backoff` retries instead, within its budget."""

    def __init__(self, client: Any, timeout: float) -> None:
        self._inner = client
        self._timeout = timeout

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("retry", None)
            kwargs.setdefault("timeout", self._timeout)
            return attribute(*args, **kwargs)

        return call


class GcpProvider(Provider):
    name = "gcp"

    def __init__(
        self,
        context: ProviderContext,
        *,
        detect_address: AddressDetector | None = None,
        sleep: Sleep = time.sleep,
        max_parallel: int = 16,
    ) -> None:
        super().__init__(context)
        if self.spec.gcp is None:
            raise SpecError("provider 'gcp' needs a `gcp:` block", field="gcp")
        self.gcp = self.spec.gcp
        self.fleet = self.spec.name
        self.network_tag = f"fleet-{self.fleet}"
        self.firewall_name = f"fleet-{self.fleet}-ssh"
        self.internal_firewall_name = f"fleet-{self.fleet}-internal"
        self._detect_address = detect_address
        self._sleep = sleep
        self._max_parallel = max_parallel
        self._clients: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._zone_of: dict[str, str] = {}

    # -- plumbing ----------------------------------------------------------------------
    def _client(self, kind: str) -> Any:
        with self._lock:
            if self._clients is None:
                from google.cloud import compute_v1

                credentials = resolve_credentials(self.gcp.api_endpoint)
                options = {"api_endpoint": self.gcp.api_endpoint} if self.gcp.api_endpoint else None
                make: dict[str, Callable[..., Any]] = {
                    "instances": compute_v1.InstancesClient,
                    "zone_ops": compute_v1.ZoneOperationsClient,
                    "global_ops": compute_v1.GlobalOperationsClient,
                    "firewalls": compute_v1.FirewallsClient,
                    "disks": compute_v1.DisksClient,
                }
                self._clients = {
                    name: _Bounded(cls(credentials=credentials, client_options=options, transport="rest"),
                                   self.gcp.api_timeout)
                    for name, cls in make.items()
                }
            return self._clients[kind]

    def _call(self, call: Callable[[], Any], classify: Callable[[BaseException], Any] = classify) -> Any:
        return with_backoff(call, classify=classify, sleep=self._sleep, cancel=self.context.cancel)

    def _wait_zone_op(self, zone: str, operation: Any) -> None:
        self._wait(
            operation,
            lambda name, timeout: self._client("zone_ops").wait(
                project=self.gcp.project, zone=zone, operation=name, timeout=timeout),
            zone,
        )

    def _wait_global_op(self, operation: Any) -> None:
        self._wait(
            operation,
            lambda name, timeout: self._client("global_ops").wait(
                project=self.gcp.project, operation=name, timeout=timeout),
            None,
        )

    def _wait(self, operation: Any, wait: Callable[[str, float], Any], zone: str | None) -> None:
        """Until the operation is DONE, in waits of `_WAIT_SLICE_S` (the server's wait
        returns when it is done; a slice that ends first is no error), so that the
        context's cancel token and the deadline are looked at every few seconds."""
        import requests

        def one_slice(name: str) -> Any:
            try:
                return wait(name, _WAIT_SLICE_S)
            except requests.exceptions.ReadTimeout:
                return None

        deadline = time.monotonic() + _OP_TIMEOUT_S
        cancel = self.context.cancel
        while getattr(operation.status, "name", str(operation.status)) != "DONE":
            if cancel is not None and cancel.is_set():
                raise ProviderError(f"stopped waiting for operation {operation.name}: fleet is stopping")
            if time.monotonic() > deadline:
                raise ProviderError(f"operation {operation.name} did not finish in {_OP_TIMEOUT_S:.0f} s")
            polled = self._call(lambda name=operation.name: one_slice(name))
            operation = operation if polled is None else polled
        failure = operation_error(operation, zone=zone)
        if failure is not None:
            raise failure

    def check(self) -> None:
        resolve_credentials(self.gcp.api_endpoint)

    def _options(self, role: Role) -> GcpNodeOptions:
        return self.spec.head.gcp if role is Role.HEAD else self.spec.workers.gcp

    @staticmethod
    def _machine(request: NodeRequest) -> str:
        if request.machine:
            return request.machine
        return "n1-standard-4" if request.accelerators else "e2-standard-4"

    def labels(self, request: NodeRequest) -> dict[str, str]:
        return {
            **self.gcp.labels,
            LABEL_FLEET: self.fleet,
            LABEL_ROLE: request.role.value,
            LABEL_SLOT: str(request.slot),
            LABEL_GENERATION: str(request.generation),
        }

    # -- plan / prepare ----------------------------------------------------------------
    def plan(self, requests: Sequence[NodeRequest]) -> list[PlannedNode]:
        planned = []
        for request in requests:
            gpu = request.accelerators
            price = estimate(
                "gcp",
                self._machine(request),
                spot=request.spot,
                accelerator=gpu.type if gpu else None,
                accelerator_count=gpu.count if gpu else 0,
            )
            planned.append(
                PlannedNode(
                    name=request.name,
                    role=request.role.value,
                    zone=" > ".join(request.zones or self.gcp.zones),
                    machine=self._machine(request),
                    accelerators=f"{gpu.count}x {gpu.type}" if gpu else None,
                    spot=request.spot,
                    price_per_hour=price.per_hour,
                    price_source=price.source,
                )
            )
        return planned

    def intra_fleet_rule(self) -> str:
        return (f"firewall rule {self.internal_firewall_name} must admit tcp from tag {self.network_tag} "
                f"to tag {self.network_tag} (which `fleet up` adds; a network without allow-internal has none)")

    def prepare(self) -> list[str]:
        """The firewall rules: tcp:<ssh.port> to the fleet's tag from source_ranges, and
        tcp from the fleet's tag to the fleet's tag (the workers' mounts of the head)."""
        return self._prepare_ssh_rule() + self._prepare_internal_rule()

    def _prepare_internal_rule(self) -> list[str]:
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1

        client = self._client("firewalls")
        try:
            self._call(lambda: client.get(project=self.gcp.project, firewall=self.internal_firewall_name))
            return []
        except ProviderError as exc:
            if not isinstance(exc.__cause__, gexc.NotFound):
                raise
        rule = compute_v1.Firewall(
            name=self.internal_firewall_name,
            network=self.gcp.network,
            direction="INGRESS",
            source_tags=[self.network_tag],
            target_tags=[self.network_tag],
            allowed=[compute_v1.Allowed(I_p_protocol="tcp")],
            description=f"the nodes of fleet {self.fleet} reach each other (created by fleet)",
        )
        operation = self._call(lambda: client.insert_unary(project=self.gcp.project, firewall_resource=rule))
        self._wait_global_op(operation)
        return [f"firewall rule {self.internal_firewall_name} (tcp from {self.network_tag} to {self.network_tag})"]

    def _prepare_ssh_rule(self) -> list[str]:
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1

        ranges = resolve_source_ranges(
            self.gcp.source_ranges, self._detect_address, field="gcp.source_ranges"
        )
        client = self._client("firewalls")
        try:
            existing = self._call(lambda: client.get(project=self.gcp.project, firewall=self.firewall_name))
        except ProviderError as exc:
            if not isinstance(exc.__cause__, gexc.NotFound):
                raise
        else:
            if canonical_ranges(existing.source_ranges) == set(ranges):
                return []
            # The caller's address changed since the rule was made: follow it, so that SSH
            # stays open to the caller only (and the caller is not locked out).
            patch = compute_v1.Firewall(source_ranges=ranges)
            operation = self._call(
                lambda: client.patch_unary(
                    project=self.gcp.project, firewall=self.firewall_name, firewall_resource=patch
                )
            )
            self._wait_global_op(operation)
            was = ", ".join(existing.source_ranges)
            return [f"firewall rule {self.firewall_name} now admits {', '.join(ranges)} only (was {was})"]
        rule = compute_v1.Firewall(
            name=self.firewall_name,
            network=self.gcp.network,
            direction="INGRESS",
            target_tags=[self.network_tag],
            source_ranges=ranges,
            allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=[str(self.spec.ssh.port)])],
            description=f"SSH to the nodes of fleet {self.fleet} (created by fleet)",
        )
        operation = self._call(lambda: client.insert_unary(project=self.gcp.project, firewall_resource=rule))
        self._wait_global_op(operation)
        return [f"firewall rule {self.firewall_name} (tcp:{self.spec.ssh.port} from {', '.join(ranges)})"]

    # -- create ------------------------------------------------------------------------
    def wants_data_disk(self, request: NodeRequest) -> bool:
        return request.role is Role.HEAD and self.spec.head.data_disk_gb > 0

    def instance_body(self, request: NodeRequest, zone: str, data_disk: str | None = None) -> Any:
        """The instance to insert; `data_disk` is the self link of the data disk to attach."""
        from google.cloud import compute_v1

        options = self._options(request.role)
        labels = self.labels(request)
        script = render_startup_script(
            provider="gcp",
            fleet_name=self.fleet,
            node=request.name,
            role=request.role.value,
            user=self.context.ssh_user,
            public_key=self.context.public_key,
            ssh_port=self.spec.ssh.port,
            data_disk=data_disk is not None,
            data_devices=[f"/dev/disk/by-id/google-{DATA_DEVICE}"],
        )
        scheduling = compute_v1.Scheduling()
        if request.spot:
            if options.provisioning_model == "SPOT":
                scheduling.provisioning_model = "SPOT"
            else:
                scheduling.preemptible = True
            scheduling.instance_termination_action = options.instance_termination_action
            scheduling.automatic_restart = False
            scheduling.on_host_maintenance = "TERMINATE"
        if request.accelerators:
            scheduling.on_host_maintenance = "TERMINATE"
            scheduling.automatic_restart = False
        if options.max_run_duration_s:
            scheduling.max_run_duration = compute_v1.Duration(seconds=options.max_run_duration_s)
            scheduling.instance_termination_action = options.instance_termination_action
        interface = compute_v1.NetworkInterface(network=self.gcp.network)
        if self.gcp.subnetwork:
            interface.subnetwork = self.gcp.subnetwork
        if not self.gcp.use_private_ip:
            interface.access_configs = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
        instance = compute_v1.Instance(
            name=request.name,
            machine_type=f"zones/{zone}/machineTypes/{self._machine(request)}",
            labels=labels,
            tags=compute_v1.Tags(items=[self.network_tag]),
            scheduling=scheduling,
            network_interfaces=[interface],
            disks=[
                compute_v1.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=self.gcp.image, disk_size_gb=request.disk_gb or 100, labels=labels
                    ),
                ),
                *([compute_v1.AttachedDisk(boot=False, auto_delete=False, source=data_disk, device_name=DATA_DEVICE,
                                           mode="READ_WRITE")] if data_disk else []),
            ],
            metadata=compute_v1.Metadata(
                items=[
                    compute_v1.Items(
                        key="ssh-keys", value=f"{self.context.ssh_user}:{self.context.public_key.strip()}"
                    ),
                    compute_v1.Items(key="startup-script", value=script),
                    # The guest agent publishes the host keys there: how fleet learns them.
                    compute_v1.Items(key="enable-guest-attributes", value="TRUE"),
                ]
            ),
        )
        if request.accelerators:
            instance.guest_accelerators = [
                compute_v1.AcceleratorConfig(
                    accelerator_count=request.accelerators.count,
                    accelerator_type=f"zones/{zone}/acceleratorTypes/{request.accelerators.type}",
                )
            ]
        if options.min_cpu_platform:
            instance.min_cpu_platform = options.min_cpu_platform
        if self.gcp.service_account:
            instance.service_accounts = [
                compute_v1.ServiceAccount(email=self.gcp.service_account, scopes=_SCOPES)
            ]
        return instance

    def create(self, requests: Sequence[NodeRequest]) -> list[CreateResult]:
        exhausted: set[str] = set()  # zones that ran out of capacity during this call
        stop: list[QuotaError] = []  # a quota error ends the whole call

        def one(request: NodeRequest) -> CreateResult:
            ran_out: list[str] = []
            try:
                node = self._create_one(request, exhausted, stop, ran_out)
            except FleetError as exc:
                return CreateResult(request, error=exc, stockouts=tuple(ran_out))
            return CreateResult(request, node=node, stockouts=tuple(ran_out))

        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self._max_parallel, len(requests))) as pool:
            return list(pool.map(one, requests))

    # -- the head's data disk ----------------------------------------------------------
    def data_disks(self) -> list[tuple[str, Any]]:
        """(zone, disk) of every data disk of this fleet, found by label in any zone."""
        from google.cloud import compute_v1

        request = compute_v1.AggregatedListDisksRequest(
            project=self.gcp.project,
            filter=f'labels.{LABEL_FLEET} = "{self.fleet}" AND labels.{LABEL_ROLE} = "{DATA_ROLE}"',
            max_results=_PAGE,
        )
        return self._call(lambda: [
            (scope.rsplit("/", 1)[-1], disk)
            for scope, scoped in self._client("disks").aggregated_list(request=request)
            for disk in scoped.disks
        ])

    def _insert_data_disk(self, zone: str) -> Any:
        from google.cloud import compute_v1

        disk = compute_v1.Disk(
            name=data_disk_name(self.fleet), size_gb=self.spec.head.data_disk_gb,
            type_=f"zones/{zone}/diskTypes/pd-balanced",
            labels={**self.gcp.labels, LABEL_FLEET: self.fleet, LABEL_ROLE: DATA_ROLE},
        )
        client = self._client("disks")
        operation = self._call(lambda: client.insert_unary(project=self.gcp.project, zone=zone, disk_resource=disk))
        self._wait_zone_op(zone, operation)
        return self._call(lambda: client.get(project=self.gcp.project, zone=zone, disk=disk.name))

    def _delete_disk(self, zone: str, name: str) -> None:
        operation = self._call(lambda: self._client("disks").delete_unary(project=self.gcp.project, zone=zone, disk=name))
        self._wait_zone_op(zone, operation)

    def _zones_for_request(self, request: NodeRequest) -> tuple[list[str], Any]:
        """The zones to try and the data disk the head must attach (None: made per zone)."""
        zones = list(request.zones or self.gcp.zones)
        if not self.wants_data_disk(request):
            return zones, None
        found = self.data_disks()
        if not found:
            return zones, None
        zone, disk = found[0]
        if disk.users:
            raise ProviderError(
                f"the head's data disk {disk.name} ({zone}) is still attached to {_last(disk.users[0])}",
                hint="that instance must be deleted (or started again) before a new head can attach the disk",
            )
        # The data lives there: a replacement head goes to the disk's zone, listed or not.
        return [zone], disk

    def _create_one(self, request: NodeRequest, exhausted: set[str], stop: list[QuotaError],
                    ran_out: list[str]) -> Node:
        client = self._client("instances")
        last: CapacityError | None = None
        zones, data_disk = self._zones_for_request(request)
        for zone in zones:
            if stop:
                raise stop[0]
            if zone in exhausted:
                continue
            new_disk = None
            if self.wants_data_disk(request) and data_disk is None:
                new_disk = self._insert_data_disk(zone)
            disk = data_disk or new_disk
            body = self.instance_body(request, zone, data_disk=disk.self_link if disk is not None else None)
            request_id = str(uuid.uuid4())
            try:
                operation = self._call(
                    # A request id per attempt: a retried insert is the same insert.
                    lambda: client.insert_unary(request=insert_request(self.gcp.project, zone, body, request_id)),  # noqa: B023
                    classify_insert,
                )
                self._wait_zone_op(zone, operation)
            except CapacityError as exc:
                exhausted.add(zone)
                ran_out.append(zone)
                last = exc
                if new_disk is not None:  # blank, made for this zone: the next zone gets its own
                    self._delete_disk(zone, new_disk.name)
                continue
            except QuotaError as exc:
                stop.append(exc)
                if new_disk is not None:
                    self._delete_disk(zone, new_disk.name)
                raise
            self._zone_of[request.name] = zone
            created = self._call(
                lambda: client.get(project=self.gcp.project, zone=zone, instance=request.name)  # noqa: B023
            )
            return self.to_node(created, zone)
        raise CapacityError(
            f"no capacity for {request.name} in any zone ({', '.join(zones)})"
            + (" (the zone of the head's data disk)" if data_disk is not None else "")
            + (f": {last.message}" if last else ""),
            hint="add zones to gcp.zones, choose another machine/GPU type, or retry later",
        )

    # -- list --------------------------------------------------------------------------
    def to_node(
        self, instance: Any, zone: str | None = None, preempted_links: set[str] | None = None
    ) -> Node:
        labels = dict(instance.labels)
        scheduling = instance.scheduling
        spot = scheduling.provisioning_model == "SPOT" or bool(scheduling.preemptible)
        status = instance.status
        reason = None
        if status in _STOPPED:
            if spot:
                state = NodeState.PREEMPTED
                confirmed = preempted_links is not None and instance.self_link in preempted_links
                reason = "compute.instances.preempted" if confirmed else f"spot VM {status}"
            else:
                state, reason = NodeState.TERMINATED, status
        else:
            state = _STATE_MAP.get(status, NodeState.PENDING)
        interface = instance.network_interfaces[0] if instance.network_interfaces else None
        internal = interface.network_i_p if interface and interface.network_i_p else None
        nat = next((c.nat_i_p for c in (interface.access_configs if interface else []) if c.nat_i_p), None)
        address = internal if self.gcp.use_private_ip else nat
        try:
            created = datetime.fromisoformat(instance.creation_timestamp).timestamp()
        except (TypeError, ValueError):
            created = None
        return Node(
            name=instance.name,
            fleet=labels.get(LABEL_FLEET, self.fleet),
            role=Role.HEAD if labels.get(LABEL_ROLE) == Role.HEAD.value else Role.WORKER,
            state=state,
            slot=int(labels.get(LABEL_SLOT, "0") or 0),
            generation=int(labels.get(LABEL_GENERATION, "1") or 1),
            address=address,
            internal_address=internal,
            port=self.spec.ssh.port,
            zone=zone or instance.zone.rsplit("/", 1)[-1],
            spot=spot,
            machine=instance.machine_type.rsplit("/", 1)[-1] if instance.machine_type else None,
            provider_id=instance.self_link or str(instance.id),
            reason=reason,
            created_at=created,
            labels=labels,
        )

    def _list_instances(self) -> list[tuple[str, Any]]:
        from google.cloud import compute_v1

        def fetch() -> list[tuple[str, Any]]:
            request = compute_v1.AggregatedListInstancesRequest(
                project=self.gcp.project, filter=f'labels.{LABEL_FLEET} = "{self.fleet}"', max_results=_PAGE
            )
            found = []
            for scope, scoped in self._client("instances").aggregated_list(request=request):
                zone = scope.rsplit("/", 1)[-1]
                found.extend((zone, instance) for instance in scoped.instances)
            return found

        return self._call(fetch)

    def _preempted_links(self, zones: Iterable[str]) -> set[str]:
        from google.cloud import compute_v1

        links: set[str] = set()
        for zone in sorted(set(zones)):
            request = compute_v1.ListZoneOperationsRequest(
                project=self.gcp.project, zone=zone, filter='operationType = "compute.instances.preempted"'
            )
            operations = self._call(
                lambda request=request: list(self._client("zone_ops").list(request=request))
            )
            links.update(op.target_link for op in operations)
        return links

    def list(self) -> list[Node]:
        found = self._list_instances()
        stopped_spot_zones = [
            zone
            for zone, i in found
            if i.status in _STOPPED
            and (i.scheduling.provisioning_model == "SPOT" or i.scheduling.preemptible)
        ]
        links = self._preempted_links(stopped_spot_zones) if stopped_spot_zones else set()
        nodes = [self.to_node(instance, zone, links) for zone, instance in found]
        for node in nodes:
            if node.zone:
                self._zone_of[node.name] = node.zone
        return nodes

    def vouched_host_keys(self, nodes: Sequence[Node], *, timeout: float) -> dict[str, str]:
        """Each node's host key from its guest attributes `hostkeys/` (see fleet.providers.vouched)."""
        client = self._client("instances")
        zones = self._zones_for([n.name for n in nodes])

        def fetch(node: Node) -> list[str]:
            zone = node.zone or zones.get(node.name)
            if zone is None:
                return []
            # Not published yet is a 404: poll_host_keys asks again.
            attributes = self._call(lambda: client.get_guest_attributes(request=guest_attributes_request(
                self.gcp.project, zone, node.name, "hostkeys/")))
            items = attributes.query_value.items if attributes.query_value else []
            return [item.value if " " in item.value else f"{item.key} {item.value}"
                    for item in items if item.namespace == "hostkeys"]

        return poll_host_keys(nodes, fetch, timeout=timeout)

    # -- delete / preempt / destroy ----------------------------------------------------
    def _zones_for(self, names: Sequence[str]) -> dict[str, str]:
        if any(name not in self._zone_of for name in names):
            self.list()
        return {name: self._zone_of[name] for name in names if name in self._zone_of}

    def _delete_in(self, name: str, zone: str) -> str | None:
        from google.api_core import exceptions as gexc

        client = self._client("instances")
        try:
            operation = self._call(
                lambda: client.delete_unary(project=self.gcp.project, zone=zone, instance=name)
            )
            self._wait_zone_op(zone, operation)
        except ProviderError as exc:
            if isinstance(exc.__cause__, gexc.NotFound) or "was not found" in exc.message:
                return None
            raise
        self._zone_of.pop(name, None)
        return f"instance {name} ({zone})"

    def delete(self, names: Sequence[str]) -> list[str]:
        zones = self._zones_for(names)
        if not zones:
            return []
        with ThreadPoolExecutor(max_workers=min(self._max_parallel, len(zones))) as pool:
            done = list(pool.map(lambda item: self._delete_in(*item), zones.items()))
        return [line for line in done if line]

    def _start_stop(self, names: Sequence[str], verb: str) -> list[str]:
        """instances.start / instances.stop of each named instance, in parallel."""
        wanted = {"start": _STOPPED, "stop": {"RUNNING", "PROVISIONING", "STAGING"}}[verb]
        found = {i.name: (zone, i) for zone, i in self._list_instances() if i.name in set(names)}
        client = self._client("instances")

        def one(item: tuple[str, tuple[str, Any]]) -> str | None:
            name, (zone, instance) = item
            if instance.status not in wanted:
                return None
            call = client.start_unary if verb == "start" else client.stop_unary
            operation = self._call(lambda: call(project=self.gcp.project, zone=zone, instance=name))
            self._wait_zone_op(zone, operation)
            return name

        if not found:
            return []
        with ThreadPoolExecutor(max_workers=min(self._max_parallel, len(found))) as pool:
            return [name for name in pool.map(one, found.items()) if name]

    def start(self, names: Sequence[str]) -> list[str]:
        return self._start_stop(names, "start")

    def stop(self, names: Sequence[str]) -> list[str]:
        return self._start_stop(names, "stop")

    def preempt(self, name: str, *, notice_s: float = 0.0) -> None:
        """Stop (termination action STOP) or delete (DELETE) the VM through the API, as a
        preemption would. The guest gets GCE's ACPI soft-off either way; `notice_s` is not
        used (the API has no way to send the 30 s notice alone)."""
        from fleet.errors import UsageError

        zone = self._zones_for([name]).get(name)
        if zone is None:
            raise UsageError(f"no node {name} in fleet {self.fleet}")
        node = next(n for n in self.list() if n.name == name)
        options = self._options(node.role)
        client = self._client("instances")
        if node.spot and options.instance_termination_action == "DELETE":
            self._delete_in(name, zone)
            return
        operation = self._call(lambda: client.stop_unary(project=self.gcp.project, zone=zone, instance=name))
        self._wait_zone_op(zone, operation)

    def destroy_all(self, keep_data: bool = False) -> CleanupReport:
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1

        report = CleanupReport()
        try:
            nodes = self.list()
            report.deleted.extend(self.delete([n.name for n in nodes]))
        except FleetError as exc:
            report.errors.append(f"instances: {exc.message}")
        try:
            request = compute_v1.AggregatedListDisksRequest(
                project=self.gcp.project, filter=f'labels.{LABEL_FLEET} = "{self.fleet}"', max_results=_PAGE
            )
            disks = self._call(
                lambda: [
                    (scope.rsplit("/", 1)[-1], d)
                    for scope, scoped in self._client("disks").aggregated_list(request=request)
                    for d in scoped.disks
                ]
            )
            for zone, disk in disks:
                if keep_data and disk.labels.get(LABEL_ROLE) == DATA_ROLE:
                    report.kept.append(f"disk {disk.name} ({zone}, {disk.size_gb} GB, the head's data disk)")
                    report.kept_hint = (f"gcloud compute disks delete {disk.name} --zone {zone} "
                                        f"--project {self.gcp.project}")
                    continue
                if disk.users:
                    report.errors.append(f"disk {disk.name} ({zone}) is still attached to {disk.users[0]}")
                    continue
                operation = self._call(
                    lambda zone=zone, disk=disk: self._client("disks").delete_unary(
                        project=self.gcp.project, zone=zone, disk=disk.name
                    )
                )
                self._wait_zone_op(zone, operation)
                report.deleted.append(f"disk {disk.name} ({zone})")
        except FleetError as exc:
            report.errors.append(f"disks: {exc.message}")
        for firewall in (self.firewall_name, self.internal_firewall_name):
            try:
                operation = self._call(
                    lambda firewall=firewall: self._client("firewalls").delete_unary(
                        project=self.gcp.project, firewall=firewall
                    )
                )
                self._wait_global_op(operation)
                report.deleted.append(f"firewall rule {firewall}")
            except ProviderError as exc:
                if not isinstance(exc.__cause__, gexc.NotFound):
                    report.errors.append(f"firewall rule {firewall}: {exc.message}")
        return report

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, None
        for client in (clients or {}).values():
            transport = getattr(client, "transport", None)
            if transport is not None and hasattr(transport, "close"):
                transport.close()


def _last(link: str) -> str:
    return link.rstrip("/").rsplit("/", 1)[-1]


def insert_request(project: str, zone: str, body: Any, request_id: str) -> Any:
    """An InsertInstanceRequest carrying a request id (the server dedupes on it)."""
    from google.cloud import compute_v1

    return compute_v1.InsertInstanceRequest(project=project, zone=zone, instance_resource=body, request_id=request_id)


def guest_attributes_request(project: str, zone: str, instance: str, query_path: str) -> Any:
    from google.cloud import compute_v1

    return compute_v1.GetGuestAttributesInstanceRequest(
        project=project, zone=zone, instance=instance, query_path=query_path
    )
