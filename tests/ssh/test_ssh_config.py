"""The fleet's ssh_config and `fleet ssh` argv, used by the real OpenSSH client and sshfs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from ssh_lab import SshLab

from fleet.errors import UsageError
from fleet.ssh import Target, include_line, interactive_ssh_argv, write_ssh_config


def _ssh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-o", "BatchMode=yes", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def configured(lab: SshLab) -> tuple[SshLab, list[Target], Path]:
    nodes = [lab.node(f"cfg-n{index}") for index in range(2)]
    targets = [lab.target(node, host_key=node.host_key_line, tofu=False) for node in nodes]
    for node in nodes:
        lab.store.pin(node.name, node.host_key_line)
    config = write_ssh_config(lab.root / "fleet dir" / "ssh_config", "cfg", targets, lab.key, lab.store.path)
    return lab, targets, config


def test_ssh_dash_F_reaches_every_node_by_name(configured) -> None:
    lab, targets, config = configured
    assert config.stat().st_mode & 0o777 == 0o600
    text = config.read_text()
    assert (
        text.count("\nHost ") == 2 and "StrictHostKeyChecking yes" in text and "HostKeyAlias cfg-n0" in text
    )
    for node, target in zip(lab.nodes, targets):
        out = _ssh("-F", str(config), target.name, "pwd")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(node.home)


def test_include_line_makes_plain_ssh_work(configured, tmp_path: Path) -> None:
    _lab, targets, config = configured
    user_config = tmp_path / "user_ssh_config"
    user_config.write_text(f"{include_line(config)}\n\nHost *\n    ServerAliveInterval 60\n")
    assert '"' in include_line(config)  # the path has a space: quoted
    out = _ssh("-F", str(user_config), targets[1].name, "echo", "included")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "included\n"


def test_the_openssh_client_refuses_a_changed_key_through_the_config(configured) -> None:
    lab, targets, config = configured
    node = lab.nodes[0]
    port = node.port
    lab.destroy(node)
    lab.node(node.name, port=port)  # a new server, new host key, same address and port
    out = _ssh("-F", str(config), targets[0].name, "true")
    assert out.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in out.stderr or "verification failed" in out.stderr


def test_interactive_argv_uses_pinned_keys(configured) -> None:
    lab, targets, _ = configured
    argv = interactive_ssh_argv(targets[0], lab.key, lab.store.path, ["echo", "hello"])
    assert (
        argv[0] == "ssh" and "StrictHostKeyChecking=yes" in argv and f"HostKeyAlias={targets[0].name}" in argv
    )
    out = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello\n"
    lab.store.forget(targets[0].name)
    refused = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert refused.returncode == 255


@pytest.mark.skipif(
    not shutil.which("sshfs") or not shutil.which("fusermount3"), reason="sshfs/fuse3 not installed"
)
def test_sshfs_mounts_through_the_config(configured, tmp_path: Path) -> None:
    lab, targets, config = configured
    (lab.nodes[1].home / "shared.txt").write_text("over sshfs\n")
    point = tmp_path / "mnt"
    point.mkdir()
    mounted = subprocess.run(
        ["sshfs", "-F", str(config), f"{targets[1].name}:", str(point)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    try:
        assert mounted.returncode == 0, mounted.stderr
        assert (point / "shared.txt").read_text() == "over sshfs\n"
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False, capture_output=True, timeout=30)


@pytest.mark.skipif(not shutil.which("rsync"), reason="rsync is not installed on this machine")
def test_rsync_through_the_config(configured, tmp_path: Path) -> None:
    lab, targets, config = configured
    source = tmp_path / "src"
    source.mkdir()
    (source / "f.txt").write_text("rsynced\n")
    out = subprocess.run(
        [
            "rsync",
            "-a",
            "-e",
            f"ssh -F '{config}' -o BatchMode=yes",
            f"{source}/",
            f"{targets[0].name}:dest/",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert (lab.nodes[0].home / "dest" / "f.txt").read_text() == "rsynced\n"


def test_unsafe_values_are_refused(lab: SshLab, tmp_path: Path) -> None:
    good = Target("ok-node", "127.0.0.1", 2222, "root")
    for bad in (
        Target("two words", "127.0.0.1", 22, "root"),
        Target("n", "1.2.3.4\nProxyCommand x", 22, "root"),
        Target("n", "127.0.0.1", 22, "ro ot"),
        Target("n", "127.0.0.1", 0, "root"),
    ):
        with pytest.raises(UsageError):
            write_ssh_config(tmp_path / "c", "f", [good, bad], lab.key, lab.store.path)
    with pytest.raises(UsageError):
        write_ssh_config(tmp_path / "c", "f", [good], Path('/tmp/a"b'), lab.store.path)
    assert not (tmp_path / "c").exists()
