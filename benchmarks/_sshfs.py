"""For the benchmarks that read over sshfs: a real sshd (fleet's LocalNode) on loopback
and real sshfs mounts of its files, with pinned host key, all torn down at the end.
`ssh_argv(command)` runs a command over the same SSH (the benchmarks' tar references)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def sshd_head() -> Iterator[_Mounter]:
    """Yields mount(remote, point): mounts `remote` (a local path the sshd serves) at
    `point` and returns `point`. Every mount is detached and the sshd destroyed on exit."""
    from fleet.providers.localnode import LocalNode, detach_mount, generate_ed25519_keypair

    work = Path(tempfile.mkdtemp(prefix="bench-sshd-"))
    key = work / "key"
    node = LocalNode.create(
        work / "nodes", name="head", fleet="bench", authorized_keys=[generate_ed25519_keypair(key, "bench")]
    )
    known = work / "known_hosts"
    known.write_text(node.known_hosts_line("bench-head") + "\n")
    points: list[Path] = []

    def ssh_argv(command: str) -> list[str]:
        return [
            "ssh", "-i", str(key), "-o", f"UserKnownHostsFile={known}", "-o", "HostKeyAlias=bench-head",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(node.port),
            f"{node.user}@{node.address}", command,
        ]

    def mount(remote: Path, point: Path) -> Path:
        point.mkdir(parents=True, exist_ok=True)
        options = (
            f"IdentityFile={key},UserKnownHostsFile={known},HostKeyAlias=bench-head,port={node.port},"
            "StrictHostKeyChecking=yes,reconnect,ServerAliveInterval=15,ServerAliveCountMax=3"
        )
        subprocess.run(
            ["sshfs", f"{node.user}@{node.address}:{remote}", str(point), "-o", options],
            check=True,
            timeout=60,
            capture_output=True,
        )
        points.append(point)
        return point

    try:
        yield _Mounter(mount, ssh_argv)
    finally:
        for point in points:
            detach_mount(str(point))
        node.destroy()
        shutil.rmtree(work, ignore_errors=True)


class _Mounter:
    """mount(remote, point) -> point; .ssh_argv(command) -> argv of ssh running it on the head."""

    def __init__(self, mount: Callable[[Path, Path], Path], ssh_argv: Callable[[str], list[str]]) -> None:
        self._mount = mount
        self.ssh_argv = ssh_argv

    def __call__(self, remote: Path, point: Path) -> Path:
        return self._mount(remote, point)
