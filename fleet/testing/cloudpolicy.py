"""What the fake clouds' firewalls admit, as `netpolicy.Rule`s for their backing nodes.

EC2 security groups (ingress rules from CIDRs or from other groups, per protocol and
port range) and GCE firewall rules (ingress from source ranges or source tags to target
tags) are translated into allow rules between the addresses of isolated backing nodes,
so that what the cloud would drop is dropped on the fleet's bridge. The caller is the
bridge's host side; a CIDR admits it when it contains `caller_public`, the address the
fake pretends the caller has (the tests' `source_ranges` name it). Egress is open, as
both clouds' defaults are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleet.providers.netpolicy import Rule


@dataclass(frozen=True)
class Caller:
    public: str  # what the cloud sees as the caller's address
    bridge: str  # the bridge's host side, which stands for the caller


def _in(cidr: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


def _sources_from_ranges(ranges: Iterable[str], nodes: Iterable[str], caller: Caller) -> list[str]:
    ranges = list(ranges)
    found = [address for address in nodes if any(_in(r, address) for r in ranges)]
    if any(_in(r, caller.public) for r in ranges):
        found.append(caller.bridge)
    return found


def _protocol(name: str | None) -> str:
    lowered = (name or "all").lower()
    return {"-1": "all", "all": "all", "6": "tcp", "17": "udp", "1": "icmp"}.get(lowered, lowered)


def ec2_rules(instances: Mapping[str, tuple[str, Sequence[str]]], groups: Mapping[str, Sequence[object]],
              caller: Caller) -> list[Rule]:
    """`instances`: id -> (address, its security group ids); `groups`: group id -> its
    moto ingress rules (`ip_protocol`, `from_port`, `to_port`, `ip_range`, `source_group`)."""
    rules = []
    addresses = [address for address, _ in instances.values()]
    for address, group_ids in instances.values():
        for group_id in group_ids:
            for rule in groups.get(group_id, []):
                protocol = _protocol(getattr(rule, "ip_protocol", None))
                low, high = getattr(rule, "from_port", None), getattr(rule, "to_port", None)
                ports: tuple[str, ...] = ()
                if protocol in ("tcp", "udp") and low is not None and not (int(low) <= 0 and int(high) >= 65535):
                    ports = (str(low) if low == high else f"{low}-{high}",)
                sources: list[str] = []
                cidr = (getattr(rule, "ip_range", None) or {}).get("CidrIp")
                if cidr:
                    sources += _sources_from_ranges([cidr], addresses, caller)
                source_group = (getattr(rule, "source_group", None) or {}).get("GroupId")
                if source_group:
                    sources += [a for a, gids in instances.values() if source_group in gids]
                if sources:
                    rules.append(Rule(tuple(sorted(set(sources))), (address,), protocol, ports,
                                      name=f"{group_id} {getattr(rule, 'id', '')}".strip()))
    return rules


def gce_rules(instances: Mapping[str, tuple[str, Sequence[str], str]], firewalls: Iterable[Mapping[str, object]],
              caller: Caller) -> list[Rule]:
    """`instances`: name -> (address, network tags, network link); `firewalls`: the
    fake's firewall resources (INGRESS, sourceRanges, sourceTags, targetTags, allowed)."""
    rules = []
    for firewall in firewalls:
        if firewall.get("direction", "INGRESS") != "INGRESS" or firewall.get("disabled"):
            continue
        network = str(firewall.get("network", "")).rsplit("/", 1)[-1] or "default"
        members = {name: (address, tags) for name, (address, tags, net) in instances.items()
                   if (net.rsplit("/", 1)[-1] or "default") == network}
        target_tags = set(firewall.get("targetTags") or [])  # type: ignore[arg-type]
        targets = [address for address, tags in members.values() if not target_tags or target_tags & set(tags)]
        sources = _sources_from_ranges(firewall.get("sourceRanges") or [],  # type: ignore[arg-type]
                                       [a for a, _ in members.values()], caller)
        source_tags = set(firewall.get("sourceTags") or [])  # type: ignore[arg-type]
        sources += [address for address, tags in members.values() if source_tags & set(tags)]
        if not targets or not sources:
            continue
        for allowed in firewall.get("allowed") or []:  # type: ignore[union-attr]
            protocol = _protocol(allowed.get("IPProtocol"))  # type: ignore[union-attr]
            ports = tuple(str(p) for p in allowed.get("ports") or [])  # type: ignore[union-attr]
            rules.append(Rule(tuple(sorted(set(sources))), tuple(sorted(targets)), protocol, ports,
                              name=str(firewall.get("name", ""))))
    return rules
