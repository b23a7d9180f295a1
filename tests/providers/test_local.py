"""The local provider on its own (no CLI): what is specific to it. The provider contract
shared with the clouds is tested in test_contract.py.

Real sshd nodes on loopback; every test destroys what it made, also when it fails."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fleet.errors import DependencyError, UsageError
from fleet.model import NodeRequest, NodeState, Role
from fleet.providers import localnode
from fleet.providers.base import ProviderContext
from fleet.providers.local import LocalProvider
from fleet.providers.localnode import LocalNode, generate_ed25519_keypair
from fleet.spec.models import FleetSpec
from fleet.ssh import Executor, HostKeyStore, Target


class Lab:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.key = base / "id_ed25519"
        self.public_key = generate_ed25519_keypair(self.key, "local-provider-tests")
        self.providers: list[LocalProvider] = []
        self.executors: list[Executor] = []

    def provider(self, name: str | None = None, root: Path | None = None) -> LocalProvider:
        name = name or f"lp{uuid.uuid4().hex[:8]}"
        spec = FleetSpec(
            name=name,
            provider="local",
            workers={"count": 1},
            # The loopback machinery (markers, ports, orphans); isolated nodes: test_localns.py.
            local={"root": str(root or self.base / "nodes"), "isolation": "loopback"},
        )
        provider = LocalProvider(
            ProviderContext(
                spec=spec,
                state_dir=self.base / ".fleet" / name,
                public_key=self.public_key,
                ssh_user=os.environ.get("USER", "root"),
            )
        )
        self.providers.append(provider)
        return provider

    def executor(self) -> Executor:
        executor = Executor(self.key, HostKeyStore(self.base / "known_hosts"), connect_timeout=5)
        self.executors.append(executor)
        return executor

    def close(self) -> None:
        for executor in self.executors:
            with contextlib.suppress(Exception):
                executor.close()
        for provider in self.providers:
            with contextlib.suppress(Exception):
                provider.destroy_all()
        _sweep(self.base)


def _sweep(base: Path) -> None:
    prefix = str(base.resolve())
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            env_home = proc.environ().get("HOME", "") if proc.pid != os.getpid() else ""
            if proc.pid != os.getpid() and (
                prefix in " ".join(proc.info["cmdline"] or []) or env_home.startswith(prefix + "/")
            ):
                proc.kill()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def _request(
    name: str, role: Role = Role.WORKER, slot: int = 1, generation: int = 1, spot: bool = True
) -> NodeRequest:
    return NodeRequest(name=name, role=role, slot=slot, generation=generation, spot=spot)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _target(node) -> Target:
    return Target(
        name=node.name,
        address=node.address,
        port=node.port,
        user=os.environ.get("USER", "root"),
        host_key=node.host_key,
    )


def _processes_of(node_id: str) -> list[int]:
    return [pid for pid in localnode.pids_with_env(localnode.MARKER, node_id) if localnode._pid_alive(pid)]


def test_create_list_and_state_mapping(lab: Lab) -> None:
    provider = lab.provider()
    name = provider.spec.name
    results = provider.create(
        [
            _request(f"{name}-head", Role.HEAD, 0, 1, spot=False),
            _request(f"{name}-w1-g3", slot=1, generation=3),
        ]
    )
    assert all(r.error is None and r.node is not None for r in results), [r.error for r in results]
    nodes = {n.name: n for n in provider.list()}
    assert set(nodes) == {f"{name}-head", f"{name}-w1-g3"}
    head, worker = nodes[f"{name}-head"], nodes[f"{name}-w1-g3"]
    assert (head.role, head.slot, head.spot) == (Role.HEAD, 0, False)
    assert (worker.role, worker.slot, worker.generation, worker.spot) == (Role.WORKER, 1, 3, True)
    for node in nodes.values():
        assert node.state == NodeState.RUNNING and node.zone == "local" and node.fleet == name
        assert node.address == "127.0.0.1" and _port_open(node.port)
        local = LocalNode.load(provider.root / name / node.name)
        assert node.host_key == local.host_key_line and node.provider_id == local.id
    assert head.port != worker.port
    # the host key the provider vouches for is the one the sshd presents
    run = lab.executor().run([_target(n) for n in nodes.values()], "echo $FLEET_LOCAL_NODE_NAME")
    assert run.ok, run.summary()
    assert {r.node: r.stdout.strip() for r in run.results.values()} == {n: n for n in nodes}

    # killed behind the provider's back: TERMINATED (not a preemption)
    os.kill(LocalNode.load(provider.root / name / worker.name).listener_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (
        time.monotonic() < deadline
        and {n.name: n.state for n in provider.list()}[worker.name] == NodeState.RUNNING
    ):
        time.sleep(0.05)
    after = {n.name: n for n in provider.list()}[worker.name]
    assert after.state == NodeState.TERMINATED and after.reason is None


def test_create_refuses_an_existing_name_without_failing_the_others(lab: Lab) -> None:
    provider = lab.provider()
    name = provider.spec.name
    first = provider.create([_request(f"{name}-w1-g1")])
    assert first[0].node is not None
    results = provider.create([_request(f"{name}-w1-g1"), _request(f"{name}-w2-g1", slot=2)])
    assert results[0].node is None and "already exists" in str(results[0].error)
    assert results[1].node is not None and results[1].node.state == NodeState.RUNNING
    assert len(provider.list()) == 2


def test_preempt_kills_everything_and_maps_to_preempted(lab: Lab) -> None:
    provider = lab.provider()
    name = provider.spec.name
    node = provider.create([_request(f"{name}-w1-g1")])[0].node
    executor = lab.executor()
    start = executor.run([_target(node)], "setsid nohup sleep 4242 >/dev/null 2>&1 < /dev/null & echo $!")
    assert start.ok, start.summary()
    daemon = int(start.results[node.name].stdout.strip())
    assert psutil.pid_exists(daemon)
    provider.preempt(node.name)
    listed = provider.list()
    assert [(n.name, n.state) for n in listed] == [(node.name, NodeState.PREEMPTED)]
    assert listed[0].reason and "preempt" in listed[0].reason
    assert not _port_open(node.port)
    assert _processes_of(node.provider_id) == []
    assert not psutil.pid_exists(daemon) or psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(UsageError):
        provider.preempt(node.name)  # not running any more
    with pytest.raises(UsageError):
        provider.preempt("no-such-node")
    # the dead node stays listed until deleted, as a preempted cloud VM does
    assert provider.delete([node.name]) and provider.list() == []


def test_preempt_with_notice_sends_sigterm_first(lab: Lab) -> None:
    provider = lab.provider()
    name = provider.spec.name
    node = provider.create([_request(f"{name}-w1-g1")])[0].node
    home = provider.root / name / node.name / "home"
    graceful = (
        "trap 'echo got-term > term.txt; exit 0' TERM; echo ready > ready.txt; while true; do sleep 0.1; done"
    )
    stubborn = "trap '' TERM; echo ready > stubborn-ready.txt; while true; do sleep 0.1; done"
    script = (
        f"setsid nohup sh -c {shlex.quote(graceful)} >/dev/null 2>&1 < /dev/null & "
        f"setsid nohup sh -c {shlex.quote(stubborn)} >/dev/null 2>&1 < /dev/null & echo started"
    )
    assert lab.executor().run([_target(node)], script).ok
    deadline = time.monotonic() + 5
    while not ((home / "ready.txt").exists() and (home / "stubborn-ready.txt").exists()):
        assert time.monotonic() < deadline, "the test's processes did not start"
        time.sleep(0.05)
    started = time.monotonic()
    provider.preempt(node.name, notice_s=1)
    assert time.monotonic() - started >= 1.0
    assert (home / "term.txt").read_text().strip() == "got-term"
    assert _processes_of(node.provider_id) == [], "what ignored the notice was killed at the end"
    assert provider.list()[0].state == NodeState.PREEMPTED


def test_destroy_all_cleans_orphans_whose_directories_were_deleted(lab: Lab) -> None:
    provider = lab.provider()
    name = provider.spec.name
    nodes = [
        r.node for r in provider.create([_request(f"{name}-head", Role.HEAD, 0), _request(f"{name}-w1-g1")])
    ]
    assert lab.executor().run([_target(nodes[1])], "setsid nohup sleep 4343 >/dev/null 2>&1 < /dev/null &").ok
    ids = [n.provider_id for n in nodes]
    pids = [pid for n in nodes for pid in LocalNode.load(provider.root / name / n.name).processes()]
    assert len(pids) >= 3  # two sshd listeners and the daemon
    shutil.rmtree(provider.root / name)  # the inventory is gone, the processes are not
    assert provider.list() == []
    report = provider.destroy_all()
    assert any("orphan" in line for line in report.deleted), report
    assert all(_processes_of(i) == [] for i in ids)
    assert not [pid for pid in pids if localnode._pid_alive(pid)]
    assert not any(_port_open(n.port) for n in nodes)
    assert provider.destroy_all().deleted == []  # idempotent


def test_destroy_all_leaves_a_same_named_fleet_under_another_root_alone(lab: Lab) -> None:
    name = f"lp{uuid.uuid4().hex[:8]}"
    mine = lab.provider(name, lab.base / "root-a")
    other = lab.provider(name, lab.base / "root-b")
    my_node = mine.create([_request(f"{name}-w1-g1")])[0].node
    other_node = other.create([_request(f"{name}-w1-g1")])[0].node
    executor = lab.executor()
    other_target = Target(
        name="other-node",
        address=other_node.address,
        port=other_node.port,
        user=os.environ.get("USER", "root"),
        host_key=other_node.host_key,
    )
    started = executor.run([other_target], "setsid nohup sleep 4444 >/dev/null 2>&1 < /dev/null & echo $!")
    assert started.ok, started.summary()
    other_daemon = int(started.results["other-node"].stdout.strip())
    other_sshd = LocalNode.load(other.root / name / other_node.name).listener_pid()
    shutil.rmtree(mine.root / name)  # force the orphan scan
    mine.destroy_all()
    assert _processes_of(my_node.provider_id) == []
    assert [n.state for n in other.list()] == [NodeState.RUNNING]
    assert localnode._pid_alive(other_sshd) and localnode._pid_alive(other_daemon), (
        "the other fleet's sshd and daemon survive"
    )


def test_a_node_being_deleted_is_never_listed_as_stopped(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a monitor pass (another process) lists while `delete` runs: the node's sshd is
    # killed before its directory is removed. Seen then as TERMINATED, a stopped head, the
    # monitor started it again under the delete; a node being deleted is gone, as on a cloud.
    provider = lab.provider()
    name = provider.spec.name
    head = provider.create([_request(f"{name}-head", role=Role.HEAD, slot=0, spot=False)])[0].node
    monitor = LocalProvider(provider.context)
    seen: list[list[tuple[str, NodeState]]] = []
    release = localnode.release_share_accounts

    def halfway(config: Path) -> list[str]:  # after the kill, before the directory goes
        seen.append([(n.name, n.state) for n in monitor.list()])
        assert monitor.start([head.name]) == []
        return release(config)

    monkeypatch.setattr(localnode, "release_share_accounts", halfway)
    assert provider.delete([head.name])
    assert seen == [[]]
    assert monitor.list() == [] and not (provider.root / name / head.name).exists()

    # A delete cut short (the node marked, its sshd killed, its directory left) is finished
    # by the next one, and lists as nothing meanwhile.
    worker = provider.create([_request(f"{name}-w1-g1")])[0].node
    cut = LocalNode.load(provider.root / name / worker.name)
    cut.mark_deleting()
    cut.kill(preempted=False)
    assert monitor.list() == [] and monitor.start([worker.name]) == []
    assert provider.delete([worker.name]) and not (provider.root / name / worker.name).exists()
    assert _left(provider) == []

    # A node made under the name of one being deleted (a replaced head) gets a directory
    # of its own, never the half-removed one.
    again = provider.create([_request(f"{name}-head", role=Role.HEAD, slot=0, spot=False)])[0].node
    old = LocalNode.load(provider.root / name / again.name)

    def replaced_meanwhile(config: Path) -> list[str]:
        new = provider.create([_request(f"{name}-head", role=Role.HEAD, slot=0, spot=False)])[0]
        assert new.error is not None and "already exists" in str(new.error)  # not yet: as a cloud's 409
        return release(config)

    monkeypatch.setattr(localnode, "release_share_accounts", replaced_meanwhile)
    old.destroy()
    monkeypatch.setattr(localnode, "release_share_accounts", release)
    fresh = provider.create([_request(f"{name}-head", role=Role.HEAD, slot=0, spot=False)])[0].node
    assert fresh is not None and fresh.state is NodeState.RUNNING
    assert [n.name for n in monitor.list()] == [fresh.name]
    assert provider.delete([fresh.name]) and _left(provider) == []


def _left(provider: LocalProvider) -> list[str]:
    """What is left in the fleet's directory besides its data disk (the head's `.data`)."""
    return sorted(p.name for p in (provider.root / provider.spec.name).iterdir() if p.name != ".data")


def test_delete_is_idempotent_and_ignores_unknown_names(lab: Lab) -> None:
    provider = lab.provider()
    name = provider.spec.name
    node = provider.create([_request(f"{name}-w1-g1")])[0].node
    assert provider.delete(["nope", node.name]) == [f"local node {node.name} (sshd on 127.0.0.1:{node.port})"]
    assert provider.delete([node.name]) == []
    assert not (provider.root / name / node.name).exists()
    assert not _port_open(node.port)


def test_check_names_the_package_to_install(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    provider = lab.provider()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(localnode, "SSHD", str(tmp_path / "no-sshd"))
    with pytest.raises(DependencyError) as error:
        provider.check()
    assert "openssh-server" in f"{error.value} {getattr(error.value, 'hint', '')}"
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    monkeypatch.setattr(localnode, "SSHD", "/usr/sbin/sshd")
    if shutil.which("sshd") and shutil.which("sshfs"):
        provider.check()
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "sshfs" else "/usr/sbin/sshd")
    with pytest.raises(DependencyError) as error:
        provider.check()
    assert "sshfs" in f"{error.value} {getattr(error.value, 'hint', '')}"
