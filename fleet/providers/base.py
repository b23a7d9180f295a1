"""The provider contract: the same verbs for the local machine, GCP and AWS.

A provider turns `NodeRequest`s into machines and reports what exists, by label, in
one list call per zone/region. It maps its cloud's error codes to `fleet.errors`
(`CapacityError`, `QuotaError`, `RateLimitError`, `CredentialsError`) here and nowhere
else. Providers never touch SSH and never read the local state database: `list()` must
find everything the fleet owns even when the local record is gone.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleet.errors import FleetError
from fleet.model import Node, NodeRequest
from fleet.spec.models import FleetSpec


@dataclass(frozen=True)
class ProviderContext:
    """What a provider needs to know about the fleet besides its spec."""

    spec: FleetSpec
    state_dir: Path  # .fleet/<name>/ beside the spec: keys, known_hosts, state.db
    public_key: str  # the fleet's SSH public key, one OpenSSH line
    ssh_user: str
    cancel: threading.Event | None = None  # set: long waits (operations) give up at once


@dataclass(frozen=True)
class PlannedNode:
    """One line of `fleet up --dry-run`."""

    name: str
    role: str
    zone: str | None
    machine: str | None
    accelerators: str | None
    spot: bool
    price_per_hour: float | None  # USD, None when unknown
    price_source: str | None = None  # e.g. "bundled table 2026-11-01" or "AWS price history"


@dataclass(frozen=True)
class CreateResult:
    """Per-request outcome of `Provider.create`: a node, or the error for that request."""

    request: NodeRequest
    node: Node | None = None
    error: FleetError | None = None
    # The zones (AWS: subnets) that answered "no capacity" for this request, in the order
    # tried, also when another zone then took it: the reconciler cools them down.
    stockouts: tuple[str, ...] = ()


@dataclass
class CleanupReport:
    """What `Provider.destroy_all` deleted, for `fleet down` to print."""

    deleted: list[str] = field(default_factory=list)  # "instance demo-w1-g1 (us-central1-a)"
    errors: list[str] = field(default_factory=list)
    # What `destroy_all(keep_data=True)` left on purpose (the head's data disk), and the
    # command that deletes it later.
    kept: list[str] = field(default_factory=list)
    kept_hint: str | None = None


class Provider(ABC):
    """Base class of every provider. One instance per CLI invocation."""

    name: str = "base"

    def __init__(self, context: ProviderContext) -> None:
        self.context = context
        self.spec = context.spec

    @property
    def isolation(self) -> str | None:
        """How this provider's nodes are isolated from the caller, where it is a choice
        (the local provider: "namespaces" or "loopback"); None for real clouds."""
        return None

    def intra_fleet_rule(self) -> str | None:
        """The network rule that lets the fleet's nodes reach each other (the workers'
        mounts of the head), named for errors when they cannot; None where there is none."""
        return None

    def check(self) -> None:
        """Fail early and clearly (credentials, local programs) without mutating anything."""

    def plan(self, requests: Sequence[NodeRequest]) -> list[PlannedNode]:
        """What `create` would do; no mutating call."""
        return [
            PlannedNode(
                name=r.name,
                role=r.role.value,
                zone=None,
                machine=r.machine,
                accelerators=f"{r.accelerators.count}x {r.accelerators.type}" if r.accelerators else None,
                spot=r.spot,
                price_per_hour=None,
            )
            for r in requests
        ]

    def prepare(self) -> list[str]:
        """Create the fleet-wide resources (firewall rule, security group, key pair).
        Idempotent. Returns a description of what it created."""
        return []

    @abstractmethod
    def create(self, requests: Sequence[NodeRequest]) -> list[CreateResult]:
        """Create the nodes (in parallel where the API allows), one result per request.
        A failed request does not fail the others. Returned nodes may still be PENDING.
        A request's `zones` (when set) are the only zones tried, in that order (a head
        whose data disk exists still goes to the disk's zone); the zones that had no
        capacity are named in each result's `stockouts`."""

    @abstractmethod
    def list(self) -> list[Node]:
        """Every node of this fleet in any state (stopped ones too), found by label/tag.
        One API call per zone or region, independent of the node count."""

    @abstractmethod
    def delete(self, names: Sequence[str]) -> list[str]:
        """Delete these nodes (idempotent: unknown names are ignored). Returns what was deleted."""

    @abstractmethod
    def start(self, names: Sequence[str]) -> list[str]:
        """Start these stopped nodes again (a GCE instance TERMINATED by host maintenance,
        a stopped EC2 instance, a local node that is down): same name, same disks, a new
        boot. Running or unknown names are ignored, and so are machines that cannot be
        started (a terminated EC2 instance, a spot VM the cloud deleted): a caller that gets
        nothing back replaces the node instead. Returns the names of the nodes started;
        they may still be PENDING."""

    @abstractmethod
    def stop(self, names: Sequence[str]) -> list[str]:
        """Stop these nodes the way the cloud does (GCE host maintenance -> TERMINATED, EC2
        stop): the machine keeps its disks and can be `start`ed. Returns the names of the
        nodes stopped."""

    @abstractmethod
    def preempt(self, name: str, *, notice_s: float = 0.0) -> None:
        """Simulate a preemption of one node the way the cloud does it."""

    def vouched_host_keys(self, nodes: Sequence[Node], *, timeout: float) -> dict[str, str]:
        """The public host key ("ssh-ed25519 AAAA...") of each node, as the provider vouches
        for it through a channel an on-path attacker cannot answer (the local provider
        generated it; clouds publish what the node reported through their API). Waits up
        to `timeout` for nodes still booting; a node without one is left out."""
        return {n.name: n.host_key for n in nodes if n.host_key}

    def destroy_all(self, keep_data: bool = False) -> CleanupReport:
        """Delete everything this fleet owns, found through the provider only (instances
        in any state, disks, firewall rules, key pairs...). Idempotent. With `keep_data`
        the head's data disk (the shared directory) stays, listed in `report.kept`, for a
        later `fleet up` to attach again."""
        report = CleanupReport()
        names = [n.name for n in self.list()]
        report.deleted.extend(self.delete(names))
        return report

    def close(self) -> None:
        """Release clients, threads. Called once at the end of a command."""
