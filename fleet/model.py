"""Observed state shared by every layer: nodes, their roles and normalised states.

These are frozen dataclasses: providers build them from what the cloud (or the local
machine) reports, the state store persists them, the executor connects to them.
Nothing here talks to anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum


class NodeState(StrEnum):
    """Normalised node state, the same for every provider (libcloud's idea)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PREEMPTED = "PREEMPTED"
    TERMINATED = "TERMINATED"
    UNREACHABLE = "UNREACHABLE"


class Role(StrEnum):
    HEAD = "head"
    WORKER = "worker"


# Labels every provider puts on what it creates (GCP labels, EC2 tags, local metadata).
LABEL_FLEET = "fleet"
LABEL_ROLE = "fleet-role"
LABEL_SLOT = "fleet-slot"
LABEL_GENERATION = "fleet-generation"

_WORKER_NAME = re.compile(r"^(?P<fleet>[a-z][a-z0-9-]*)-w(?P<slot>\d+)-g(?P<gen>\d+)$")


def head_name(fleet: str) -> str:
    return f"{fleet}-head"


def data_disk_name(fleet: str) -> str:
    """Name of the head's data disk (GCP disk, EBS volume's Name tag), which holds the
    shared directory and outlives any head; labelled fleet=<fleet>, fleet-role=data."""
    return f"{fleet}-data"


DATA_ROLE = "data"  # the fleet-role label of the head's data disk
# Where a head mounts its data disk (clouds, isolated local nodes); the shared directory
# is its `shared/` (see fleet.share).
DATA_MOUNT = "/var/lib/fleet/data"


def worker_name(fleet: str, slot: int, generation: int) -> str:
    """Name of a worker: slot is its place in the fleet (1..count), generation counts
    replacements of that slot (1 for the first node). A replacement gets a new name so
    that its new host key never collides with the pinned key of the node it replaces."""
    return f"{fleet}-w{slot}-g{generation}"


def parse_worker_name(name: str) -> tuple[str, int, int] | None:
    """(fleet, slot, generation) of a worker name, or None if it is not one."""
    match = _WORKER_NAME.match(name)
    if not match:
        return None
    return match["fleet"], int(match["slot"]), int(match["gen"])


@dataclass(frozen=True)
class Accelerator:
    type: str
    count: int = 1


@dataclass(frozen=True)
class NodeRequest:
    """What `fleetops` asks a provider to create."""

    name: str
    role: Role
    slot: int  # 0 for the head, 1..count for workers
    generation: int
    spot: bool
    machine: str | None = None
    accelerators: Accelerator | None = None
    disk_gb: int | None = None
    # The zones (AWS: subnets or zones) to try, in order; None: every zone of the spec.
    # The reconciler leaves out zones that ran out of capacity lately (zone cool-down).
    zones: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Node:
    """One machine of the fleet as a provider observed it."""

    name: str
    fleet: str
    role: Role
    state: NodeState
    slot: int = 0
    generation: int = 1
    address: str | None = None  # where SSH reaches it (public IP, or 127.x for local)
    port: int = 22
    # Where other nodes of the fleet reach it (a cloud's private IP); None: use address.
    internal_address: str | None = None
    zone: str | None = None
    spot: bool = False
    machine: str | None = None
    provider_id: str | None = None  # instance id / self link / local node id
    # The host key the provider vouches for (local nodes: the key we generated).
    # None for clouds: the executor pins the key seen on first contact.
    host_key: str | None = None
    # Why the provider thinks the node is in this state (e.g. the spot termination code).
    reason: str | None = None
    created_at: float | None = None
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_alive(self) -> bool:
        return self.state in (NodeState.PENDING, NodeState.RUNNING, NodeState.UNREACHABLE)
