"""AWS EC2 provider: spot GPU instances through boto3.

Workers are one-time spot instances (`InstanceMarketOptions`, interruption: terminate,
optional `MaxPrice`); the head is on-demand by default. Instances and their volumes are
tagged (`fleet`, `fleet-role`, `fleet-slot`, `fleet-generation`, `Name`, plus
`aws.tags`); the fleet's public key is imported as key pair `fleet-<name>`; security
group `fleet-<name>-ssh` opens the SSH port to `source_ranges` only. Subnets (or zones)
are tried in order; capacity errors move on, limit errors stop, throttling backs off.
EC2 error codes become `fleet.errors` here (`classify`) and nowhere else.

Credentials come from boto3's default chain (environment, shared files, `aws.profile`,
SSO, roles). The endpoint is boto3's own business: `AWS_ENDPOINT_URL` (e.g. a moto
server on loopback, `fleet.testing.fake_ec2`) needs no code here.

The head's data disk (`head.data_disk_gb` > 0): an EBS volume tagged `fleet-role=data`
(Name `<fleet>-data`), attached as /dev/sdf after the head's RunInstances (attached
volumes are never DeleteOnTermination), named in the head's `fleet-data-volume` tag and
mounted by its startup script. `create` finds it by tag (also without local state) and
puts the head in its availability zone, or makes it in the zone being tried;
`destroy_all` deletes it unless asked to keep it.

A terminated instance stays visible in EC2 for a while: `delete()` tags an instance
`fleet-deleted` before terminating it, so that `list()` can tell "deleted by fleet"
(left out) from "gone without fleet asking" (a spot instance: PREEMPTED).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from fleet.errors import (
    CapacityError,
    CredentialsError,
    FleetError,
    ProviderError,
    QuotaError,
    SpecError,
    UsageError,
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
from fleet.providers.aws_errors import classify
from fleet.providers.base import CleanupReport, CreateResult, PlannedNode, Provider, ProviderContext
from fleet.providers.netaddr import AddressDetector, canonical_ranges, resolve_source_ranges
from fleet.providers.prices import estimate
from fleet.providers.retry import Sleep, with_backoff
from fleet.providers.startup import render_startup_script
from fleet.providers.vouched import console_host_keys, poll_host_keys

DELETED_TAG = "fleet-deleted"
DATA_VOLUME_TAG = "fleet-data-volume"  # on the head: the id of the data volume it attaches
DATA_DEVICE = "/dev/sdf"  # where the data volume is attached (Nitro: an NVMe device named by its id)
_VOLUME_WAIT_S = 300.0
API_ATTEMPTS = 3  # botocore's attempts per call (standard mode), before our own backoff
API_CONNECT_TIMEOUT_S = 10.0
SPOT_TERMINATION = "Server.SpotInstanceTermination"
_STATE_MAP = {"pending": NodeState.PENDING, "running": NodeState.RUNNING}
_GONE = {"shutting-down", "terminated", "stopping", "stopped"}
_CREDENTIAL_HINT = (
    "run `aws configure` or `aws sso login`, set `aws.profile` / AWS_PROFILE, "
    "or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
)


class AwsProvider(Provider):
    name = "aws"

    def __init__(
        self,
        context: ProviderContext,
        *,
        detect_address: AddressDetector | None = None,
        sleep: Sleep = time.sleep,
        max_parallel: int = 8,
        live_prices: bool = True,
    ) -> None:
        super().__init__(context)
        if self.spec.aws is None:
            raise SpecError("provider 'aws' needs an `aws:` block", field="aws")
        self.aws = self.spec.aws
        self.fleet = self.spec.name
        self.key_name = f"fleet-{self.fleet}"
        self.group_name = f"fleet-{self.fleet}-ssh"
        self._detect_address = detect_address
        self._sleep = sleep
        self._max_parallel = max_parallel
        self._live_prices = live_prices
        self._lock = threading.Lock()
        self._ec2: Any = None
        self._session: Any = None
        self._group_id: str | None = None
        self._root_device: str | None = None

    # -- plumbing ----------------------------------------------------------------------
    def _boto_session(self) -> Any:
        import boto3
        import botocore.exceptions

        if self._session is None:
            try:
                self._session = boto3.Session(profile_name=self.aws.profile, region_name=self.aws.region)
            except botocore.exceptions.ProfileNotFound:
                raise CredentialsError(
                    f"AWS profile {self.aws.profile!r} is not configured", hint=_CREDENTIAL_HINT
                ) from None
        return self._session

    def check(self) -> None:
        import botocore.exceptions

        try:
            credentials = self._boto_session().get_credentials()
        except botocore.exceptions.BotoCoreError as exc:
            raise CredentialsError(
                f"AWS credentials could not be loaded ({type(exc).__name__})", hint=_CREDENTIAL_HINT
            ) from None
        if credentials is None:
            raise CredentialsError("no AWS credentials found in the default chain", hint=_CREDENTIAL_HINT)

    @property
    def ec2(self) -> Any:
        with self._lock:
            if self._ec2 is None:
                from botocore.config import Config

                self.check()
                # botocore's standard mode retries transient faults (5xx, throttling, read
                # timeouts, resets) a few times with jitter and a retry quota; what still
                # fails goes through our own backoff (`_call`), then up as a clear error.
                config = Config(
                    retries={"total_max_attempts": API_ATTEMPTS, "mode": "standard"},
                    connect_timeout=API_CONNECT_TIMEOUT_S,
                    read_timeout=self.aws.api_timeout,
                    max_pool_connections=max(10, self._max_parallel * 2),
                )
                self._ec2 = self._boto_session().client("ec2", config=config)
            return self._ec2

    def _call(self, method: str, **params: Any) -> Any:
        function: Callable[..., Any] = getattr(self.ec2, method)
        return with_backoff(lambda: function(**params), classify=classify, sleep=self._sleep,
                            cancel=self.context.cancel)

    def _tags(self, extra: dict[str, str]) -> list[dict[str, str]]:
        return [
            {"Key": k, "Value": v} for k, v in {**self.aws.tags, LABEL_FLEET: self.fleet, **extra}.items()
        ]

    def _fleet_filter(self) -> list[dict[str, Any]]:
        return [{"Name": f"tag:{LABEL_FLEET}", "Values": [self.fleet]}]

    @staticmethod
    def _instance_type(request: NodeRequest) -> str:
        if request.machine:
            return request.machine
        return "g4dn.xlarge" if request.accelerators else "m5.large"

    def _placements(self, request: NodeRequest | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(where, placement) in the order tried: the spec's subnets, else its zones, else
        the region; only the request's `zones`, in their order, when it names some."""
        if self.aws.subnets:
            found = [(subnet, {"SubnetId": subnet}) for subnet in self.aws.subnets]
        elif self.aws.zones:
            found = [(zone, {"Placement": {"AvailabilityZone": zone}}) for zone in self.aws.zones]
        else:
            return [(self.aws.region, {})]
        if request is None or not request.zones:
            return found
        by_where = dict(found)
        return [(where, by_where[where]) for where in request.zones if where in by_where] or found

    # -- plan / prepare ----------------------------------------------------------------
    def _live_spot_price(self, instance_type: str) -> float | None:
        """Latest spot price from `describe_spot_price_history` (read-only), or None."""
        params: dict[str, Any] = {
            "InstanceTypes": [instance_type],
            "ProductDescriptions": ["Linux/UNIX"],
            "StartTime": datetime.now(UTC),
            "MaxResults": 10,
        }
        if self.aws.zones:
            params["AvailabilityZone"] = self.aws.zones[0]
        try:
            history = self._call("describe_spot_price_history", **params).get("SpotPriceHistory", [])
        except FleetError:
            return None
        prices = [float(entry["SpotPrice"]) for entry in history if entry.get("SpotPrice")]
        return min(prices) if prices else None

    def plan(self, requests: Sequence[NodeRequest]) -> list[PlannedNode]:
        live: dict[str, float | None] = {}
        planned = []
        for request in requests:
            where = " > ".join(w for w, _ in self._placements(request))
            instance_type = self._instance_type(request)
            price, source = None, None
            if request.spot and self._live_prices:
                if instance_type not in live:
                    try:
                        live[instance_type] = self._live_spot_price(instance_type)
                    except CredentialsError:
                        live[instance_type] = None
                price = live[instance_type]
                source = "AWS spot price history" if price is not None else None
            if price is None:
                table = estimate("aws", instance_type, spot=request.spot)
                price, source = table.per_hour, table.source
            gpu = request.accelerators
            planned.append(
                PlannedNode(
                    name=request.name,
                    role=request.role.value,
                    zone=where,
                    machine=instance_type,
                    accelerators=f"{gpu.count}x {gpu.type}" if gpu else None,
                    spot=request.spot,
                    price_per_hour=price,
                    price_source=source,
                )
            )
        return planned

    def _vpc_id(self) -> str:
        if self.aws.subnets:
            subnets = self._call("describe_subnets", SubnetIds=[self.aws.subnets[0]])["Subnets"]
            return str(subnets[0]["VpcId"])
        vpcs = self._call("describe_vpcs", Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ProviderError(
                f"region {self.aws.region} has no default VPC",
                hint="set `aws.subnets` to subnets of the VPC to use",
            )
        return str(vpcs[0]["VpcId"])

    def _find_group(self) -> dict[str, Any] | None:
        groups = self._call(
            "describe_security_groups",
            Filters=[{"Name": "group-name", "Values": [self.group_name]}, *self._fleet_filter()],
        )["SecurityGroups"]
        return groups[0] if groups else None

    def _ssh_permission(self, ranges: Iterable[str]) -> dict[str, Any]:
        port = self.spec.ssh.port
        return {
            "IpProtocol": "tcp",
            "FromPort": port,
            "ToPort": port,
            "IpRanges": [{"CidrIp": r, "Description": "fleet ssh"} for r in sorted(ranges) if ":" not in r],
            "Ipv6Ranges": [{"CidrIpv6": r, "Description": "fleet ssh"} for r in sorted(ranges) if ":" in r],
        }

    def _admitted(self, group: dict[str, Any]) -> set[str]:
        port = self.spec.ssh.port
        admitted: set[str] = set()
        for perm in group.get("IpPermissions", []):
            if perm.get("IpProtocol") == "tcp" and perm.get("FromPort") == port and perm.get("ToPort") == port:
                admitted |= {r["CidrIp"] for r in perm.get("IpRanges", [])}
                admitted |= {r["CidrIpv6"] for r in perm.get("Ipv6Ranges", [])}
        return admitted

    def _intra_fleet_permission(self) -> dict[str, Any]:
        """The group admits TCP from itself: workers mount the head at its private
        address, which the caller's SSH rule does not cover."""
        return {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535,
                "UserIdGroupPairs": [{"GroupId": self._group_id, "Description": "fleet internal"}]}

    def _has_intra_fleet_rule(self, group: dict[str, Any]) -> bool:
        port = self.spec.ssh.port
        for perm in group.get("IpPermissions", []):
            if perm.get("IpProtocol") not in ("tcp", "-1"):
                continue
            if perm.get("IpProtocol") == "tcp" and not (perm.get("FromPort", 0) <= port <= perm.get("ToPort", -1)):
                continue
            if any(pair.get("GroupId") == group["GroupId"] for pair in perm.get("UserIdGroupPairs", [])):
                return True
        return False

    def intra_fleet_rule(self) -> str:
        return (f"security group {self.group_name} must admit tcp:{self.spec.ssh.port} from itself "
                "(its self-referencing ingress rule, which `fleet up` adds)")

    def prepare(self) -> list[str]:
        """Import the key pair and create the security group (idempotent). An existing
        group follows the caller: SSH is admitted from the current source ranges only.
        The group also admits TCP from itself (the workers' mounts of the head)."""
        created = self._prepare_group()
        group = self._find_group()
        if group is not None and not self._has_intra_fleet_rule(group):
            self._call("authorize_security_group_ingress", GroupId=self._group_id,
                       IpPermissions=[self._intra_fleet_permission()])
            created.append(f"security group {self.group_name} admits tcp from its own members")
        return created

    def _prepare_group(self) -> list[str]:
        created = []
        ranges = resolve_source_ranges(
            self.aws.source_ranges, self._detect_address, field="aws.source_ranges"
        )
        pairs = self._call("describe_key_pairs", Filters=[{"Name": "key-name", "Values": [self.key_name]}])
        if not pairs.get("KeyPairs"):
            self._call(
                "import_key_pair",
                KeyName=self.key_name,
                PublicKeyMaterial=self.context.public_key.strip().encode(),
                TagSpecifications=[{"ResourceType": "key-pair", "Tags": self._tags({})}],
            )
            created.append(f"key pair {self.key_name}")
        group = self._find_group()
        if group is None:
            made = self._call(
                "create_security_group",
                GroupName=self.group_name,
                VpcId=self._vpc_id(),
                Description=f"SSH to the nodes of fleet {self.fleet} (created by fleet)",
                TagSpecifications=[{"ResourceType": "security-group", "Tags": self._tags({})}],
            )
            self._group_id = str(made["GroupId"])
            self._call("authorize_security_group_ingress", GroupId=self._group_id,
                       IpPermissions=[self._ssh_permission(ranges), self._intra_fleet_permission()])
            created.append(f"security group {self.group_name} (tcp:{self.spec.ssh.port} from {', '.join(ranges)}; "
                           "tcp from its own members)")
            return created
        self._group_id = str(group["GroupId"])
        # Compared in canonical form: an authorize of a range already there is an error.
        admitted, wanted = canonical_ranges(self._admitted(group)), set(ranges)
        if admitted != wanted:
            # The caller's address changed since the group was made: follow it, so that SSH
            # stays open to the caller only (and the caller is not locked out).
            if wanted - admitted:
                self._call("authorize_security_group_ingress", GroupId=self._group_id,
                           IpPermissions=[self._ssh_permission(wanted - admitted)])
            if admitted - wanted:
                self._call("revoke_security_group_ingress", GroupId=self._group_id,
                           IpPermissions=[self._ssh_permission(admitted - wanted)])
            created.append(f"security group {self.group_name} now admits {', '.join(sorted(wanted))} only "
                           f"(was {', '.join(sorted(admitted)) or 'nothing'})")
        return created

    # -- create ------------------------------------------------------------------------
    def _root_device_name(self) -> str:
        if self._root_device is None:
            images = self._call("describe_images", ImageIds=[self.aws.ami]).get("Images", [])
            if not images:
                raise SpecError(f"AMI {self.aws.ami} not found in {self.aws.region}", field="aws.ami")
            self._root_device = str(images[0].get("RootDeviceName") or "/dev/sda1")
        return self._root_device

    def run_params(self, request: NodeRequest, data_volume: str | None = None) -> dict[str, Any]:
        """RunInstances parameters; `data_volume` is the id of the data volume the head
        will attach (its startup script waits for it)."""
        options = self.spec.head.aws if request.role is Role.HEAD else self.spec.workers.aws
        tags = self._tags(
            {
                "Name": request.name,
                LABEL_ROLE: request.role.value,
                LABEL_SLOT: str(request.slot),
                LABEL_GENERATION: str(request.generation),
            }
        )
        instance_tags = [*tags, {"Key": DATA_VOLUME_TAG, "Value": data_volume}] if data_volume else tags
        params: dict[str, Any] = {
            "ImageId": self.aws.ami,
            "InstanceType": self._instance_type(request),
            "MinCount": 1,
            "MaxCount": 1,
            "KeyName": self.key_name,
            "UserData": render_startup_script(
                provider="aws",
                fleet_name=self.fleet,
                node=request.name,
                role=request.role.value,
                user=self.context.ssh_user,
                public_key=self.context.public_key,
                ssh_port=self.spec.ssh.port,
                data_disk=data_volume is not None,
                data_devices=[
                    f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{(data_volume or '').replace('-', '')}",
                    "/dev/xvdf", DATA_DEVICE,
                ],
            ),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": instance_tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
            "BlockDeviceMappings": [
                {
                    "DeviceName": self._root_device_name(),
                    "Ebs": {
                        "VolumeSize": request.disk_gb or 100,
                        "VolumeType": options.volume_type,
                        "DeleteOnTermination": True,
                    },
                }
            ],
        }
        if self._group_id:
            params["SecurityGroupIds"] = [self._group_id]
        if request.spot:
            spot: dict[str, Any] = {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            }
            if options.max_price:
                spot["MaxPrice"] = str(options.max_price)
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        return params

    def create(self, requests: Sequence[NodeRequest]) -> list[CreateResult]:
        if not requests:
            return []
        if self._group_id is None:
            group = self._find_group()
            self._group_id = str(group["GroupId"]) if group else None
        exhausted: set[str] = set()
        stop: list[QuotaError] = []

        def one(request: NodeRequest) -> CreateResult:
            ran_out: list[str] = []
            try:
                node = self._create_one(request, exhausted, stop, ran_out)
            except FleetError as exc:
                return CreateResult(request, error=exc, stockouts=tuple(ran_out))
            return CreateResult(request, node=node, stockouts=tuple(ran_out))

        with ThreadPoolExecutor(max_workers=min(self._max_parallel, len(requests))) as pool:
            return list(pool.map(one, requests))

    def _create_one(self, request: NodeRequest, exhausted: set[str], stop: list[QuotaError],
                    ran_out: list[str]) -> Node:
        if self.wants_data_disk(request):
            return self._create_head_with_data(request, exhausted, stop, ran_out)
        base = self.run_params(request)
        last: CapacityError | None = None
        placements = self._placements(request)
        for where, placement in placements:
            if stop:
                raise stop[0]
            if where in exhausted:
                continue
            try:
                # One token per attempt: a retried request (throttled, or its reply lost)
                # returns the instance the first one made instead of a second one.
                reply = self._call("run_instances", **base, **placement, ClientToken=uuid.uuid4().hex)
            except CapacityError as exc:
                exhausted.add(where)
                ran_out.append(where)
                last = exc
                continue
            except QuotaError as exc:
                stop.append(exc)
                raise
            return self.to_node(reply["Instances"][0])
        raise CapacityError(
            f"no spot/on-demand capacity for {request.name} in {', '.join(w for w, _ in placements)}"
            + (f": {last.message}" if last else ""),
            hint="add zones or subnets, raise workers.aws.max_price, or choose another instance type",
        )

    # -- the head's data volume ----------------------------------------------------------
    def wants_data_disk(self, request: NodeRequest) -> bool:
        return request.role is Role.HEAD and self.spec.head.data_disk_gb > 0

    def data_volumes(self) -> list[dict[str, Any]]:
        """Every data volume of this fleet, found by tag."""
        filters = [*self._fleet_filter(), {"Name": f"tag:{LABEL_ROLE}", "Values": [DATA_ROLE]}]
        volumes = self._call("describe_volumes", Filters=filters).get("Volumes", [])
        return [v for v in volumes if v.get("State") not in ("deleting", "deleted")]

    def _zone_placements(self, zone: str | None, request: NodeRequest) -> list[tuple[str, dict[str, Any], str]]:
        """(where, placement, availability zone) of each placement, in order; only those in
        `zone` when given (the data volume's AZ: a head can attach it only there, whatever
        zones the request prefers)."""
        found = []
        for where, placement in self._placements(request if zone is None else None):
            if "SubnetId" in placement:
                subnets = self._call("describe_subnets", SubnetIds=[placement["SubnetId"]])["Subnets"]
                az = str(subnets[0]["AvailabilityZone"])
            elif "Placement" in placement:
                az = str(placement["Placement"]["AvailabilityZone"])
            else:  # the region: pin the head to an AZ, where its volume will be
                zones = self._call("describe_availability_zones",
                                   Filters=[{"Name": "state", "Values": ["available"]}])["AvailabilityZones"]
                az = str(zone or zones[0]["ZoneName"])
                placement = {"Placement": {"AvailabilityZone": az}}
            found.append((where, placement, az))
        if zone is None:
            return found
        within = [item for item in found if item[2] == zone]
        if within:
            return within
        if self.aws.subnets:
            raise SpecError(f"the head's data volume is in {zone}, but no subnet of aws.subnets is there",
                            field="aws.subnets")
        return [(zone, {"Placement": {"AvailabilityZone": zone}}, zone)]

    def _wait_volume(self, volume_id: str, *, free: bool) -> dict[str, Any]:
        """Until the volume is `available` (made, or let go by a terminated head); with
        `free`, a volume attached to a live instance is an error at once."""
        deadline = time.monotonic() + _VOLUME_WAIT_S
        while True:
            [volume] = self._call("describe_volumes", VolumeIds=[volume_id])["Volumes"]
            if volume.get("State") == "available":
                return dict(volume)
            holders = [a["InstanceId"] for a in volume.get("Attachments", []) if a.get("InstanceId")]
            if free and holders:
                live = [i["InstanceId"] for i in self._instances(filters=[{"Name": "instance-id", "Values": holders}])
                        if i["State"]["Name"] not in ("shutting-down", "terminated")]
                if live:
                    raise ProviderError(
                        f"the head's data volume {volume_id} is still attached to {live[0]}",
                        hint="that instance must be terminated (or started again) before a new head can attach it",
                    )
            if time.monotonic() > deadline:
                raise ProviderError(f"data volume {volume_id} is still {volume.get('State')} after "
                                    f"{_VOLUME_WAIT_S:.0f} s")
            self._sleep(2.0)

    def _new_data_volume(self, az: str) -> dict[str, Any]:
        tags = self._tags({"Name": data_disk_name(self.fleet), LABEL_ROLE: DATA_ROLE})
        volume = self._call("create_volume", AvailabilityZone=az, Size=self.spec.head.data_disk_gb,
                            VolumeType=self.spec.head.aws.volume_type,
                            TagSpecifications=[{"ResourceType": "volume", "Tags": tags}],
                            ClientToken=uuid.uuid4().hex)
        return self._wait_volume(str(volume["VolumeId"]), free=False)

    def _attach(self, volume_id: str, instance_id: str) -> None:
        """AttachVolume as soon as EC2 takes it (an instance must leave `pending` first)."""
        deadline = time.monotonic() + _VOLUME_WAIT_S
        while True:
            try:
                self._call("attach_volume", VolumeId=volume_id, InstanceId=instance_id, Device=DATA_DEVICE)
                return
            except ProviderError as exc:
                if "IncorrectInstanceState" not in exc.message or time.monotonic() > deadline:
                    raise
            self._sleep(2.0)

    def _create_head_with_data(self, request: NodeRequest, exhausted: set[str], stop: list[QuotaError],
                               ran_out: list[str]) -> Node:
        existing = next(iter(self.data_volumes()), None)
        volume = self._wait_volume(existing["VolumeId"], free=True) if existing else None
        placements = self._zone_placements(volume["AvailabilityZone"] if volume else None, request)
        last: CapacityError | None = None
        for where, placement, az in placements:
            if stop:
                raise stop[0]
            if where in exhausted:
                continue
            new = self._new_data_volume(az) if volume is None else None
            volume_id = str((volume or new or {})["VolumeId"])
            try:
                reply = self._call("run_instances", **self.run_params(request, volume_id), **placement,
                                   ClientToken=uuid.uuid4().hex)
            except (CapacityError, QuotaError) as exc:
                if new is not None:  # blank, made for this zone
                    self._call("delete_volume", VolumeId=volume_id)
                if isinstance(exc, QuotaError):
                    stop.append(exc)
                    raise
                exhausted.add(where)
                ran_out.append(where)
                last = exc
                continue
            instance = reply["Instances"][0]
            try:
                self._attach(volume_id, str(instance["InstanceId"]))
            except FleetError:
                # A head without its data disk must not come up with the data on its boot disk.
                self._terminate([str(instance["InstanceId"])], wait=False)
                raise
            return self.to_node(instance)
        raise CapacityError(
            f"no capacity for {request.name} in {', '.join(w for w, _, _ in placements)}"
            + (f" (the availability zone of the head's data volume {volume['VolumeId']})" if volume else "")
            + (f": {last.message}" if last else ""),
            hint="retry later, or choose another instance type for the head",
        )

    def vouched_host_keys(self, nodes: Sequence[Node], *, timeout: float) -> dict[str, str]:
        """Each node's host key from the block cloud-init prints on its serial console
        (GetConsoleOutput; see fleet.providers.vouched)."""

        def fetch(node: Node) -> list[str]:
            if not node.provider_id:
                return []
            reply = self._call("get_console_output", InstanceId=node.provider_id, Latest=True)
            return console_host_keys(str(reply.get("Output") or ""))

        return poll_host_keys(nodes, fetch, timeout=timeout)

    # -- list --------------------------------------------------------------------------
    def to_node(self, instance: dict[str, Any]) -> Node | None:
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        state_name = instance.get("State", {}).get("Name", "pending")
        spot = instance.get("InstanceLifecycle") == "spot" or "SpotInstanceRequestId" in instance
        reason_code = instance.get("StateReason", {}).get("Code")
        if state_name in _GONE and DELETED_TAG in tags:
            return None
        if state_name in _GONE:
            state = NodeState.PREEMPTED if spot else NodeState.TERMINATED
            reason = reason_code or state_name
        else:
            state, reason = _STATE_MAP.get(state_name, NodeState.PENDING), None
        private = instance.get("PrivateIpAddress")
        address = private if self.aws.use_private_ip else instance.get("PublicIpAddress")
        launched = instance.get("LaunchTime")
        return Node(
            name=tags.get("Name", instance["InstanceId"]),
            fleet=tags.get(LABEL_FLEET, self.fleet),
            role=Role.HEAD if tags.get(LABEL_ROLE) == Role.HEAD.value else Role.WORKER,
            state=state,
            slot=int(tags.get(LABEL_SLOT, "0") or 0),
            generation=int(tags.get(LABEL_GENERATION, "1") or 1),
            address=address,
            internal_address=private,
            port=self.spec.ssh.port,
            zone=instance.get("Placement", {}).get("AvailabilityZone"),
            spot=spot,
            machine=instance.get("InstanceType"),
            provider_id=instance["InstanceId"],
            reason=reason,
            created_at=launched.timestamp() if isinstance(launched, datetime) else None,
            labels=tags,
        )

    def _instances(self, *, filters: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        def fetch() -> list[dict[str, Any]]:
            found = []
            for page in self.ec2.get_paginator("describe_instances").paginate(
                Filters=filters or self._fleet_filter(), PaginationConfig={"PageSize": 1000}
            ):
                for reservation in page.get("Reservations", []):
                    found.extend(reservation.get("Instances", []))
            return found

        return with_backoff(fetch, classify=classify, sleep=self._sleep, cancel=self.context.cancel)

    def list(self) -> list[Node]:
        nodes = [self.to_node(instance) for instance in self._instances()]
        return [node for node in nodes if node is not None]

    # -- delete / preempt / destroy ----------------------------------------------------
    def _terminate(self, instance_ids: list[str], *, wait: bool) -> None:
        for start in range(0, len(instance_ids), 500):
            chunk = instance_ids[start : start + 500]
            self._call("create_tags", Resources=chunk, Tags=[{"Key": DELETED_TAG, "Value": "1"}])
            self._call("terminate_instances", InstanceIds=chunk)
        if wait and instance_ids:
            self._wait_terminated(instance_ids)

    def _wait_terminated(self, instance_ids: list[str], timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(instance_ids)
        while pending:
            found = self._instances(filters=[{"Name": "instance-id", "Values": sorted(pending)}])
            pending = {i["InstanceId"] for i in found if i["State"]["Name"] != "terminated"}
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ProviderError(f"{len(pending)} instances still not terminated after {timeout_s:.0f} s")
            self._sleep(5.0)

    def delete(self, names: Sequence[str]) -> list[str]:
        wanted = set(names)
        victims = [
            (node.name, node.provider_id or "", node.zone) for node in self.list() if node.name in wanted
        ]
        alive = [v for v in victims if v[1]]
        self._terminate([instance_id for _n, instance_id, _z in alive], wait=False)
        return [f"instance {name} {instance_id} ({zone})" for name, instance_id, zone in alive]

    def _start_stop(self, names: Sequence[str], verb: str) -> list[str]:
        """start_instances / stop_instances of the named instances that can be."""
        wanted = set(names)
        can = {"start": {"stopped"}, "stop": {"pending", "running"}}[verb]
        targets = [
            (tags.get("Name", i["InstanceId"]), i["InstanceId"], i.get("Placement", {}).get("AvailabilityZone"))
            for i in self._instances()
            if (tags := {t["Key"]: t["Value"] for t in i.get("Tags", [])}).get("Name") in wanted
            and i["State"]["Name"] in can and DELETED_TAG not in tags
        ]
        if targets:
            self._call(f"{verb}_instances", InstanceIds=[instance_id for _n, instance_id, _z in targets])
        return [name for name, _id, _zone in targets]

    def start(self, names: Sequence[str]) -> list[str]:
        return self._start_stop(names, "start")

    def stop(self, names: Sequence[str]) -> list[str]:
        return self._start_stop(names, "stop")

    def preempt(self, name: str, *, notice_s: float = 0.0) -> None:
        """Terminate a spot instance without the `fleet-deleted` tag, so that `list()` sees
        it gone without fleet asking (EC2 has no public API to interrupt one; `notice_s` is
        not used). An on-demand node is stopped instead."""
        node = next((n for n in self.list() if n.name == name and n.is_alive), None)
        if node is None or not node.provider_id:
            raise UsageError(f"no live node {name} in fleet {self.fleet}")
        if node.spot:
            self._call("terminate_instances", InstanceIds=[node.provider_id])
        else:
            self._call("stop_instances", InstanceIds=[node.provider_id])

    def destroy_all(self, keep_data: bool = False) -> CleanupReport:
        report = CleanupReport()
        try:
            instances = self._instances()
            live = [i for i in instances if i["State"]["Name"] != "terminated"]
            self._terminate([i["InstanceId"] for i in live], wait=True)
            for instance in live:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                report.deleted.append(f"instance {tags.get('Name', '?')} {instance['InstanceId']}")
            leftovers = [
                i["InstanceId"]
                for i in instances
                if i["State"]["Name"] == "terminated"
                and DELETED_TAG not in {t["Key"] for t in i.get("Tags", [])}
            ]
            if leftovers:  # preempted ones: mark them so that `list()` forgets them
                self._call("create_tags", Resources=leftovers, Tags=[{"Key": DELETED_TAG, "Value": "1"}])
        except FleetError as exc:
            report.errors.append(f"instances: {exc.message}")
        try:
            volumes = self._call("describe_volumes", Filters=self._fleet_filter())["Volumes"]
            for volume in volumes:
                tags = {t["Key"]: t["Value"] for t in volume.get("Tags", [])}
                if tags.get(LABEL_ROLE) == DATA_ROLE:
                    where = f"{volume['VolumeId']} ({volume.get('AvailabilityZone')}, {volume.get('Size')} GB)"
                    if keep_data:
                        report.kept.append(f"volume {where}, the head's data disk")
                        report.kept_hint = (f"aws ec2 delete-volume --volume-id {volume['VolumeId']} "
                                            f"--region {self.aws.region}")
                        continue
                    # Let go by the head terminated above (EC2 detaches it shortly after).
                    volume = self._wait_volume(str(volume["VolumeId"]), free=True)
                if volume.get("State") == "available":
                    self._call("delete_volume", VolumeId=volume["VolumeId"])
                    report.deleted.append(f"volume {volume['VolumeId']}")
        except FleetError as exc:
            report.errors.append(f"volumes: {exc.message}")
        self._delete_group(report)
        try:
            pairs = self._call(
                "describe_key_pairs", Filters=[{"Name": "key-name", "Values": [self.key_name]}]
            )
            if pairs.get("KeyPairs"):
                self._call("delete_key_pair", KeyName=self.key_name)
                report.deleted.append(f"key pair {self.key_name}")
        except FleetError as exc:
            report.errors.append(f"key pair {self.key_name}: {exc.message}")
        return report

    def _delete_group(self, report: CleanupReport) -> None:
        for attempt in range(12):
            try:
                group = self._find_group()
                if group is None:
                    return
                group_id = str(group["GroupId"])
                self._call("delete_security_group", GroupId=group_id)
                report.deleted.append(f"security group {self.group_name} {group_id}")
                self._group_id = None
                return
            except ProviderError as exc:
                # DependencyViolation: a terminating instance still holds it for a moment.
                if "DependencyViolation" not in exc.message or attempt == 11:
                    report.errors.append(f"security group {self.group_name}: {exc.message}")
                    return
                self._sleep(5.0)

    def close(self) -> None:
        with self._lock:
            client, self._ec2 = self._ec2, None
        if client is not None:
            client.close()
