"""Isolated local nodes on their own (no CLI): the boot order and the network policy.

Real namespaces, a real bridge and nftables; every test removes its fleet's network
(namespaces, veths, bridge, tables) also when it fails."""

from __future__ import annotations

import contextlib
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.providers.localnode import generate_ed25519_keypair
from fleet.providers.localns import FleetNetwork, IsolatedNode, missing_for_namespaces
from fleet.providers.startup import render_startup_script
from fleet.ssh import Executor, HostKeyStore, Target

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_for_namespaces() is not None,
                       reason=f"isolated nodes need root and their tools: {missing_for_namespaces()}"),
]


@pytest.fixture
def fleet_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root, name = tmp_path / "nodes", f"ns{uuid.uuid4().hex[:8]}"
    try:
        yield root, name
    finally:
        for node in IsolatedNode.list(root, name):
            with contextlib.suppress(Exception):
                node.destroy()
        FleetNetwork.of(root, name).remove()


def _refused(address: str, port: int = 22) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((address, port)) != 0


def test_a_node_answers_ssh_only_after_its_startup_script(fleet_root: tuple[Path, str], tmp_path: Path) -> None:
    root, name = fleet_root
    key = tmp_path / "id_ed25519"
    public = generate_ed25519_keypair(key, "ns-test")
    rendered = render_startup_script(provider="local", fleet_name=name, node=f"{name}-head", role="head",
                                     user="root", public_key=public, ssh_port=22)
    # The real script, made slow: the node must not answer SSH while it runs.
    slow = rendered.replace("set -u\n", "set -u\ntouch /run/fleet-console/started; sleep 2\n", 1)
    assert slow != rendered
    created: list[IsolatedNode] = []
    thread = threading.Thread(target=lambda: created.append(IsolatedNode.create_isolated(
        root, name=f"{name}-head", fleet=name, user="root", startup_script=slow)))
    thread.start()
    console = root / name / f"{name}-head" / "console"
    probes = 0
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        if (console / "started").exists() and not (console / "startup.rc").exists():
            address = (root / name / f"{name}-head" / "node.json").read_text().split('"address": "')[1].split('"')[0]
            assert _refused(address), "sshd answered while the startup script was still running"
            probes += 1
        time.sleep(0.2)
    thread.join(timeout=60)
    assert created, "the node did not boot"
    node = created[0]
    assert probes >= 3, probes
    assert (console / "startup.rc").read_text().strip() == "0"
    executor = Executor(key, HostKeyStore(tmp_path / "known_hosts"), connect_timeout=5)
    try:
        target = Target(name=node.name, address=node.address, port=22, user="root", host_key=node.host_key_line,
                        trust_on_first_use=False)
        result = executor.run([target], "cat ~/.ssh/authorized_keys").results[node.name]
        assert result.ok, result.describe()
        assert public.split()[1] in result.stdout
    finally:
        executor.close()


def test_nodes_reach_each_other_and_nothing_outside_the_bridge(fleet_root: tuple[Path, str], tmp_path: Path) -> None:
    root, name = fleet_root
    key = tmp_path / "id_ed25519"
    public = generate_ed25519_keypair(key, "ns-test")
    nodes = [IsolatedNode.create_isolated(
        root, name=f"{name}-{i}", fleet=name, user="root",
        startup_script=render_startup_script(provider="local", fleet_name=name, node=f"{name}-{i}", role="worker",
                                             user="root", public_key=public, ssh_port=22)) for i in (1, 2)]
    executor = Executor(key, HostKeyStore(tmp_path / "known_hosts"), connect_timeout=5)
    # Servers of this machine: one on its loopback, one on every address (the bridge's too).
    on_loopback, on_all = socket.socket(), socket.socket()
    on_loopback.bind(("127.0.0.1", 0))
    on_all.bind(("0.0.0.0", 0))
    for server in (on_loopback, on_all):
        server.listen()
    try:
        target = Target(name=nodes[0].name, address=nodes[0].address, port=22, user="root",
                        host_key=nodes[0].host_key_line, trust_on_first_use=False)
        caller = FleetNetwork.of(root, name).host_address()
        probe = (
            "import socket, sys\n"
            "def reach(host, port):\n"
            "    s = socket.socket(); s.settimeout(2)\n"
            "    try:\n"
            "        s.connect((host, port)); return 'open'\n"
            "    except OSError as e:\n"
            "        return type(e).__name__\n"
            f"print(reach('{nodes[1].address}', 22), reach('127.0.0.1', {on_loopback.getsockname()[1]}), "
            f"reach('{caller}', {on_all.getsockname()[1]}))\n"
        )
        result = executor.run([target], f"python3 -c {shlex.quote(probe)}; ip route").results[nodes[0].name]
        assert result.ok, result.describe()
        lines = result.stdout.splitlines()
        peer, own_loopback, bridge_host = lines[0].split()
        assert peer == "open"  # the other node's sshd, across the bridge
        assert own_loopback != "open"  # the node's loopback is its own, not this machine's
        assert bridge_host != "open"  # the caller's side of the bridge opens nothing to the nodes
        assert not any(line.startswith("default") for line in lines[1:]), lines
    finally:
        executor.close()
        on_loopback.close()
        on_all.close()
