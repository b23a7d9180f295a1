"""Host key pinning: the store on disk, and the executor refusing what it must refuse."""

from __future__ import annotations

import multiprocessing
import subprocess
from pathlib import Path

import pytest
from ssh_lab import SshLab

from fleet.errors import HostKeyError, UsageError
from fleet.providers.localnode import generate_ed25519_keypair
from fleet.ssh import HostKeyStore, Target


def _key(tmp_path: Path, name: str) -> str:
    line = generate_ed25519_keypair(tmp_path / name, f"{name}-comment")
    return line  # "ssh-ed25519 AAAA... comment"


def test_pin_is_idempotent_refuses_a_different_key_and_forgets(tmp_path: Path) -> None:
    store = HostKeyStore(tmp_path / "kh" / "known_hosts")
    first, second = _key(tmp_path, "a"), _key(tmp_path, "b")
    store.pin("demo-w1-g1", first)
    store.pin("demo-w1-g1", first)
    store.pin("demo-w2-g1", second)
    assert store.get("demo-w1-g1") == " ".join(first.split()[:2])
    assert (tmp_path / "kh" / "known_hosts").read_text().count("demo-w1-g1") == 1
    with pytest.raises(HostKeyError) as caught:
        store.pin("demo-w1-g1", second)
    assert "changed" in str(caught.value) and str(store.path) in str(caught.value)
    assert store.get("demo-w1-g1") == " ".join(first.split()[:2])
    store.forget("demo-w1-g1")
    assert store.get("demo-w1-g1") is None and store.get("demo-w2-g1") is not None
    store.pin("demo-w1-g1", second)  # after forget, a new node of that name may be pinned
    assert (store.path.stat().st_mode & 0o777) == 0o600


def test_store_rejects_bad_aliases_and_bad_key_lines(tmp_path: Path) -> None:
    store = HostKeyStore(tmp_path / "known_hosts")
    good = _key(tmp_path, "a")
    for alias in ("a b", "x\ny", "*", "a,b", "", "-flag"):
        with pytest.raises(UsageError):
            store.pin(alias, good)
    for line in ("ssh-ed25519", "ssh-ed25519 not*base64", "ssh-rsa " + good.split()[1]):
        with pytest.raises(HostKeyError):
            store.pin("node", line)
    assert not store.path.exists()


def test_the_openssh_client_reads_the_store(lab: SshLab) -> None:
    node = lab.node("kh-node")
    lab.store.pin(node.name, node.host_key_line)
    out = subprocess.run(
        ["ssh-keygen", "-F", node.name, "-f", str(lab.store.path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and node.host_key_line.split()[1] in out.stdout


def _pin_many(path: str, worker: int, count: int) -> None:
    from fleet.providers.localnode import generate_ed25519_keypair

    store = HostKeyStore(Path(path))
    for index in range(count):
        line = generate_ed25519_keypair(Path(path).parent / f"k{worker}-{index}", "x")
        store.pin(f"w{worker}-n{index}", line)


def test_concurrent_pins_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_pin_many, args=(str(path), worker, 15)) for worker in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert all(process.exitcode == 0 for process in processes)
    aliases = HostKeyStore(path).aliases()
    assert sorted(aliases) == sorted(f"w{w}-n{i}" for w in range(4) for i in range(15))


def test_trust_on_first_use_pins_the_key_seen(lab: SshLab) -> None:
    node = lab.node("tofu-node")
    with lab.executor() as executor:
        assert executor.run([lab.target(node, tofu=True)], "true").ok
    assert lab.store.get(node.name) == node.host_key_line
    # Pinned by node name, not by address.
    assert node.address not in lab.store.path.read_text()


def test_unknown_key_without_trust_on_first_use_is_refused(lab: SshLab, accepted_logins) -> None:
    node = lab.node("stranger-node")
    with lab.executor() as executor:
        result = executor.run([lab.target(node, tofu=False)], "true")
    error = result[node.name].error
    assert isinstance(error, HostKeyError) and "unknown" in str(error) and node.name in str(error)
    assert lab.store.get(node.name) is None
    assert accepted_logins(node) == 0  # refused before authenticating


def test_a_vouched_key_is_pinned_and_a_wrong_one_refused(lab: SshLab, tmp_path: Path) -> None:
    node, other = lab.node("vouched-node"), lab.node("other-node")
    with lab.executor() as executor:
        ok = executor.run([lab.target(node, tofu=False, host_key=node.host_key_line)], "true")
        assert ok.ok and lab.store.get(node.name) == node.host_key_line
        # The provider vouches for a key the server does not have: refused, even with TOFU.
        wrong = executor.run([lab.target(other, tofu=True, host_key=_key(tmp_path, "impostor"))], "true")
    assert isinstance(wrong[other.name].error, HostKeyError)


def test_a_changed_host_key_is_refused_with_what_to_do(lab: SshLab, accepted_logins) -> None:
    node = lab.node("moving-node")
    port, target = node.port, lab.target(node, tofu=True)
    with lab.executor() as executor:
        assert executor.run([target], "true").ok
        pinned = lab.store.get(node.name)
        # The node is replaced by another server (new host key) at the same address and port.
        lab.destroy(node)
        replacement = lab.node("moving-node", port=port)
        assert replacement.host_key_line != pinned
        result = executor.run([target], "true")  # the cached connection died with the old sshd
    error = result[target.name].error
    assert isinstance(error, HostKeyError)
    text = str(error)
    assert "host key of moving-node changed" in text and str(lab.store.path) in text and "fleet down" in text
    assert lab.store.get(node.name) == pinned
    assert accepted_logins(replacement) == 0
    # A fresh executor (a later `fleet` command) refuses it too.
    with lab.executor() as executor:
        assert isinstance(executor.run([target], "true")[target.name].error, HostKeyError)


def test_the_same_address_under_another_name_is_checked_against_that_name(lab: SshLab) -> None:
    node = lab.node("named-node")
    with lab.executor() as executor:
        assert executor.run([lab.target(node, tofu=True)], "true").ok
        # Same server reached as an unknown name without TOFU: its pin for another name does not count.
        alias = Target("someone-else", node.address, node.port, node.user)
        assert isinstance(executor.run([alias], "true")["someone-else"].error, HostKeyError)
