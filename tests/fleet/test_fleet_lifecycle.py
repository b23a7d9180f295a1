"""Destructive end-to-end checks, each on a fleet of its own: preemption and recovery,
`down` (also with the local state lost), a changed host key, unreachable nodes, and
injection attempts through the shared paths.

These run loopback nodes on purpose: they reach into the loopback machinery (sshd pids,
ports, host key files, the node marker). The same verbs on isolated nodes are checked
in test_fleet_isolated.py."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest
from e2e_helpers import CliFleet, fleet_argv, leftovers, mounts_under, nothing_left

from fleet.fleetops import UP_LOCK
from fleet.providers.localnode import LocalNode, find_sshd, generate_ed25519_keypair

pytestmark = pytest.mark.slow
LOOPBACK = {"isolation": "loopback"}


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _listening_ports() -> set[int]:
    return {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def _sleepers(token: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [])[:2] == ["sleep", token]]


def test_preempt_then_up_restores_the_slot(make_fleet) -> None:
    fleet: CliFleet = make_fleet(3, local=LOOPBACK)
    fleet.up()
    before = fleet.nodes()
    victim = f"{fleet.name}-w2-g1"
    survivor = f"{fleet.name}-w1-g1"
    token = str(100000 + int(uuid.uuid4().int % 100000))  # a unique `sleep` argument
    for node in (victim, survivor):
        code, results = fleet.exec_json(f"setsid nohup sleep {token} >/dev/null 2>&1 < /dev/null & echo started",
                                        nodes=node)
        assert code == 0, results
    deadline = time.monotonic() + 5
    while len(_sleepers(token)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_sleepers(token)) == 2
    victim_mount = str(fleet.home(victim) / "shared")
    assert victim_mount in mounts_under(fleet.root)

    result = fleet.cli("preempt", victim)
    assert result.returncode == 0, result.stderr

    nodes = fleet.nodes()
    assert nodes[victim]["state"] == "PREEMPTED"
    assert all(info["state"] == "RUNNING" for name, info in nodes.items() if name != victim)
    assert victim_mount not in mounts_under(fleet.root)
    survivors = _sleepers(token)
    assert len(survivors) == 1, "the preempted node's process is gone, the other node's is not"
    assert psutil.Process(survivors[0]).environ().get("FLEET_LOCAL_NODE_NAME") == survivor
    assert _port_closed(before[victim]["port"])
    # The probe of `status` (with SSH) agrees; exec on the dead node is refused up front.
    assert {n["name"]: n["state"] for n in fleet.status()["nodes"]}[victim] == "PREEMPTED"

    data = fleet.up()
    replacement = f"{fleet.name}-w2-g2"
    assert data["created"] == [replacement]
    after = fleet.nodes()
    assert sorted(after) == sorted([*(n for n in before if n != victim), replacement])
    assert after[replacement]["generation"] == 2 and after[replacement]["state"] == "RUNNING"
    for name in before:
        if name != victim:
            assert (after[name]["port"], after[name]["generation"]) == (before[name]["port"], before[name]["generation"])
    assert len(_sleepers(token)) == 1, "up did not touch the other nodes' processes"
    code, results = fleet.exec_json('cat "$FLEET_SHARED/probe" 2>/dev/null; echo $FLEET_NODE_NAME > "$FLEET_SHARED/probe"',
                                    nodes=replacement)
    assert code == 0, results
    assert (fleet.home(fleet.head) / "shared" / "probe").read_text().strip() == replacement

    again = fleet.up()
    assert again["created"] == [] and again["deleted"] == []
    assert sorted(fleet.nodes()) == sorted(after)


def test_down_leaves_nothing(make_fleet) -> None:
    fleet: CliFleet = make_fleet(3, local=LOOPBACK)
    fleet.up()
    ports = [n["port"] for n in fleet.nodes().values()]
    assert leftovers(fleet.root, fleet.name)["mounts"], "the workers' mounts exist before down"
    result = fleet.cli("down", "--yes")
    assert result.returncode == 0, result.stderr
    assert nothing_left(leftovers(fleet.root, fleet.name)), leftovers(fleet.root, fleet.name)
    assert all(_port_closed(port) for port in ports)
    assert not set(ports) & _listening_ports()
    assert not (fleet.root / fleet.name).exists() or not any((fleet.root / fleet.name).iterdir())
    assert not (fleet.state_dir / "id_ed25519").exists() and not (fleet.state_dir / "mount_ed25519").exists()
    assert fleet.status()["nodes"] == []
    # idempotent
    assert fleet.cli("down", "--yes").returncode == 0
    # and the fleet can come back: new machines under the old names are set up afresh
    fleet.up()
    for name in [fleet.head, *fleet.workers()]:
        assert (fleet.home(name) / "scratch" / "setup.txt").read_text().strip() == f"set up {name}"
    assert len(leftovers(fleet.root, fleet.name)["mounts"]) == 3


def test_down_after_losing_the_local_state(make_fleet) -> None:
    fleet: CliFleet = make_fleet(2, local=LOOPBACK)
    fleet.up()
    ports = [n["port"] for n in fleet.nodes().values()]
    shutil.rmtree(fleet.dir / ".fleet")
    result = fleet.cli("down", "--yes")
    assert result.returncode == 0, result.stderr
    assert nothing_left(leftovers(fleet.root, fleet.name)), leftovers(fleet.root, fleet.name)
    assert all(_port_closed(port) for port in ports)


def test_down_finds_nodes_whose_directories_were_deleted(make_fleet) -> None:
    fleet: CliFleet = make_fleet(1, local=LOOPBACK)
    fleet.up()
    ports = [n["port"] for n in fleet.nodes().values()]
    worker = fleet.workers()[0]
    for point in mounts_under(fleet.root):  # deleting a mounted directory would walk into the head
        subprocess.run(["fusermount3", "-u", "-z", point], check=False)
    shutil.rmtree(fleet.node_dir(worker))
    result = fleet.cli("down", "--yes")
    assert result.returncode == 0, result.stderr
    assert nothing_left(leftovers(fleet.root, fleet.name)), leftovers(fleet.root, fleet.name)
    assert all(_port_closed(port) for port in ports)


def _restart_with_new_host_key(node_dir: Path) -> None:
    local = LocalNode.load(node_dir)
    assert local is not None
    pid = local.listener_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while local.is_running() and time.monotonic() < deadline:
        time.sleep(0.02)
    for suffix in ("", ".pub"):
        (local.sshd_dir / f"host_key{suffix}").unlink()
    generate_ed25519_keypair(local.sshd_dir / "host_key", "impostor")
    # Same config, same port. A connection's sshd child forked just before the SIGKILL can
    # hold the listening socket for a moment: the port is free again once it is gone.
    deadline = time.monotonic() + 10
    while True:
        started, log = local._start_sshd(find_sshd())
        if started or "Address already in use" not in log or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert started, log


def test_changed_host_key_is_refused(make_fleet) -> None:
    fleet: CliFleet = make_fleet(2, local=LOOPBACK)
    fleet.up()
    victim = f"{fleet.name}-w1-g1"
    port = fleet.nodes()[victim]["port"]
    _restart_with_new_host_key(fleet.node_dir(victim))
    assert fleet.nodes()[victim]["port"] == port
    code, results = fleet.exec_json("echo ok")
    assert code == 1
    assert results[victim]["exit_code"] is None or results[victim]["exit_code"] != 0
    error = results[victim]["error"] or ""
    assert "host key" in error and "changed" in error, results[victim]
    assert all(r["stdout"].strip() == "ok" for n, r in results.items() if n != victim)
    plain = fleet.cli("exec", "--", "true")
    assert plain.returncode == 1 and victim in plain.stderr and "Traceback" not in plain.stderr
    # plain OpenSSH with the fleet's ssh_config refuses it too
    openssh = subprocess.run(["ssh", "-F", str(fleet.state_dir / "ssh_config"), "-o", "BatchMode=yes", victim, "true"],
                             check=False, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert openssh.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in openssh.stderr.upper()


def test_unreachable_nodes_fail_alone_within_the_timeout(make_fleet) -> None:
    fleet: CliFleet = make_fleet(3, ssh={"connect_timeout": 3}, local=LOOPBACK)
    fleet.up()
    stopped, killed = f"{fleet.name}-w1-g1", f"{fleet.name}-w3-g1"
    stopped_sshd = LocalNode.load(fleet.node_dir(stopped)).listener_pid()
    killed_sshd = LocalNode.load(fleet.node_dir(killed)).listener_pid()
    os.kill(stopped_sshd, signal.SIGSTOP)
    os.kill(killed_sshd, signal.SIGKILL)  # behind the provider's back
    try:
        started = time.monotonic()
        code, results = fleet.exec_json("echo ok", nodes=",".join([fleet.head, stopped, killed, f"{fleet.name}-w2-g1"]),
                                        timeout=60)
        elapsed = time.monotonic() - started
        assert code == 1
        assert results[fleet.head]["stdout"].strip() == "ok"
        assert results[f"{fleet.name}-w2-g1"]["stdout"].strip() == "ok"
        for name in (stopped, killed):
            assert results[name]["error"], results[name]
        # 3 s connect timeout (plus CLI start-up and a busy machine), not a hang
        assert elapsed < 15, elapsed
        started = time.monotonic()
        states = {n["name"]: n["state"] for n in fleet.status()["nodes"]}
        assert time.monotonic() - started < 15
        assert states[stopped] == "UNREACHABLE"
        assert states[killed] in ("TERMINATED", "UNREACHABLE")
        assert states[fleet.head] == "RUNNING"
    finally:
        os.kill(stopped_sshd, signal.SIGCONT)


def test_injection_through_shared_paths_and_setup_environment(make_fleet, tmp_path: Path) -> None:
    marker = tmp_path / "injected"
    nasty = f"my shared $(touch {marker}) `touch {marker}`; touch {marker}"
    fleet: CliFleet = make_fleet(
        2,
        local=LOOPBACK,
        shared={"path": f"{nasty} head", "mount": f"{nasty} mnt"},
        setup=['printf "%s" "$FLEET_SHARED" > fleet-shared.txt', "printf '%s' \"$FLEET_NODE_NAME\" > name.txt"],
    )
    fleet.up()
    assert not marker.exists()
    head_dir = fleet.home(fleet.head) / f"{nasty} head"
    assert head_dir.is_dir()
    assert (fleet.home(fleet.head) / "fleet-shared.txt").read_text() == str(head_dir)
    for worker in fleet.workers():
        mount = fleet.home(worker) / f"{nasty} mnt"
        assert (fleet.home(worker) / "fleet-shared.txt").read_text() == str(mount)
        assert str(mount) in mounts_under(fleet.root)
    code, results = fleet.exec_json('echo "$FLEET_NODE_NAME" > "$FLEET_SHARED/$FLEET_NODE_NAME"', nodes="workers")
    assert code == 0, results
    assert sorted(os.listdir(head_dir)) == fleet.workers()
    assert not marker.exists()


def test_two_concurrent_ups_of_one_fleet_do_not_race(make_fleet) -> None:
    fleet: CliFleet = make_fleet(1, local=LOOPBACK)
    fleet.state_dir.mkdir(parents=True, exist_ok=True)
    # Hold the lock while both start, so that they overlap whatever this machine's load.
    held = os.open(fleet.state_dir / UP_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    logs = [fleet.dir / f"up{i}.err" for i in range(2)]
    ups = [subprocess.Popen([*fleet_argv(), "up", "-f", str(fleet.spec)], cwd=fleet.dir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True) for log in logs]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all("is running: waiting for it" in log.read_text()
                                                       for log in logs):
            assert all(up.poll() is None for up in ups), [log.read_text() for log in logs]
            time.sleep(0.1)
        assert all("another `fleet up` of this fleet is running" in log.read_text() for log in logs), \
            [log.read_text() for log in logs]
        assert not fleet.root.exists() or not any(fleet.root.rglob("node.json"))  # nothing made while waiting
    finally:
        os.close(held)
        codes = [up.wait(timeout=300) for up in ups]
    assert codes == [0, 0], [log.read_text() for log in logs]
    nodes = set(fleet.nodes())
    assert nodes == {fleet.head, f"{fleet.name}-w1-g1"}
    events = fleet.json("events")
    # Each node was created and got its runtime once: the second `up` found them complete.
    for kind in ("requested", "runtime"):
        assert sorted(e["node"] for e in events if e["kind"] == kind) == sorted(nodes), (kind, events)
