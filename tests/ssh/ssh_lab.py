"""Fixtures of the SSH tests: real OpenSSH servers on loopback (fleet's LocalNode).

Every node a fixture starts is destroyed in a `finally`, also when the test fails.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.errors import SSHError
from fleet.providers.localnode import LocalNode, find_sshd, generate_ed25519_keypair
from fleet.ssh import Executor, HostKeyStore, Target


@dataclass
class SshLab:
    """A directory with the fleet's key, a known_hosts store and local sshd nodes."""

    root: Path
    key: Path
    public_key: str
    store: HostKeyStore
    nodes: list[LocalNode] = field(default_factory=list)
    executors: list[Executor] = field(default_factory=list)

    def node(self, name: str, *, port: int = 0, authorized_keys: list[str] | None = None) -> LocalNode:
        node = LocalNode.create(
            self.root / "nodes",
            name=name,
            fleet="sshtest",
            port=port,
            authorized_keys=authorized_keys if authorized_keys is not None else [self.public_key],
        )
        self.nodes.append(node)
        return node

    def target(
        self, node: LocalNode, *, name: str | None = None, tofu: bool = True, host_key: str | None = None
    ) -> Target:
        return Target(
            name or node.name, node.address, node.port, node.user, host_key=host_key, trust_on_first_use=tofu
        )

    def executor(self, **options: object) -> Executor:
        executor = Executor(self.key, self.store, **options)  # type: ignore[arg-type]
        self.executors.append(executor)
        return executor

    def destroy(self, node: LocalNode) -> None:
        node.destroy()
        if node in self.nodes:
            self.nodes.remove(node)

    def close(self) -> None:
        for executor in self.executors:
            with contextlib.suppress(SSHError):
                executor.close()
        for node in self.nodes:
            node.destroy()


def _new_lab(root: Path) -> SshLab:
    find_sshd()
    key = root / "fleet_key"
    public = generate_ed25519_keypair(key, "fleet-ssh-tests")
    return SshLab(root=root, key=key, public_key=public, store=HostKeyStore(root / "known_hosts"))


@pytest.fixture
def lab() -> Iterator[SshLab]:
    """A fresh lab per test (nodes created inside the test are cleaned up)."""
    root = Path(tempfile.mkdtemp(prefix="fleet-ssh-test-"))
    lab = _new_lab(root)
    try:
        yield lab
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def trio() -> Iterator[SshLab]:
    """Three nodes shared by the tests of one module (tests must not change them)."""
    root = Path(tempfile.mkdtemp(prefix="fleet-ssh-trio-"))
    lab = _new_lab(root)
    try:
        for index in range(3):
            lab.node(f"trio-n{index}")
        yield lab
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def trio_targets(trio: SshLab) -> list[Target]:
    return [trio.target(node) for node in trio.nodes]


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def hung_listener() -> Iterator[int]:
    """A port that accepts TCP connections and never says anything (a hung sshd)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        server.close()


@pytest.fixture
def accepted_logins() -> Callable[[LocalNode], int]:
    """How many logins a node's sshd has accepted (its log's 'Accepted publickey' lines)."""

    def count(node: LocalNode) -> int:
        log = node.sshd_dir / "sshd.log"
        return log.read_text().count("Accepted publickey") if log.exists() else 0

    return count
