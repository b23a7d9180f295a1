"""Isolated local nodes on their own (no CLI): the boot order and the network policy.

Real namespaces, a real bridge and nftables; every test removes its fleet's network
(namespaces, veths, bridge, tables) also when it fails."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.model import DATA_MOUNT
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


@contextlib.contextmanager
def loop_disk(path: Path, size_mb: int = 64) -> Iterator[str]:
    """A blank block device (a loop device over a sparse file): a cloud's new disk."""
    with open(path, "wb") as image:
        image.truncate(size_mb << 20)
    device = subprocess.run(["losetup", "--find", "--show", str(path)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        yield device
    finally:
        for _ in range(100):  # the node's mount of it goes with its mount namespace, soon after its init
            if subprocess.run(["losetup", "-d", device], check=False, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def _startups(node: IsolatedNode) -> int:
    log = node.console / "boot.log"
    return log.read_text(errors="replace").count("startup script begins") if log.exists() else 0


def _attach_when_booting(node: IsolatedNode, device: str, name: str, boot: threading.Thread, before: int) -> None:
    """The disk appears in the node's /dev while its startup script waits for it (a
    cloud attaches a disk to a booting instance the same way: some time after boot)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and boot.is_alive():
        if node.init_pid and _startups(node) > before:
            os.mknod(f"/proc/{node.init_pid}/root/dev/{name}", stat.S_IFBLK | 0o600, os.stat(device).st_rdev)
            return
        time.sleep(0.05)
    raise AssertionError(f"the node did not start its startup script: {node.boot_problem()}")


@pytest.mark.skipif(shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None
                    or not os.path.exists("/dev/loop-control"), reason="needs loop devices and mkfs.ext4")
def test_a_blank_data_disk_is_formatted_once_and_mounted_on_every_boot(fleet_root: tuple[Path, str],
                                                                        tmp_path: Path) -> None:
    """The cloud path of the head's data disk (blkid, mkfs.ext4, mount), which the
    providers' fakes skip by bind-mounting a directory: run by the real startup script
    in an isolated node, on a real block device."""
    root, name = fleet_root
    public = generate_ed25519_keypair(tmp_path / "id_ed25519", "ns-test")
    script = render_startup_script(provider="local", fleet_name=name, node=f"{name}-head", role="head",
                                   user="root", public_key=public, ssh_port=22, data_disk=True,
                                   data_devices=["/dev/fleet-test-data"])
    node = IsolatedNode.reserve(root, name=f"{name}-head", fleet=name, user="root")
    with loop_disk(tmp_path / "disk.img") as device:
        def booted(action: object) -> None:
            before = _startups(node)
            thread = threading.Thread(target=action)
            thread.start()
            _attach_when_booting(node, device, "fleet-test-data", thread, before)
            thread.join(90)
            assert not thread.is_alive() and node.is_running(), node.boot_problem()
            mounts = (Path(f"/proc/{node.init_pid}/mounts")).read_text().splitlines()
            assert any(line.split()[1] == DATA_MOUNT and line.split()[2] == "ext4" for line in mounts), mounts
            assert node.host_path("/etc/fleet/data").read_text().strip() == DATA_MOUNT
            assert not node.host_path("/etc/fleet/data.error").exists()

        booted(lambda: node.start(script, boot_timeout=60))
        label = subprocess.run(["blkid", "-s", "LABEL", "-o", "value", device], check=True, capture_output=True,
                               text=True)
        assert label.stdout.strip() == "fleet-data"  # formatted: it was blank
        node.host_path(DATA_MOUNT).joinpath("kept.txt").write_text("outputs\n")
        mac = node.host_path("/sys/class/net/eth0/address").read_text()
        node.kill(preempted=False)  # stopped; its disk stays
        booted(lambda: node.boot(boot_timeout=60))
        assert node.host_path(DATA_MOUNT).joinpath("kept.txt").read_text() == "outputs\n"  # not formatted again
        assert node.host_path("/sys/class/net/eth0/address").read_text() == mac  # its NIC, as a cloud's, is kept
        node.destroy()
