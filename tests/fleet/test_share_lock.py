"""Two fleets on one host share `/srv/fleet-share`: one going down must not remove the
bookkeeping directories while the other is confining its share account (this race failed
three tests when the suite ran two files at once)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fleet import share

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="share accounts are made as root")


@pytest.fixture
def share_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "fleet-share"
    monkeypatch.setattr(share, "SHARE_ROOT", str(root))
    monkeypatch.setattr(share, "OWNERS", str(root / ".owners"))
    monkeypatch.setattr(share, "KEYS", str(root / ".keys"))
    monkeypatch.setattr(share, "SHARE_LOCK", str(tmp_path / "fleet-share.lock"), raising=False)
    return root


def _hold_lock(path: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_release_waits_for_a_confinement_in_progress(share_root: Path, tmp_path: Path) -> None:
    (share_root / ".owners").mkdir(parents=True)
    (share_root / ".keys").mkdir()
    fd = _hold_lock(share.SHARE_LOCK)
    released: list[list[str]] = []
    thread = threading.Thread(target=lambda: released.append(share.release_share_accounts(tmp_path / "gone")))
    try:
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive(), "release went on while another fleet held the share lock"
        assert (share_root / ".keys").is_dir()
    finally:
        os.close(fd)
    thread.join(10)
    assert released == [[]]
    assert not share_root.exists(), "the last fleet leaves no empty share root behind"


def test_confinement_takes_the_lock_before_touching_the_share_root(share_root: Path, tmp_path: Path) -> None:
    # Only the tools the script needs up to its account creation: without useradd the script
    # stops there on any code, so the test never makes a system account.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("sh", "cat", "stat", "sha256sum", "cut", "install", "flock", "grep"):
        (tools / tool).symlink_to(shutil.which(tool))
    config = tmp_path / "sshd_config"
    config.write_text("")
    pidfile = tmp_path / "sshd.pid"
    pidfile.write_text("1\n")  # a root process, as a node's own sshd
    script = share.confine_script(shared_path=str(tmp_path / "shared"), head_user_word="root",
                                  mount_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake test")
    fd = _hold_lock(share.SHARE_LOCK)
    process = subprocess.Popen([str(tools / "sh"), "-c", script], start_new_session=True,
                               env={"PATH": str(tools), "FLEET_SSHD_CONFIG": str(config), "FLEET_SSHD_PID": str(pidfile)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        assert process.poll() is None, f"the script did not wait for the lock: {process.communicate()}"
        assert not share_root.exists(), "the script touched the share root without the lock"
    finally:
        os.killpg(process.pid, 9)
        process.wait(10)
        os.close(fd)
