"""Network policy on a fleet's bridge: allow rules rendered as nftables tables.

A `Rule` admits connections from sources (addresses, ranges, CIDRs) to targets (node
addresses) for a protocol and ports, like a cloud firewall's ingress rule. The local
provider uses its VPC-like default; the fake clouds translate GCE firewall rules and
EC2 security groups into rules for their backing nodes, so that what the cloud would
drop is dropped here.

One `bridge` table per fleet filters every frame that enters from or leaves to one of
the fleet's veths (node to node, node to caller, caller to node); anything not admitted
is dropped, IPv6 included. The bridge family has no connection tracking, so replies are
admitted statelessly: a reply rule lets the target answer from the admitted port, but
never with a segment that opens a TCP connection (SYN without ACK). One `inet` table
drops anything routed between the bridge and any other interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


class Bridge(Protocol):
    @property
    def bridge(self) -> str: ...

    @property
    def table(self) -> str: ...

    @property
    def veth_prefix(self) -> str: ...


@dataclass(frozen=True)
class Rule:
    """Admit new connections from `sources` to `targets`."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    protocol: str = "all"  # tcp | udp | icmp | all
    ports: tuple[str, ...] = ()  # "22", "8000-8100"; empty: every port
    name: str = ""  # the cloud rule it stands for


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _rule_lines(rule: Rule) -> list[str]:
    if not rule.sources or not rule.targets:
        return []
    comment = f' comment "{rule.name}"' if rule.name else ""
    forward = f"ip saddr {_set(rule.sources)} ip daddr {_set(rule.targets)}"
    reply = f"ip saddr {_set(rule.targets)} ip daddr {_set(rule.sources)}"
    not_opening = "tcp flags & (syn | ack) != syn"
    if rule.protocol == "all":
        return [f"{forward} accept{comment}",
                f"{reply} ip protocol != tcp accept{comment}",
                f"{reply} {not_opening} accept{comment}"]
    if rule.protocol == "icmp":
        return [f"{forward} ip protocol icmp accept{comment}",
                f"{reply} icmp type {{ echo-reply, destination-unreachable, time-exceeded }} accept{comment}"]
    if rule.protocol not in ("tcp", "udp"):
        raise ValueError(f"unsupported protocol {rule.protocol!r}")
    ports = f" {rule.protocol} dport {_set(rule.ports)}" if rule.ports else f" meta l4proto {rule.protocol}"
    back = f" {rule.protocol} sport {_set(rule.ports)}" if rule.ports else f" meta l4proto {rule.protocol}"
    tail = f" {not_opening}" if rule.protocol == "tcp" else ""
    return [f"{forward}{ports} accept{comment}", f"{reply}{back}{tail} accept{comment}"]


def render_tables(network: Bridge, rules: Sequence[Rule]) -> str:
    """The nftables script (`nft -f`) of a fleet's two tables."""
    ports = f'"{network.veth_prefix}*"'
    body = "\n".join(f"    {line}" for rule in rules for line in _rule_lines(rule))
    return f"""table bridge {network.table} {{
  chain from_node {{
    type filter hook forward priority 0; policy accept;
    iifname {ports} jump admit
    oifname {ports} jump admit
  }}
  chain to_caller {{
    type filter hook input priority 0; policy accept;
    iifname {ports} jump admit
  }}
  chain from_caller {{
    type filter hook output priority 0; policy accept;
    oifname {ports} jump admit
  }}
  chain admit {{
    ether type arp accept
    ether type != ip drop
{body}
    counter drop
  }}
}}
table inet {network.table} {{
  chain routed {{
    type filter hook forward priority 0; policy accept;
    iifname "{network.bridge}" oifname != "{network.bridge}" drop
    oifname "{network.bridge}" iifname != "{network.bridge}" drop
  }}
}}
"""
