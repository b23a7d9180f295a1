"""Isolated local nodes through the CLI: every node a machine of its own (network, mount
and PID namespaces on a bridge of the fleet's), booted by the cloud's startup script.

One fleet (head + 2 workers) serves the module in order: the read-only checks first,
then a preemption and its replacement, then `down`. A second, one-node fleet checks
`down` after both the local state and the node records are lost."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from e2e_helpers import CliFleet, leftovers, network_leftovers, new_fleet, nothing_left

import fleet as fleet_package
from fleet.model import DATA_MOUNT
from fleet.providers.localns import missing_for_namespaces

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_for_namespaces() is not None,
                       reason=f"isolated nodes need root and their tools: {missing_for_namespaces()}"),
]


@pytest.fixture(scope="module")
def isolated() -> Iterator[CliFleet]:
    base = Path(tempfile.mkdtemp(prefix="fleet-iso-"))
    fleet = new_fleet(base, 2, local={"isolation": "namespaces"})
    try:
        fleet.up()
        yield fleet
    finally:
        fleet.teardown()
        shutil.rmtree(base, ignore_errors=True)


def _node(fleet: CliFleet, name: str) -> dict:
    return fleet.nodes()[name]


def test_status_shows_the_mode_and_bridge_addresses(isolated: CliFleet) -> None:
    data = isolated.status()
    assert data["isolation"] == "namespaces"
    addresses = {n["address"] for n in data["nodes"]}
    assert len(addresses) == 3 and all(a.startswith("10.250.") for a in addresses), addresses
    assert all(n["port"] == 22 and n["state"] == "RUNNING" for n in data["nodes"])
    table = isolated.cli("status").stdout
    assert "namespaces isolation" in table


def test_a_worker_cannot_see_the_control_plane(isolated: CliFleet) -> None:
    worker = isolated.workers()[0]
    secrets = {
        "fleet key": isolated.state_dir / "id_ed25519",
        "checkout": Path(fleet_package.__file__).resolve(),
        "virtualenv": Path(sys.executable).resolve(),
        "node records": isolated.node_dir(worker) / "node.json",
        "spec": isolated.spec,
    }
    for what, path in secrets.items():
        assert path.exists(), path  # on this machine...
        code, results = isolated.exec_json(f"cat {path} >/dev/null 2>&1 && echo readable || echo hidden",
                                           nodes=worker)
        assert code == 0, results
        assert results[worker]["stdout"].strip() == "hidden", f"the {what} ({path}) is readable on {worker}"
    # ...while the image (the host's system, read-only beneath the node's own writes) is there.
    token = uuid.uuid4().hex
    code, results = isolated.exec_json(
        f"test -x /usr/bin/ssh && test -d /opt && test -r /etc/os-release && echo {token} > /etc/fleet-probe "
        "&& cat /etc/fleet-probe && id -u", nodes=worker)
    assert code == 0, results
    assert results[worker]["stdout"].split() == [token, "0"]
    assert not Path("/etc/fleet-probe").exists(), "a node's write reached the host's /etc"
    assert (isolated.node_dir(worker) / "upper" / "etc" / "fleet-probe").read_text().strip() == token


def test_the_startup_script_ran_on_every_node_before_sshd(isolated: CliFleet) -> None:
    public_key = (isolated.state_dir / "id_ed25519.pub").read_text().split()[1]
    for name in [isolated.head, *isolated.workers()]:
        console = isolated.node_dir(name) / "console"
        assert (console / "startup.rc").read_text().strip() == "0", (console / "startup.log").read_text()
        boot = (console / "boot.log").read_text().splitlines()
        steps = [line.split(" ", 1)[1] for line in boot]
        assert steps == ["startup script begins", "startup script ended with 0", "sshd started"], boot
        # what the script did: the fleet's key for the SSH user, user_allow_other for FUSE
        assert public_key in (isolated.home(name) / ".ssh" / "authorized_keys").read_text()
        assert "user_allow_other" in (isolated.node_dir(name) / "upper" / "etc" / "fuse.conf").read_text()
        # the host key pinned is the one the node recorded at boot, a key of its own
        recorded = (console / "host_key.pub").read_text().split()[1]
        assert recorded in (isolated.state_dir / "known_hosts").read_text()
    keys = {(isolated.node_dir(n) / "console" / "host_key.pub").read_text() for n in [isolated.head, *isolated.workers()]}
    assert len(keys) == 3


def test_the_share_account_is_the_isolated_heads_own(isolated: CliFleet) -> None:
    """issue 11's confinement on an isolated head: the share account, its chroot and its
    Match block live in the head's own /etc and /srv (its sshd reads the drop-in), never
    on this machine; the workers mount through it."""
    head = isolated.node_dir(isolated.head)
    code, results = isolated.exec_json("cat ~/.fleet/share.json", nodes=isolated.workers()[0])
    assert code == 0, results
    share = json.loads(results[isolated.workers()[0]]["stdout"])
    account = share["user"]
    assert share["confined"] and account.startswith("fs-"), share
    assert f"\n{account}:" in "\n" + (head / "upper" / "etc" / "passwd").read_text()
    assert f"\n{account}:" not in "\n" + Path("/etc/passwd").read_text(), "the share account was made on the host"
    drop_in = head / "upper" / "etc" / "ssh" / "sshd_config.d" / f"fleet-share-{account}.conf"
    block = drop_in.read_text()
    assert f"Match User {account}" in block and "ChrootDirectory" in block and "ForceCommand internal-sftp" in block
    assert not Path(f"/etc/ssh/sshd_config.d/fleet-share-{account}.conf").exists()
    # The chroot in the head's own /srv is a link to its data disk (mounted at DATA_MOUNT inside
    # the head; the fleet's .data/ directory here, outside the head's), which holds the shared files.
    assert os.readlink(head / "upper" / "srv" / "fleet-share" / account) == DATA_MOUNT
    assert (isolated.root / isolated.name / ".data" / "shared").is_dir()
    assert isolated.shared_dir() == Path(f"/proc/{json.loads((head / 'node.json').read_text())['init_pid']}/root"
                                         f"{DATA_MOUNT}/shared")


def test_two_nodes_serve_on_the_same_port(isolated: CliFleet) -> None:
    workers = isolated.workers()
    serve = ('mkdir -p www && echo "$FLEET_NODE_NAME" > www/who && cd www || exit 1; '
             'setsid nohup python3 -m http.server 8765 --bind 0.0.0.0 >/dev/null 2>&1 < /dev/null & '
             'for i in $(seq 100); do python3 -c "import socket; socket.create_connection((\'127.0.0.1\', 8765), 1)" '
             '2>/dev/null && exit 0; sleep 0.1; done; exit 1')
    code, results = isolated.exec_json(serve, nodes="workers")
    assert code == 0, results
    addresses = {name: _node(isolated, name)["address"] for name in workers}
    fetch = "; ".join(f"python3 -c \"import urllib.request; print(urllib.request.urlopen('http://{a}:8765/who', "
                      f"timeout=10).read().decode().strip())\"" for a in addresses.values())
    code, results = isolated.exec_json(fetch, nodes="head")
    assert code == 0, results
    assert results[isolated.head]["stdout"].split() == list(addresses)
    # The caller reaches the nodes' SSH only (the local provider's VPC-like default).
    for address in addresses.values():
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, 8765)) != 0, f"the caller reached {address}:8765"


def test_preempt_leaves_nothing_of_the_node(isolated: CliFleet) -> None:
    victim, survivor = f"{isolated.name}-w2-g1", f"{isolated.name}-w1-g1"
    token = str(200000 + uuid.uuid4().int % 100000)
    for node in (victim, survivor):
        code, results = isolated.exec_json(f"setsid nohup sleep {token} >/dev/null 2>&1 < /dev/null & echo ok",
                                           nodes=node)
        assert code == 0, results
    assert "/root/shared" in isolated.node_mounts(victim)
    record = json.loads((isolated.node_dir(victim) / "node.json").read_text())
    init = record["init_pid"]
    key_netns = [ns for ns in network_leftovers(isolated.root, isolated.name)["namespaces"]
                 if ns.endswith(record["nid"])]
    assert len(key_netns) == 1, record
    victim_pids = set(psutil.Process(init).children(recursive=True)) | {psutil.Process(init)}

    result = isolated.cli("preempt", victim)
    assert result.returncode == 0, result.stderr

    assert _node(isolated, victim)["state"] == "PREEMPTED"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in victim_pids)
    left = network_leftovers(isolated.root, isolated.name)
    assert key_netns[0] not in left["namespaces"]
    assert not any(link.endswith(record["nid"]) for link in left["links"]), left
    sleepers = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[:2] == ["sleep", token]]
    assert len(sleepers) == 1, "the preempted node's process is gone, the survivor's is not"
    assert "/root/shared" in isolated.node_mounts(survivor)

    data = isolated.up()
    replacement = f"{isolated.name}-w2-g2"
    assert data["created"] == [replacement]
    assert "/root/shared" in isolated.node_mounts(replacement)
    code, results = isolated.exec_json('echo "$FLEET_NODE_NAME" > "$FLEET_SHARED/probe"', nodes=replacement)
    assert code == 0, results
    assert (isolated.shared_dir() / "probe").read_text().strip() == replacement


def test_down_leaves_no_namespace_link_table_process_or_mount(isolated: CliFleet) -> None:
    before = leftovers(isolated.root, isolated.name)
    assert before["namespaces"] and before["links"] and before["nft_tables"] and before["processes"], before
    result = isolated.cli("down", "--yes")
    assert result.returncode == 0, result.stderr
    after = leftovers(isolated.root, isolated.name)
    assert nothing_left(after), after
    assert not (isolated.root / isolated.name).exists() or not any((isolated.root / isolated.name).iterdir())


def test_down_after_losing_the_local_state_and_the_node_records(tmp_path: Path) -> None:
    fleet = new_fleet(tmp_path, 1, local={"isolation": "namespaces"})
    try:
        fleet.up()
        assert leftovers(fleet.root, fleet.name)["namespaces"]
        shutil.rmtree(fleet.dir / ".fleet")
        shutil.rmtree(fleet.root / fleet.name)
        result = fleet.cli("down", "--yes")
        assert result.returncode == 0, result.stderr
        after = leftovers(fleet.root, fleet.name)
        assert nothing_left(after), after
    finally:
        fleet.teardown()
