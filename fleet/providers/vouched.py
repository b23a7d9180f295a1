"""Host keys as the cloud vouches for them, read before the first SSH connection.

An address answering SSH proves nothing: whoever answers first on the path would be
pinned. So a cloud node's host key is read through the cloud's API, authenticated by
the fleet's credentials over TLS, from what the node itself published at boot:

- GCE: the guest agent writes the node's public host keys to the guest attributes
  `hostkeys/<type>` (the instance has metadata `enable-guest-attributes=TRUE`);
- EC2: cloud-init prints them to the serial console between `-----BEGIN SSH HOST KEY
  KEYS-----` and `-----END SSH HOST KEY KEYS-----` (`GetConsoleOutput`).

Only public keys travel, and nothing secret is put into metadata or user-data. This
module holds what both providers share: choosing one key, parsing the console block,
and polling per node until the key appears or the time is up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from fleet.errors import FleetError, HostKeyError
from fleet.model import Node
from fleet.ssh.hostkeys import normalize_key_line

# The type the executor negotiates first; others only when a node offers no ed25519 key.
PREFERRED_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
CONSOLE_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
CONSOLE_END = "-----END SSH HOST KEY KEYS-----"
POLL_S = 1.0


def pick_host_key(lines: Iterable[str]) -> str | None:
    """The preferred valid key line ("type base64") among `lines`, or None."""
    keys: dict[str, str] = {}
    for line in lines:
        try:
            key = normalize_key_line(line)
        except HostKeyError:
            continue
        keys.setdefault(key.split()[0], key)
    return next((keys[t] for t in PREFERRED_TYPES if t in keys), None)


def console_host_keys(output: str) -> list[str]:
    """The key lines of the last host-key block cloud-init printed on the console."""
    if CONSOLE_BEGIN not in output:
        return []
    block = output.rsplit(CONSOLE_BEGIN, 1)[1].split(CONSOLE_END, 1)
    if len(block) < 2:
        return []  # the block is still being written
    return [line.strip() for line in block[0].splitlines() if line.strip()]


def poll_host_keys(
    nodes: Sequence[Node],
    fetch: Callable[[Node], list[str]],
    *,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    parallelism: int = 16,
) -> dict[str, str]:
    """Call `fetch(node)` (its published key lines) until a key appears, per node in
    parallel, for at most `timeout` seconds. API errors count as "not yet"."""
    deadline = time.monotonic() + timeout

    def one(node: Node) -> tuple[str, str | None]:
        while True:
            try:
                key = pick_host_key(fetch(node))
            except FleetError:
                key = None
            if key is not None or time.monotonic() >= deadline:
                return node.name, key
            sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    if not nodes:
        return {}
    with ThreadPoolExecutor(max_workers=min(parallelism, len(nodes))) as pool:
        found = dict(pool.map(one, nodes))
    return {name: key for name, key in found.items() if key is not None}
