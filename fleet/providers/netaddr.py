"""Who may reach the fleet's SSH port: the firewall rule / security group source ranges.

The default is the caller's public address as a /32, found by asking a public "what is
my IP" service. Detection is a plain function passed in to the providers, so that tests
(which always pass explicit `source_ranges`) never reach the network.
"""

from __future__ import annotations

import ipaddress
import urllib.request
from collections.abc import Callable, Iterable, Sequence

from fleet.errors import ProviderError, SpecError

AddressDetector = Callable[[], str]

_ECHO_SERVICES = ("https://checkip.amazonaws.com", "https://api.ipify.org")


def detect_public_address(timeout: float = 5.0) -> str:
    """The caller's public IPv4 address, as seen by a public echo service."""
    problems = []
    for url in _ECHO_SERVICES:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                text = response.read(64).decode().strip()
            return str(ipaddress.ip_address(text))
        except (OSError, ValueError) as exc:
            problems.append(f"{url}: {exc}")
    raise ProviderError(
        "could not find this machine's public address to open SSH to it only",
        hint="set `source_ranges: [ADDRESS/32]` in the provider block; " + "; ".join(problems),
    )


def validate_ranges(ranges: Sequence[str], *, field: str) -> list[str]:
    """Normalised CIDR ranges, or a SpecError naming the bad one."""
    checked = []
    for value in ranges:
        try:
            checked.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError:
            raise SpecError(
                f"not an address range: {value!r}", field=field, hint="e.g. 203.0.113.7/32"
            ) from None
    if not checked:
        raise SpecError("source_ranges is empty: nobody could reach the nodes", field=field)
    return checked


def canonical_ranges(ranges: Iterable[str]) -> set[str]:
    """Ranges as the cloud may spell them (case, host bits), in the form
    `resolve_source_ranges` gives, to compare what a rule admits with what it should."""
    return {str(ipaddress.ip_network(r, strict=False)) for r in ranges}


def resolve_source_ranges(
    configured: Sequence[str] | None, detect: AddressDetector | None, *, field: str
) -> list[str]:
    """The configured ranges, or the caller's address /32 found by `detect`."""
    if configured is not None:
        return validate_ranges(configured, field=field)
    address = (detect or detect_public_address)()
    return [str(ipaddress.ip_network(f"{address}/32" if ":" not in address else f"{address}/128"))]
