"""The local provider works for an ordinary user: sshd on unprivileged ports without
root, sshfs through the setuid fusermount. Run as a throwaway user created here (when
the tests run as root), through `runuser`."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from e2e_helpers import CliFleet, leftovers, new_fleet, nothing_left, sweep

pytestmark = pytest.mark.slow


@pytest.fixture
def ordinary_user() -> Iterator[str]:
    if os.geteuid() != 0:
        yield pwd.getpwuid(os.geteuid()).pw_name  # already an ordinary user
        return
    if not shutil.which("useradd") or not shutil.which("userdel") or not shutil.which("runuser"):
        pytest.skip("useradd/userdel/runuser are not available to create a throwaway user")
    name = f"fleett{uuid.uuid4().hex[:8]}"
    created = subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=False, capture_output=True, text=True)
    if created.returncode != 0:
        pytest.skip(f"useradd failed: {created.stderr.strip()}")
    try:
        yield name
    finally:
        uid = pwd.getpwnam(name).pw_uid
        for proc in psutil.process_iter(["uids"]):  # only the throwaway user's own processes
            if proc.info["uids"] and proc.info["uids"].real == uid:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        subprocess.run(["userdel", "-r", "-f", name], check=False, capture_output=True)


def cli_for(user: str) -> tuple[list[str] | None, dict[str, str]]:
    """How `user` can start the CLI. The venv's interpreter may live where only root can
    reach it (e.g. under /root/.pyenv); then the same Python version from /usr/bin runs
    the same code and the venv's packages through PYTHONPATH."""
    def usable(path: str) -> bool:
        return subprocess.run(["runuser", "-u", user, "--", "test", "-x", path], check=False, capture_output=True).returncode == 0

    if os.geteuid() != 0 or usable(os.path.realpath(sys.executable)):
        return None, {}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system_python = shutil.which(version, path="/usr/bin:/usr/local/bin:/bin")
    if not system_python or not usable(system_python):
        pytest.skip(f"the venv's Python ({os.path.realpath(sys.executable)}) is not reachable by an ordinary user "
                    f"and there is no system {version}")
    repo = Path(__file__).resolve().parents[2]
    packages = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(sys.prefix)]
    if not all(usable(p) for p in [str(repo), *packages]):
        pytest.skip("the repository or the venv's packages are not readable by an ordinary user")
    return [system_python, "-m", "fleet"], {"PYTHONPATH": os.pathsep.join([str(repo), *packages])}


def test_local_fleet_as_an_ordinary_user(ordinary_user: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="fleet-user-"))
    fleet: CliFleet | None = None
    try:
        info = pwd.getpwnam(ordinary_user)
        os.chown(base, info.pw_uid, info.pw_gid)
        fleet = new_fleet(base, 2, run_as=ordinary_user if os.geteuid() == 0 else None)
        fleet.argv, fleet.env = cli_for(ordinary_user)
        os.chown(fleet.dir, info.pw_uid, info.pw_gid)
        os.chown(fleet.spec, info.pw_uid, info.pw_gid)
        fleet.up()
        code, results = fleet.exec_json('echo "$(id -un) $FLEET_NODE_NAME" > "$FLEET_SHARED/$FLEET_NODE_NAME"; id -un')
        assert code == 0, results
        assert {r["stdout"].strip() for r in results.values()} == {ordinary_user}
        shared = fleet.home(fleet.head) / "shared"
        assert sorted(os.listdir(shared)) == sorted([fleet.head, *fleet.workers()])
        for proc in psutil.process_iter(["cmdline", "username"]):
            if str(fleet.root) in " ".join(proc.info["cmdline"] or []):
                assert proc.info["username"] == ordinary_user, proc.info
        ports = [n["port"] for n in fleet.nodes().values()]
        assert all(port >= 1024 for port in ports)
        assert_mount_key_is_forced_sftp(fleet, fleet.workers()[0])
        down = fleet.cli("down", "--yes")
        assert down.returncode == 0, down.stderr
        assert nothing_left(leftovers(fleet.root, fleet.name)), leftovers(fleet.root, fleet.name)
    finally:
        if fleet is not None:
            fleet.teardown()
            sweep(fleet.root, fleet.name)
        shutil.rmtree(base, ignore_errors=True)


def assert_mount_key_is_forced_sftp(fleet: CliFleet, worker: str) -> None:
    """Without root there is no share account: the worker's mount key still runs no
    command, only SFTP starting in the shared directory (restrict + forced internal-sftp)."""
    home = fleet.home(worker)
    share = json.loads((home / ".fleet" / "share.json").read_text())
    assert share["confined"] is False and share["path"] == "."
    options = ["-F", "/dev/null", "-i", str(home / ".fleet" / "mount_key"), "-o", "IdentitiesOnly=yes",
               "-o", f"UserKnownHostsFile={home / '.fleet' / 'known_hosts'}", "-o", "BatchMode=yes",
               "-o", f"HostKeyAlias={share['host_key_alias']}", "-o", "StrictHostKeyChecking=yes"]
    where = f"{share['user']}@{share['host']}"
    command = subprocess.run(["ssh", *options, "-p", str(share["port"]), where, "echo SHELL-REACHED"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert "SHELL-REACHED" not in command.stdout
    sftp = subprocess.run(["sftp", *options, "-P", str(share["port"]), "-b", "-", where], input="pwd\n",
                          capture_output=True, text=True, timeout=60, check=False)
    # The shared directory is a link to the head's data disk (the fleet's .data/shared): SFTP shows where it leads.
    shared = os.path.realpath(fleet.home(fleet.head) / "shared")
    assert shared == str(fleet.root / fleet.name / ".data" / "shared")
    assert sftp.returncode == 0 and f"Remote working directory: {shared}\n" in sftp.stdout, sftp.stdout + sftp.stderr
