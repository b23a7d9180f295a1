"""The `fleet.yaml` model: what a fleet should look like.

Pydantic models, strict about unknown keys (a typo is an error, not a silent default).
Everything but `name`, `provider` and `workers.count` has a default, so that

    name: demo
    provider: local
    workers: {count: 3}

is a complete local spec. Loading (YAML with line numbers, `${VAR}` interpolation,
readable errors) lives in `fleet.spec.loader`.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,28}[a-z0-9]$"
HOST_KEY_PATTERN = r"^(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa) [A-Za-z0-9+/]+={0,3}( [^\n]*)?$"
DEFAULT_SSHFS_OPTIONS = ["reconnect", "ServerAliveInterval=15", "ServerAliveCountMax=3"]


class SpecValueError(ValueError):
    """A validation problem that knows where it belongs.

    `at` is the location of the offending value relative to where the validator runs
    (the model for a model validator, the field's value for a field validator); `field`
    is the path to name in the message when it differs from `at` (e.g. a missing block).
    The loader turns it into a `SpecError` at the line of `at`."""

    def __init__(
        self,
        message: str,
        *,
        at: tuple[str | int, ...] = (),
        field: tuple[str | int, ...] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.at = at
        self.field = field
        self.hint = hint


def _number_types(annotation: Any) -> set[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_number_types(arg) for arg in get_args(annotation)))
    return {annotation} & {int, float}


class Strict(BaseModel):
    # Numbers are accepted where a string is expected (`max_price: 0.5`, `env: {N: 4}`).
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1; in YAML `count: yes` is a mistake, not a 1.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if _number_types(annotation):
                # Reported like any other type error: "expected an integer >= 0, got true".
                kind = "int_type" if int in _number_types(annotation) else "float_type"
                raise PydanticCustomError(kind, "Input should be a number")
        return value


class AcceleratorSpec(Strict):
    type: str = Field(description="GPU type, e.g. nvidia-tesla-t4 (GCP) or implied by the EC2 instance type")
    count: int = Field(1, ge=1, le=16, description="accelerators per node")


class GcpNodeOptions(Strict):
    """Per-node GCP options (under `workers.gcp` / `head.gcp`)."""

    provisioning_model: Literal["SPOT", "PREEMPTIBLE"] = Field(
        "SPOT", description="SPOT, or the legacy preemptible flag"
    )
    instance_termination_action: Literal["DELETE", "STOP"] = Field(
        "DELETE", description="what GCP does with a preempted VM"
    )
    max_run_duration_s: int | None = Field(None, ge=60, description="hard cost cap per VM")
    min_cpu_platform: str | None = Field(None, description="e.g. 'Intel Cascade Lake'")


class AwsNodeOptions(Strict):
    """Per-node AWS options (under `workers.aws` / `head.aws`)."""

    max_price: str | None = Field(None, description="spot max price in USD/hour, e.g. '0.50'")
    volume_type: str = Field("gp3", description="EBS volume type of the root disk")


class HeadSpec(Strict):
    """The node that holds the shared directory. On-demand in clouds by default.

    With `host` set, the head is an existing machine that `fleet` never creates or
    deletes (the seed's setup: the big disk lives on a server you already have)."""

    machine: str | None = Field(None, description="machine/instance type (provider default when absent)")
    spot: bool = Field(False, description="run the head on a spot/preemptible machine (not advised)")
    disk_gb: int = Field(100, ge=10, le=65536, description="boot disk size in GB")
    data_disk_gb: int = Field(
        100, ge=0, le=65536,
        description="size in GB of the head's data disk, which holds the shared directory and outlives "
        "the head (a replacement head attaches it again; `fleet down` deletes it unless --keep-data); "
        "0: no data disk, the shared directory lives on the head's boot disk and dies with it",
    )
    accelerators: AcceleratorSpec | None = Field(None, description="GPUs on the head (none by default)")
    host: str | None = Field(None, description="address of an existing machine to use as head")
    user: str | None = Field(None, description="SSH user on the existing head (default ssh.user)")
    port: int = Field(22, ge=1, le=65535, description="SSH port of the existing head")
    host_key: str | None = Field(
        None,
        pattern=HOST_KEY_PATTERN,
        description="the existing head's public host key ('ssh-ed25519 AAAA...', e.g. from its "
        "/etc/ssh/ssh_host_ed25519_key.pub); without it the head must be listed in ssh.trust_on_first_use",
    )
    gcp: GcpNodeOptions = Field(GcpNodeOptions(), description="GCP options for the head")
    aws: AwsNodeOptions = Field(AwsNodeOptions(), description="AWS options for the head")

    @field_validator("data_disk_gb")
    @classmethod
    def _data_disk_size(cls, value: int) -> int:
        if 0 < value < 10:
            raise ValueError("expected 0 (no data disk) or at least 10 GB")
        return value


class WorkersSpec(Strict):
    count: int = Field(ge=0, le=10000, description="number of worker nodes")
    machine: str | None = Field(None, description="machine/instance type (provider default when absent)")
    accelerators: AcceleratorSpec | None = Field(None, description="GPUs per worker: type and count")
    spot: bool = Field(True, description="spot (AWS) / preemptible (GCP) workers")
    disk_gb: int = Field(100, ge=10, le=65536, description="boot disk size in GB")
    gcp: GcpNodeOptions = Field(GcpNodeOptions(), description="GCP options for the workers")
    aws: AwsNodeOptions = Field(AwsNodeOptions(), description="AWS options for the workers")


class SshSpec(Strict):
    user: str | None = Field(None, description="login user (local: you; gcp: fleet; aws: ubuntu)")
    key: str | None = Field(None, description="private key path; generated per fleet (0600) when absent")
    port: int = Field(22, ge=1, le=65535, description="SSH port of cloud nodes")
    connect_timeout: float = Field(10.0, gt=0, le=600, description="seconds to wait for a TCP/SSH handshake")
    command_timeout: float = Field(600.0, gt=0, description="default limit in seconds for one remote command")
    ready_timeout: float = Field(300.0, gt=0, description="how long `up` waits for a new node's SSH")
    parallelism: int = Field(32, ge=1, le=1024, description="bound on concurrent SSH connections")
    trust_on_first_use: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]] = Field(
        [],
        description="node names whose host key may be trusted the first time it is seen, when the "
        "provider vouches for none (e.g. an existing head); with a warning. Never needed on local, "
        "gcp (guest attributes) or aws (console output)",
    )


class SharedSpec(Strict):
    path: str = Field("shared", description="the head's exported directory (relative: to its home)")
    mount: str = Field("shared", description="where workers mount it (relative: to their home)")
    options: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SSHFS_OPTIONS), description="sshfs -o options on the workers"
    )
    max_conns: int = Field(1, ge=1, le=32, description="sshfs max_conns: parallel SSH connections per mount")


class MonitorSpec(Strict):
    interval: float = Field(10.0, gt=0, description="seconds between reconcile passes")
    grace: float = Field(30.0, ge=0, description="how long a node may be unreachable before it is replaced")
    max_replacements: int = Field(100, ge=0, description="stop replacing nodes after this many replacements")
    backoff: float = Field(5.0, ge=0, description="first delay after a failed replacement (doubles)")
    zone_cooldown: float = Field(300.0, ge=0, description="how long new nodes avoid a zone that had no capacity")


class LocalSpec(Strict):
    root: str | None = Field(None, description="where local nodes live (default ~/.local/state/fleet/local)")
    address: str = Field("127.0.0.1", description="loopback address the nodes' sshd listen on (loopback isolation)")
    isolation: Literal["auto", "namespaces", "loopback"] = Field(
        "auto",
        description="namespaces: every node a machine of its own (network, mount and PID namespaces, "
        "copy-on-write root; needs root); loopback: every node an sshd of yours on 127.0.0.1; "
        "auto: namespaces when running as root with the tools installed, else loopback",
    )


class GcpSpec(Strict):
    project: str = Field(description="GCP project id")
    zones: list[str] = Field(min_length=1, description="zones tried in order, e.g. [us-central1-a]")
    image: str = Field("projects/debian-cloud/global/images/family/debian-12", description="boot image")
    network: str = Field("global/networks/default", description="VPC network")
    subnetwork: str | None = Field(None, description="subnetwork (the network's default when absent)")
    service_account: str | None = Field(None, description="service account e-mail for the VMs")
    labels: dict[str, str] = Field(default_factory=dict, description="extra labels on every VM")
    api_endpoint: str | None = Field(None, description="e.g. http://127.0.0.1:8080 for tests")
    source_ranges: list[str] | None = Field(
        None, description="who may reach SSH (default: the caller's public address /32)"
    )
    use_private_ip: bool = Field(
        False, description="reach nodes by their private address (from inside the VPC)"
    )
    api_timeout: float = Field(
        30.0, gt=0, le=600, description="seconds a Compute Engine API call may wait for its answer before it is retried"
    )


class AwsSpec(Strict):
    region: str = Field(description="AWS region, e.g. us-east-1")
    zones: list[str] = Field(default_factory=list, description="availability zones, tried in order")
    subnets: list[str] = Field(default_factory=list, description="subnet ids, tried in order")
    ami: str = Field(description="AMI id of the node image")
    profile: str | None = Field(None, description="named credentials profile")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags on every instance")
    source_ranges: list[str] | None = Field(
        None, description="who may reach SSH (default: the caller's public address /32)"
    )
    use_private_ip: bool = Field(
        False, description="reach nodes by their private address (from inside the VPC)"
    )
    api_timeout: float = Field(
        30.0, gt=0, le=600, description="seconds an EC2 API call may wait for its answer before it is retried"
    )


class RuntimeSpec(Strict):
    """fleet's own runtime on every node: a virtualenv `~/.fleet/runtime/<version>/` that
    `fleet up` makes from fleet's wheel (built on the control plane, uploaded over SSH),
    layered on what the image already has. Jobs run with its interpreter."""

    install: bool = Field(True, description="install fleet's runtime on every node (false: jobs need `python:`)")
    python: str | None = Field(
        None, description="interpreter the runtime's virtualenv is made from (default: the first image's, "
        "else python3)"
    )
    extras: list[str] = Field(
        default_factory=lambda: ["worker"], description="fleet's extras the nodes need, e.g. [worker]"
    )
    packages: list[str] = Field(default_factory=list, description="more requirements for the nodes (pip syntax)")
    image: list[str] | None = Field(
        None, description="what the node image provides: virtualenvs/prefixes (with bin/python) or site-packages "
        "directories layered under the runtime, e.g. [/opt/conda]; their packages are used, never reinstalled "
        "(default: local: [/opt/fleet-image], clouds: none)"
    )
    index_url: str | None = Field(None, description="package index for what the image lacks (pip --index-url)")
    extra_index_urls: list[str] = Field(default_factory=list, description="more indexes (pip --extra-index-url)")
    find_links: list[str] = Field(
        default_factory=list, description="wheel directories or pages (pip --find-links), as the installer sees them"
    )
    wheelhouse: bool = Field(
        False, description="the control plane downloads what the image lacks once, puts it on the head, and the "
        "nodes install it from there (hash-checked, no index needed on the nodes)"
    )

    @field_validator("extras")
    @classmethod
    def _known_extras(cls, extras: list[str]) -> list[str]:
        from fleet.runtime import known_extras

        known = known_extras()
        for index, extra in enumerate(extras):
            if known and extra not in known:
                raise SpecValueError(f"fleet has no extra {extra!r}", at=(index,),
                                     hint=f"fleet's extras: {', '.join(known)}")
        return extras


class RaySpec(Strict):
    """A Ray cluster on the fleet (`fleet.ray`): the head node runs the Ray head, every
    worker (replacements too) joins it; Ray's ports stay inside the fleet, the dashboard
    and the Jobs API are reached through an SSH tunnel."""

    enabled: bool = Field(False, description="start a Ray cluster on the fleet's nodes (`fleet up`)")
    gcs_port: int = Field(6380, ge=1024, le=65535, description="the head's GCS port (not Ray's default 6379)")
    dashboard_port: int = Field(
        8266, ge=1024, le=65535, description="the dashboard and Jobs API on the head's loopback (not Ray's 8265)"
    )
    head_cpus: int = Field(0, ge=0, description="CPUs the head offers to tasks (0: the head runs none)")
    worker_cpus: int | None = Field(None, ge=1, description="CPUs each worker offers (default: what Ray detects)")
    object_store_mb: int | None = Field(
        None, ge=75, description="each node's object store in MB (default: Ray's, 30% of memory)"
    )
    health_check_period_ms: int = Field(1000, ge=100, description="how often the GCS checks each node")
    health_check_timeout_ms: int = Field(2000, ge=100, description="how long a health check may take")
    health_check_failure_threshold: int = Field(
        3, ge=1, description="failed checks before a node is marked dead (Ray's default detects it in ~65 s)"
    )
    auth: Literal["token", "none"] = Field(
        "token", description="token: Ray's token authentication with a per-fleet token (0600); none: off"
    )
    join_timeout: float = Field(180.0, gt=0, description="how long `up` waits for every node to be alive in Ray")


class FleetSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="labels every resource; lowercase, digits, '-'")
    provider: Literal["local", "gcp", "aws"] = Field(description="where the nodes run")
    head: HeadSpec = Field(HeadSpec(), description="the node that holds the shared directory")
    workers: WorkersSpec = Field(description="the nodes that do the work")
    ssh: SshSpec = Field(SshSpec(), description="how `fleet` reaches the nodes")
    shared: SharedSpec = Field(SharedSpec(), description="the head's directory that every worker mounts")
    setup: list[str] = Field(default_factory=list, description="commands run on every node before mounting")
    runtime: RuntimeSpec = Field(RuntimeSpec(), description="fleet's own runtime on the nodes (a versioned virtualenv)")
    monitor: MonitorSpec = Field(MonitorSpec(), description="the reconcile loop that replaces lost nodes")
    local: LocalSpec = Field(LocalSpec(), description="options of the local provider")
    ray: RaySpec = Field(RaySpec(), description="a Ray cluster on the fleet's nodes (docs/ray.md)")
    gcp: GcpSpec | None = Field(None, description="Google Cloud settings (needed with provider: gcp)")
    aws: AwsSpec | None = Field(None, description="AWS settings (needed with provider: aws)")

    @model_validator(mode="after")
    def _provider_block_present(self) -> FleetSpec:
        problem = provider_block_problem({"provider": self.provider, "gcp": self.gcp, "aws": self.aws})
        if problem is not None:
            raise problem
        return self

    def ssh_user(self, default_local_user: str) -> str:
        if self.ssh.user:
            return self.ssh.user
        return {"local": default_local_user, "gcp": "fleet", "aws": "ubuntu"}[self.provider]


def provider_block_problem(data: Any) -> SpecValueError | None:
    """A cloud provider without its block. Also checked on raw data by the loader, so that
    it is reported together with other errors."""
    if not isinstance(data, dict):
        return None
    provider = data.get("provider")
    if provider == "gcp" and data.get("gcp") is None:
        return SpecValueError(
            "provider 'gcp' needs a `gcp:` block",
            at=("provider",),
            field=("gcp",),
            hint="add `gcp: {project: PROJECT, zones: [ZONE, ...]}`",
        )
    if provider == "aws" and data.get("aws") is None:
        return SpecValueError(
            "provider 'aws' needs an `aws:` block",
            at=("provider",),
            field=("aws",),
            hint="add `aws: {region: REGION, ami: AMI_ID}`",
        )
    return None
