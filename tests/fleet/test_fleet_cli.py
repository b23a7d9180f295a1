"""One fleet (head + 3 workers, real sshd and sshfs), many read-only checks through the CLI:
status, exec on all nodes and on subsets, FLEET_* variables, the shared directory in
both directions, `fleet ssh`, the key and ssh_config files, quoting, convergence."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import time
import uuid

import pytest
from e2e_helpers import CliFleet

pytestmark = pytest.mark.slow

NODE_KEYS = {"name", "role", "state", "address", "zone", "spot", "generation"}
# Which node answers: a loopback node's sshd says so in the environment, an isolated node is a host of its own.
IDENTITY = '"${FLEET_LOCAL_NODE_NAME:-$(hostname)}"'


def test_status_json_shape(shared_fleet: CliFleet) -> None:
    data = shared_fleet.status()
    assert data["name"] == shared_fleet.name
    assert data["provider"] == "local"
    assert data["isolation"] == ("namespaces" if os.geteuid() == 0 else "loopback")
    nodes = data["nodes"]
    assert [n["name"] for n in nodes] == [shared_fleet.head] + [f"{shared_fleet.name}-w{i}-g1" for i in (1, 2, 3)]
    for node in nodes:
        assert NODE_KEYS <= set(node), node
        assert node["state"] == "RUNNING"
        if shared_fleet.isolated:
            assert ipaddress.ip_address(node["address"]) in ipaddress.ip_network("10.250.0.0/16")
        else:
            assert node["address"] == "127.0.0.1"
        assert node["zone"] == "local"
        assert node["generation"] == 1
        assert isinstance(node["spot"], bool)
    assert [n["role"] for n in nodes] == ["head", "worker", "worker", "worker"]
    assert nodes[0]["spot"] is False and all(n["spot"] for n in nodes[1:])


def test_status_table(shared_fleet: CliFleet) -> None:
    result = shared_fleet.cli("status")
    assert result.returncode == 0, result.stderr
    for name in [shared_fleet.head, *shared_fleet.workers()]:
        assert name in result.stdout
    assert "RUNNING" in result.stdout


def test_exec_on_all_nodes_with_fleet_variables(shared_fleet: CliFleet) -> None:
    code, results = shared_fleet.exec_json(
        'echo "$FLEET_NODE_NAME|$FLEET_NODE_RANK|$FLEET_NUM_NODES|$FLEET_SHARED|$(pwd)"')
    assert code == 0
    names = [shared_fleet.head, *shared_fleet.workers()]
    assert sorted(results) == sorted(names)
    ranks = set()
    for name, result in results.items():
        assert set(result) >= {"node", "exit_code", "stdout", "stderr", "error"}
        assert result["exit_code"] == 0 and result["error"] is None, result
        node_name, rank, count, shared, cwd = result["stdout"].strip().split("|")
        assert node_name == name
        ranks.add(int(rank))
        assert count == "4"
        home = shared_fleet.node_home(name)
        assert cwd == str(home)
        assert shared == str(home / "shared")
    assert ranks == {0, 1, 2, 3}


def test_exec_streams_prefixed_lines_and_summary(shared_fleet: CliFleet) -> None:
    result = shared_fleet.cli("exec", "--", "echo line-of-$FLEET_NODE_NAME")
    assert result.returncode == 0, result.stderr
    for name in [shared_fleet.head, *shared_fleet.workers()]:
        assert f"{name} | line-of-{name}" in result.stdout


def test_exec_on_subsets(shared_fleet: CliFleet) -> None:
    workers = shared_fleet.workers()
    code, results = shared_fleet.exec_json("echo $FLEET_NODE_NAME", nodes="workers")
    assert code == 0 and sorted(results) == workers
    code, results = shared_fleet.exec_json("echo $FLEET_NODE_NAME", nodes="head")
    assert code == 0 and list(results) == [shared_fleet.head]
    picked = [workers[0], workers[2]]
    code, results = shared_fleet.exec_json('echo "$FLEET_NODE_NAME $FLEET_NUM_NODES"', nodes=",".join(picked))
    assert code == 0 and sorted(results) == picked
    assert all(r["stdout"].split() == [name, "2"] for name, r in results.items())


def test_exec_fails_when_one_node_fails(shared_fleet: CliFleet) -> None:
    failing = shared_fleet.workers()[1]
    code, results = shared_fleet.exec_json(
        f'if [ "$FLEET_NODE_NAME" = {failing} ]; then echo boom >&2; exit 7; fi; echo fine')
    assert code == 1
    assert results[failing]["exit_code"] == 7 and "boom" in results[failing]["stderr"]
    assert all(r["exit_code"] == 0 and r["stdout"].strip() == "fine" for n, r in results.items() if n != failing)
    plain = shared_fleet.cli("exec", "--", f'[ "$FLEET_NODE_NAME" != {failing} ]')
    assert plain.returncode == 1
    assert failing in plain.stderr and "Traceback" not in plain.stderr


def test_exec_unknown_node_is_a_usage_error(shared_fleet: CliFleet) -> None:
    result = shared_fleet.cli("exec", "--nodes", "nosuch-node;touch /tmp/x", "--", "true")
    assert result.returncode == 2
    assert "no node named" in result.stderr and "Traceback" not in result.stderr
    empty = shared_fleet.cli("exec", "--")
    assert empty.returncode == 2


def test_shared_directory_is_shared_both_ways(shared_fleet: CliFleet) -> None:
    token = uuid.uuid4().hex
    code, results = shared_fleet.exec_json(f'echo {token} > "$FLEET_SHARED/from-head.txt"', nodes="head")
    assert code == 0, results
    # Every worker reads the head's file (its first line: the others append to it at the
    # same time), writes its own, and appends to the head's file.
    code, results = shared_fleet.exec_json(
        f'head -n 1 "$FLEET_SHARED/from-head.txt" && echo "$FLEET_NODE_NAME {token}" > "$FLEET_SHARED/from-$FLEET_NODE_NAME.txt"'
        f' && echo "rw $FLEET_NODE_NAME" >> "$FLEET_SHARED/from-head.txt"',
        nodes="workers")
    assert code == 0, results
    assert all(r["stdout"].strip() == token for r in results.values())
    head_shared = shared_fleet.shared_dir()
    for worker in shared_fleet.workers():
        assert (head_shared / f"from-{worker}.txt").read_text().split() == [worker, token]
        # the worker's mount point is a real sshfs mount, not a directory of its own
        mount = str(shared_fleet.node_home(worker) / "shared")
        assert mount in shared_fleet.node_mounts(worker), mount
    lines = (head_shared / "from-head.txt").read_text().split("\n")
    assert lines[0] == token and sorted(lines[1:-1]) == [f"rw {w}" for w in shared_fleet.workers()]
    # The reverse: what one worker wrote, the head and the other workers read.
    writer, *readers = shared_fleet.workers()
    code, results = shared_fleet.exec_json(f'cat "$FLEET_SHARED/from-{writer}.txt"',
                                           nodes=",".join([shared_fleet.head, *readers]))
    assert code == 0 and all(r["stdout"].split() == [writer, token] for r in results.values())


def test_setup_ran_once_on_every_node(shared_fleet: CliFleet) -> None:
    for name in [shared_fleet.head, *shared_fleet.workers()]:
        assert (shared_fleet.home(name) / "scratch" / "setup.txt").read_text().strip() == f"set up {name}"


def test_second_up_changes_nothing(shared_fleet: CliFleet) -> None:
    before = shared_fleet.nodes()
    data = shared_fleet.up()
    assert data["created"] == [] and data["deleted"] == []
    after = shared_fleet.nodes()
    assert {n: (i["address"], i["generation"]) for n, i in after.items()} == \
           {n: (i["address"], i["generation"]) for n, i in before.items()}
    # Four node directories, and the head's data disk beside them.
    assert min(os.listdir(shared_fleet.root / shared_fleet.name)) == ".data"
    assert len(os.listdir(shared_fleet.root / shared_fleet.name)) == 4 + 1


def test_fleet_ssh_non_interactive(shared_fleet: CliFleet) -> None:
    worker = shared_fleet.workers()[0]
    result = shared_fleet.cli("ssh", worker, "--", f'echo {IDENTITY}; pwd; exit 5')
    assert result.returncode == 5, result.stderr
    assert result.stdout.split() == [worker, str(shared_fleet.node_home(worker))]
    unknown = shared_fleet.cli("ssh", "no-such-node", "--", "true")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


def test_generated_keys_are_private(shared_fleet: CliFleet) -> None:
    for name in ("id_ed25519", "mount_ed25519", "known_hosts", "ssh_config"):
        mode = stat.S_IMODE((shared_fleet.state_dir / name).stat().st_mode)
        assert mode == 0o600, f"{name}: {oct(mode)}"


def test_ssh_config_works_with_plain_openssh(shared_fleet: CliFleet) -> None:
    config = shared_fleet.state_dir / "ssh_config"
    for name in [shared_fleet.head, shared_fleet.workers()[-1]]:
        result = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", name, f"echo {IDENTITY}"],
                                check=False, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == name
    text = config.read_text()
    assert "StrictHostKeyChecking yes" in text and "/dev/null" not in text


def test_exec_arguments_with_quotes_reach_the_shell_verbatim(shared_fleet: CliFleet, tmp_path) -> None:
    marker = tmp_path / "injected"
    payload = f"x\"; touch {marker}; echo \"'$(touch {marker})`touch {marker}`"
    # single-quoted for the node's shell: printed literally, nothing executed
    quoted = "'" + payload.replace("'", "'\"'\"'") + "'"
    code, results = shared_fleet.exec_json("printf", "%s", quoted)
    assert code == 0, results
    assert all(r["stdout"] == payload for r in results.values()), results
    time.sleep(0.2)
    assert not marker.exists()
