"""Local nodes: one real OpenSSH server per node, on loopback, with its own directory.

This is the machinery under the `local` provider and under the fake clouds of
`fleet.testing` (their instances are backed by local nodes). A node is a directory

    <root>/<fleet>/<name>/
        node.json      what the node is (name, fleet, address, port, labels, state)
        sshd/          host key, authorized_keys, sshd_config, the login wrapper, pid, log
        home/          the node's home: commands run here, with HOME pointing here

and one `sshd` listening on `address:port`. Every process started on the node carries
the environment variable `FLEET_LOCAL_NODE_ID=<id>` (set by sshd's `SetEnv`), which is
how `kill()` finds "every process started on it" the way a cloud preemption would end
them: the sshd, the sessions, daemons started with setsid/nohup, the sshfs mount
process; then the node's FUSE mounts are detached. Works as root and as an ordinary
user (unprivileged ports, `UsePAM no`). This is the `loopback` isolation; the
`namespaces` one (`fleet.providers.localns.IsolatedNode`) keeps the same record and
verbs, and `LocalNode.load` returns whichever a node.json describes.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.errors import DependencyError, ProviderError
from fleet.share import release_orphan_share_accounts, release_share_accounts

SSHD = "/usr/sbin/sshd"
MARKER = "FLEET_LOCAL_NODE_ID"
FLEET_MARKER = "FLEET_LOCAL_FLEET"
# The root the node lives under: two fleets of the same name under different roots
# (two checkouts, two test runs) must never clean up each other's processes.
ROOT_MARKER = "FLEET_LOCAL_ROOT"
_SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")

_LOGIN_WRAPPER = """#!/bin/sh
# Forced command of a fleet local node: run in the node's home, like a login would.
cd "$HOME" || exit 1
# This ForceCommand hides a key's own command="internal-sftp -d DIR" (the mount key where
# no share account exists): honour it for the key that logged in (ExposeAuthInfo).
if [ -n "${SSH_USER_AUTH:-}" ] && [ -r "$SSH_USER_AUTH" ]; then
  key=$(sed -n 's/^publickey [^ ]* \\([^ ]*\\).*/\\1/p' "$SSH_USER_AUTH" | head -n 1)
  if [ -n "$key" ]; then
    dir=$(cat {keys} 2>/dev/null | grep -F " $key" | sed -n 's/^restrict,command="internal-sftp -d \\([^"]*\\)" .*/\\1/p' | head -n 1)
    if [ -n "$dir" ]; then
      exec {sftp_server} -d "$(printf %s "$dir" | sed "s|%d|$HOME|")"
    fi
  fi
fi
if [ -n "$SSH_ORIGINAL_COMMAND" ]; then
  exec "${SHELL:-/bin/sh}" -c "$SSH_ORIGINAL_COMMAND"
fi
exec "${SHELL:-/bin/sh}" -l
"""


FUSE_DEVICE = "/dev/fuse"


def find_sshd() -> str:
    path = shutil.which("sshd") or (SSHD if os.path.exists(SSHD) else None)
    if not path:
        raise DependencyError(
            "the local provider needs OpenSSH's sshd, which is not installed",
            hint="install it with: apt-get install openssh-server",
        )
    return path


def find_sftp_server() -> str:
    for candidate in _SFTP_SERVERS:
        if os.path.exists(candidate):
            return candidate
    raise DependencyError(
        "OpenSSH's sftp-server is missing", hint="install it with: apt-get install openssh-server"
    )


def require_sshfs() -> None:
    if not shutil.which("sshfs"):
        raise DependencyError(
            "sshfs is not installed on this machine", hint="install it with: apt-get install sshfs fuse3"
        )
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        # Without udev (containers, fresh VMs) the fuse package's 0666 rule is never applied.
        raise DependencyError(
            f"{FUSE_DEVICE} is not readable and writable by this user, so sshfs cannot mount",
            hint=f"as root: chmod 0666 {FUSE_DEVICE} (what the fuse package's udev rule does; "
            "`make install` does it)",
        )


def generate_ed25519_keypair(private_path: Path, comment: str) -> str:
    """Write an OpenSSH ed25519 private key (0600) and its .pub; return the public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} {comment}"
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    os.chmod(private_path, 0o600)
    Path(f"{private_path}.pub").write_text(line + "\n")
    return line


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as handle:
        if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _environ_of(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _cmdline_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pids_with_env(name: str, value: str) -> list[int]:
    """Processes (of any user we can read) whose environment has name=value."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if _environ_of(int(entry)).get(name) == value:
            found.append(int(entry))
    return found


def fuse_mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    mounts = []
    with open("/proc/mounts") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 3 and parts[2].startswith("fuse"):
                point = parts[1].encode().decode("unicode_escape")
                if point == prefix or point.startswith(prefix + "/"):
                    mounts.append(point)
    return mounts


def detach_mount(point: str) -> None:
    """Lazily detach a FUSE mount (works on a dead sshfs too)."""
    for command in (["fusermount3", "-u", "-z", point], ["fusermount", "-u", "-z", point], ["umount", "-l", point]):
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run(command, check=False, capture_output=True, timeout=10)
        if result.returncode == 0:
            return


@dataclass
class LocalNode:
    """One local node: its directory, its sshd, and how to reach it."""

    dir: Path
    name: str
    fleet: str
    id: str
    address: str
    port: int
    user: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    preempted: bool = False
    isolation: str = "loopback"  # or "namespaces" (fleet.providers.localns.IsolatedNode)
    # The data disk this node has attached (a head's): a directory outside the node's own,
    # which outlives it; "" for none.
    data_dir: str = ""
    # Being deleted (recorded before anything is killed): listed by no one, started by no
    # one, so that a monitor pass during the delete never sees a stopped node to start.
    deleting: bool = False

    # -- paths -------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.dir / "home"

    @property
    def sshd_dir(self) -> Path:
        return self.dir / "sshd"

    @property
    def sshd_log(self) -> Path:
        return self.sshd_dir / "sshd.log"

    @property
    def host_key_path(self) -> Path:
        return self.sshd_dir / "host_key.pub"

    @property
    def host_key_line(self) -> str:
        """The node's public host key, "ssh-ed25519 AAAA..." (no comment)."""
        parts = self.host_key_path.read_text().split()
        return f"{parts[0]} {parts[1]}"

    def known_hosts_line(self, alias: str | None = None) -> str:
        host = alias or (self.address if self.port == 22 else f"[{self.address}]:{self.port}")
        return f"{host} {self.host_key_line}"

    # -- lifecycle ---------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: Path,
        *,
        name: str,
        fleet: str,
        authorized_keys: Iterable[str],
        address: str = "127.0.0.1",
        port: int = 0,
        labels: dict[str, str] | None = None,
        extra_path: Iterable[str] = (),
        env: dict[str, str] | None = None,
        data_dir: Path | None = None,
    ) -> LocalNode:
        """Create the node's directory and start its sshd. `port=0` picks a free port.
        `data_dir` is its data disk: the node's programs find it in FLEET_DATA_DIR."""
        sshd = find_sshd()
        sftp_server = find_sftp_server()
        node_dir = Path(root) / fleet / name
        if (node_dir / "node.json").exists():
            raise ProviderError(f"local node {name} already exists at {node_dir}")
        node = cls(
            dir=node_dir,
            name=name,
            fleet=fleet,
            id=uuid.uuid4().hex,
            address=address,
            port=port,
            user=getpass.getuser(),
            labels=dict(labels or {}),
            created_at=time.time(),
            data_dir=str(data_dir) if data_dir else "",
        )
        if data_dir:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
        node.home.mkdir(parents=True, exist_ok=True)
        node.sshd_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(node.sshd_dir, 0o700)
        generate_ed25519_keypair(node.sshd_dir / "host_key", f"{name}-host")
        node.set_authorized_keys(authorized_keys)
        wrapper = node.sshd_dir / "enter"
        keys = " ".join(shlex.quote(str(p)) for p in (node.sshd_dir / "authorized_keys", node.home / ".ssh" / "authorized_keys"))
        wrapper.write_text(_LOGIN_WRAPPER.replace("{keys}", keys).replace("{sftp_server}", shlex.quote(sftp_server)))
        os.chmod(wrapper, 0o755)
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        path_dirs = [*extra_path, os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin",
                     "/usr/sbin", "/sbin"]
        node_env = {
            "HOME": str(node.home),
            "PATH": ":".join(dict.fromkeys(path_dirs)),
            MARKER: node.id,
            FLEET_MARKER: fleet,
            ROOT_MARKER: str(Path(root).resolve()),
            "FLEET_LOCAL_NODE_NAME": name,
            # Where this node's own sshd reads its config (the share account's Match block).
            "FLEET_SSHD_CONFIG": str(node.sshd_dir / "sshd_config"),
            "FLEET_SSHD_PID": str(node.sshd_dir / "sshd.pid"),
            # Set on every loopback node, also when empty: the host's own /etc/fleet/data is not theirs.
            "FLEET_DATA_DIR": node.data_dir,
            **(env or {}),
        }
        last_error = ""
        for _attempt in range(5):
            if port == 0:
                node.port = free_port(address)
            node._write_config(sftp_server, node_env)
            node._save()
            started, last_error = node._start_sshd(sshd)
            if started:
                return node
            if port != 0:
                break
        node.destroy()
        raise ProviderError(f"could not start sshd for local node {name}: {last_error.strip()[-500:]}")

    def boot(self) -> None:
        """Start a stopped node again, with the same directory, host key and address (a
        cloud's instance start). Idempotent."""
        if self.is_running():
            return
        self.preempted = False
        self._save()
        started, error = self._start_sshd(find_sshd())
        if not started:
            raise ProviderError(f"could not start sshd for local node {self.name} again: {error.strip()[-500:]}")

    def set_authorized_keys(self, keys: Iterable[str]) -> None:
        path = self.sshd_dir / "authorized_keys"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(f"{key.strip()}\n" for key in keys))

    def _write_config(self, sftp_server: str, env: dict[str, str]) -> None:
        d = self.sshd_dir
        setenv = " ".join(f'"{k}={v}"' for k, v in env.items())
        config = f"""# sshd of fleet local node {self.name}
ListenAddress {self.address}:{self.port}
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'} {self.home / '.ssh' / 'authorized_keys'}
AllowUsers {self.user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
# Our own files (0600, created by us) live outside the user's home, e.g. under /tmp.
StrictModes no
# `fleet.connect` reaches the servers of `fleet serve` on the node's loopback, nothing else.
AllowTcpForwarding local
PermitOpen 127.0.0.1:*
X11Forwarding no
PrintMotd no
PrintLastLog no
# Many workers mount the head at once: do not drop their unauthenticated connections.
MaxStartups 200:30:400
MaxSessions 64
ExposeAuthInfo yes
ClientAliveInterval 15
ClientAliveCountMax 3
SetEnv {setenv}
Subsystem sftp {sftp_server}
ForceCommand {d / 'enter'}
"""
        (d / "sshd_config").write_text(config)

    def _start_sshd(self, sshd: str) -> tuple[bool, str]:
        d = self.sshd_dir
        with contextlib.suppress(FileNotFoundError):
            (d / "sshd.pid").unlink()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), MARKER: self.id, FLEET_MARKER: self.fleet,
               ROOT_MARKER: str(self.dir.parent.parent.resolve())}
        result = subprocess.run(
            [sshd, "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")],
            env=env,
            check=False, capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            return False, result.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = self.sshd_pid()
            if pid and _pid_alive(pid):
                with contextlib.suppress(OSError), socket.create_connection((self.address, self.port), 0.5):
                    return True, ""
            time.sleep(0.02)
        log = (d / "sshd.log").read_text() if (d / "sshd.log").exists() else ""
        return False, log

    def sshd_pid(self) -> int | None:
        try:
            return int((self.sshd_dir / "sshd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def listener_pid(self) -> int | None:
        """The pid of this node's sshd listener, checked against its command line (sshd
        rewrites its process title, which also clobbers what /proc shows of its environ)."""
        pid = self.sshd_pid()
        if pid and _pid_alive(pid) and str(self.sshd_dir / "sshd_config") in _cmdline_of(pid):
            return pid
        return None

    def is_running(self) -> bool:
        return self.listener_pid() is not None

    def processes(self) -> list[int]:
        """Every live process started on this node: the sshd listener, its descendants
        (sessions), and whatever carries the node's marker (daemons that left the tree)."""
        pids = {pid for pid in pids_with_env(MARKER, self.id) if _pid_alive(pid)}
        listener = self.listener_pid()
        if listener:
            pids.add(listener)
            pids.update(_descendants(listener))
        return sorted(pid for pid in pids if _pid_alive(pid))

    def terminate(self, *, exclude_infrastructure: bool = True) -> list[int]:
        """SIGTERM the node's processes, like the soft-off of a preemption notice.
        sshd and sshfs keep running so that a worker can still finish its chunk."""
        signalled = []
        for pid in self.processes():
            cmd = _cmdline_of(pid)
            if exclude_infrastructure and (cmd.startswith(("sshd", "sshfs")) or "sshd" in cmd.split(" ")[0] or "sftp-server" in cmd):
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
        return signalled

    def kill(self, *, preempted: bool = True) -> None:
        """End the node abruptly: sshd first (no new sessions), then every process that
        carries the node's marker (until none is left), then its FUSE mounts."""
        if preempted and self.dir.exists():
            # Recorded first: whoever lists the node while it dies must see PREEMPTED,
            # never a node that is merely not running (TERMINATED).
            self.preempted = True
            self._save()
        for _ in range(20):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for point in fuse_mounts_under(self.dir):
            detach_mount(point)
        if preempted:
            self.preempted = True
        if self.dir.exists():
            self._save()

    def mark_deleting(self) -> None:
        """Recorded (atomically) before a delete kills anything: from now on the node is
        gone for the provider's `list()`, as a cloud's instance is once deleted."""
        if self.dir.exists():
            self.deleting = True
            self._save()

    def destroy(self) -> None:
        """Kill the node, remove the share account it served, delete its directory."""
        self.mark_deleting()
        self.kill(preempted=False)
        release_share_accounts(self.sshd_dir / "sshd_config")
        # A mount still attached would make rmtree walk into the head's shared files.
        if not fuse_mounts_under(self.dir):
            self.remove_dir()

    def remove_dir(self) -> None:
        """Delete the node's directory, moved out of the way first (one rename): a node
        made under the same name meanwhile (a replaced head) gets a directory of its own,
        never one that is half removed. What is left of an interrupted removal is a
        `.<name>.deleted-<id>` directory that the next delete of the name removes."""
        trash = self.dir.with_name(f".{self.name}.deleted-{self.id}")
        try:
            os.rename(self.dir, trash)
        except FileNotFoundError:
            return
        except OSError:
            trash = self.dir
        shutil.rmtree(trash, ignore_errors=True)

    # -- persistence -------------------------------------------------------------------
    def _record(self) -> dict[str, object]:
        return {
            "name": self.name,
            "fleet": self.fleet,
            "id": self.id,
            "address": self.address,
            "port": self.port,
            "user": self.user,
            "labels": self.labels,
            "created_at": self.created_at,
            "preempted": self.preempted,
            "isolation": self.isolation,
            "data_dir": self.data_dir,
            "deleting": self.deleting,
        }

    def _save(self) -> None:
        data = self._record()
        tmp = self.dir / "node.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.dir / "node.json")

    @classmethod
    def load(cls, node_dir: Path) -> LocalNode | None:
        try:
            data = json.loads((node_dir / "node.json").read_text())
        except (OSError, ValueError):
            return None
        if data.get("isolation") == "namespaces":
            from fleet.providers.localns import IsolatedNode

            return IsolatedNode(dir=node_dir, **data)
        return cls(dir=node_dir, **data)

    @classmethod
    def list(cls, root: Path, fleet: str) -> list[LocalNode]:
        base = Path(root) / fleet
        if not base.is_dir():
            return []
        nodes = [cls.load(entry) for entry in sorted(base.iterdir()) if entry.is_dir()]
        return [node for node in nodes if node is not None]


def _descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def kill_marked(node_id: str, *, rounds: int = 20) -> None:
    """SIGKILL every process carrying the node id, repeating while forks race us."""
    for _ in range(rounds):
        pids = [pid for pid in pids_with_env(MARKER, node_id) if _pid_alive(pid)]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def kill_fleet_orphans(root: Path, fleet: str, known_ids: Iterable[str]) -> int:
    """Kill what is left of this fleet's nodes whose directories are gone (the local
    state was deleted): sshd listeners serving a config under <root>/<fleet>/, their
    sessions, and processes carrying the fleet's marker under this root. Returns how many
    were killed, once they are gone."""
    known = set(known_ids)
    resolved_root = str(Path(root).resolve())
    prefix = f"{resolved_root}/{fleet}/"
    victims: set[int] = set()
    for proc in psutil.process_iter(["pid"]):
        pid = proc.info["pid"]
        if pid == os.getpid():
            continue
        cmd = _cmdline_of(pid)
        if cmd.startswith("sshd") and prefix in cmd:
            config = next((word for word in cmd.split() if word.startswith(prefix)), "")
            if not os.path.exists(config):
                victims.add(pid)
                victims.update(_descendants(pid))
            continue
        env = _environ_of(pid)
        if env.get(FLEET_MARKER) != fleet or not env.get(MARKER) or env[MARKER] in known:
            continue
        # Nodes made before the root marker existed: their HOME is under the root.
        if env.get(ROOT_MARKER, "") == resolved_root or (
                ROOT_MARKER not in env and env.get("HOME", "").startswith(prefix)):
            victims.add(pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    release_orphan_share_accounts(prefix)
    # SIGKILL is asynchronous: wait (briefly) so that the ports are closed on return.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_pid_alive(pid) for pid in victims):
        time.sleep(0.02)
    return len(victims)


def iter_fleets(root: Path) -> Iterator[str]:
    if Path(root).is_dir():
        for entry in sorted(Path(root).iterdir()):
            if entry.is_dir():
                yield entry.name
