"""Helpers of the end-to-end tests: real fleets through the real `fleet` CLI.

Every fleet lives in its own directory: the spec, its `.fleet/<name>/` state and its
`local.root` (where the nodes' sshd directories are). Whatever a test does, the
finalizer runs `fleet down --yes` and then sweeps that root on its own: it kills any
process still tied to the root (sshd listeners, sessions, daemons) and detaches any
mount under it, so that a failing test never leaves servers or mounts behind. The
sweep is independent of the code under test; `leftovers()` is the same sweep without
the killing, for tests that check that `down` left nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

VENV_BIN = Path(sys.executable).parent
FLEET_EXE = VENV_BIN / "fleet"


def fleet_argv() -> list[str]:
    """The installed entry point when there is one (what a user runs), else `-m fleet`."""
    return [str(FLEET_EXE)] if FLEET_EXE.exists() else [sys.executable, "-m", "fleet"]


def unique_name(prefix: str = "ft") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


# -- leftovers: processes and mounts tied to a root ------------------------------------------
def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def processes_under(root: Path, fleet_name: str | None = None) -> list[psutil.Process]:
    """Live processes whose command line, working directory or HOME is under `root`,
    or that carry the local provider's marker for `fleet_name` (fleet names of these
    tests are unique, so this never matches somebody else's fleet)."""
    prefix = str(Path(root).resolve())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        env = _environ(proc.pid)
        cwd = ""
        with contextlib.suppress(psutil.Error):
            cwd = proc.cwd()
        if (prefix in cmd or cwd == prefix or cwd.startswith(prefix + "/")
                or env.get("HOME", "").startswith(prefix + "/")
                or (fleet_name is not None and env.get("FLEET_LOCAL_FLEET") == fleet_name)):
            found.append(proc)
    return found


def mounts_under(root: Path) -> list[str]:
    prefix = str(Path(root).resolve())
    points = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        point = parts[1].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


def network_key(root: Path, fleet_name: str) -> str:
    return hashlib.sha256(f"{Path(root).resolve()}\0{fleet_name}".encode()).hexdigest()[:8]


def _tool(*argv: str) -> str:
    tool = shutil.which(argv[0]) or f"/usr/sbin/{argv[0]}"
    if not os.path.exists(tool) or os.geteuid() != 0:
        return ""
    return subprocess.run([tool, *argv[1:]], check=False, capture_output=True, text=True, timeout=30).stdout


def network_leftovers(root: Path, fleet_name: str) -> dict[str, list[str]]:
    """The fleet's network namespaces, links (bridge, veths) and nftables tables."""
    key = network_key(root, fleet_name)
    netns = sorted(e for e in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
                   if e.startswith(f"fleet-{key}-"))
    links = sorted(link["ifname"] for link in json.loads(_tool("ip", "-j", "link") or "[]")
                   if link.get("ifname", "")[2:10] == key and link["ifname"][:2] in ("fb", "fv", "fp"))
    tables = [line.strip() for line in _tool("nft", "list", "tables").splitlines()
              if line.strip().endswith(f" fleet_{key}")]
    return {"namespaces": netns, "links": links, "nft_tables": tables}


def namespace_mounts(root: Path, fleet_name: str | None = None) -> list[str]:
    """FUSE mounts inside the mount namespaces of the fleet's (isolated) nodes."""
    points = set()
    for proc in processes_under(root, fleet_name):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/mounts").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[2].startswith("fuse"):
                    points.add(f"{proc.pid}:{parts[1]}")
    return sorted(points)


def leftovers(root: Path, fleet_name: str | None = None) -> dict[str, list[str]]:
    found = {
        "processes": [f"{p.pid} {' '.join(p.cmdline()[:6])}" for p in processes_under(root, fleet_name)
                      if _alive(p)],
        "mounts": mounts_under(root),
    }
    if fleet_name is not None and os.geteuid() == 0:
        found.update(network_leftovers(root, fleet_name))
    return found


def nothing_left(found: dict[str, list[str]]) -> bool:
    return not any(found.values())


def sweep_network(root: Path, fleet_name: str) -> None:
    """Kill what runs in the fleet's namespaces; delete them, its links and tables."""
    found = network_leftovers(root, fleet_name)
    for netns in found["namespaces"]:
        for _ in range(20):
            pids = [int(p) for p in _tool("ip", "netns", "pids", netns).split() if p.isdigit()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        _tool("ip", "netns", "del", netns)
    for link in found["links"]:
        _tool("ip", "link", "del", link)
    for table in found["nft_tables"]:
        _tool("nft", "delete", "table", *table.split()[1:])


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def sweep(root: Path, fleet_name: str | None = None) -> dict[str, list[str]]:
    """Kill and detach whatever is left under `root`; return what was found."""
    found = leftovers(root, fleet_name)
    if fleet_name is not None:
        sweep_network(root, fleet_name)
    for _ in range(20):
        procs = [p for p in processes_under(root, fleet_name) if _alive(p)]
        if not procs:
            break
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)  # a test may have stopped it
                proc.kill()
        time.sleep(0.05)
    for point in mounts_under(root):
        for command in (["fusermount3", "-u", "-z", point], ["fusermount", "-u", "-z", point], ["umount", "-l", point]):
            if shutil.which(command[0]) and subprocess.run(command, check=False, capture_output=True, timeout=10).returncode == 0:
                break
    return found


# -- a fleet driven through the CLI --------------------------------------------------------
def write_spec(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class CliFleet:
    """One fleet spec in its own directory, driven through the `fleet` command."""

    dir: Path
    name: str
    root: Path
    spec: Path
    env: dict[str, str] = field(default_factory=dict)
    run_as: str | None = None  # run the CLI as this user (runuser)
    argv: list[str] | None = None  # how to start the CLI, when not fleet_argv()

    @property
    def state_dir(self) -> Path:
        return self.dir / ".fleet" / self.name

    def cli(self, *args: str, timeout: float = 120, check: bool = False,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `fleet <command> -f SPEC <args...>` (the spec option goes right after the command)."""
        command, *rest = args
        argv = [*(self.argv or fleet_argv()), command, "-f", str(self.spec), *rest]
        if self.run_as:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        env = {**os.environ, "COLUMNS": "200", **self.env}
        if self.run_as:
            env["HOME"] = str(self.dir)
        result = subprocess.run(argv, cwd=self.dir, env=env, check=False, capture_output=True, text=True,
                                timeout=timeout, input=input_text, stdin=None if input_text else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"fleet {' '.join(args)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def json(self, *args: str, timeout: float = 120) -> Any:
        result = self.cli(*args, "--json", timeout=timeout)
        try:
            return json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise AssertionError(f"fleet {' '.join(args)} --json printed no JSON (exit {result.returncode})\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}") from None

    def up(self) -> dict[str, Any]:
        data = self.json("up", timeout=180)
        assert not data["failures"], data
        return data

    def status(self, *extra: str) -> dict[str, Any]:
        return self.json("status", *extra)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.status("--no-probe")["nodes"]}

    def exec_json(self, *command: str, nodes: str = "all", timeout: float = 120) -> tuple[int, dict[str, dict]]:
        result = self.cli("exec", "--nodes", nodes, "--json", "--", *command, timeout=timeout)
        data = json.loads(result.stdout.strip().splitlines()[-1])
        return result.returncode, {r["node"]: r for r in data["results"]}

    @property
    def head(self) -> str:
        return f"{self.name}-head"

    def workers(self) -> list[str]:
        return sorted(n for n, info in self.nodes().items() if info["role"] == "worker")

    def node_dir(self, node: str) -> Path:
        return self.root / self.name / node

    @property
    def isolated(self) -> bool:
        """Whether the fleet's nodes run in namespaces (read from their records)."""
        for record in (self.root / self.name).glob("*/node.json"):
            return json.loads(record.read_text()).get("isolation") == "namespaces"
        return False

    def home(self, node: str) -> Path:
        """The node's home directory, as this machine (the provider's disk) sees it."""
        if self.isolated:
            return self.node_dir(node) / "disk" / "root"  # the tests run isolated fleets as root
        return self.node_dir(node) / "home"

    def shared_dir(self) -> Path:
        """The head's shared directory, as this machine reaches it: on an isolated head
        `~/shared` links into its share chroot (fleet.share), resolved inside the head."""
        if self.isolated:
            from fleet.providers.localns import IsolatedNode

            head = IsolatedNode.load(self.node_dir(self.head))
            assert isinstance(head, IsolatedNode)
            return head.host_path("/root/shared")
        return self.home(self.head) / "shared"

    def node_home(self, node: str) -> Path:
        """The node's home directory, as the node itself sees it."""
        return Path("/root") if self.isolated else self.home(node)

    def node_mounts(self, node: str) -> list[str]:
        """The FUSE mount points the node sees (its own mount namespace when isolated)."""
        if self.isolated:
            init = json.loads((self.node_dir(node) / "node.json").read_text()).get("init_pid")
            source = Path(f"/proc/{init}/mounts")
        else:
            source = Path("/proc/mounts")
        with contextlib.suppress(OSError):
            return [line.split()[1] for line in source.read_text().splitlines()
                    if line.split()[2].startswith("fuse")
                    and (self.isolated or line.split()[1].startswith(str(self.node_dir(node))))]
        return []

    def teardown(self) -> dict[str, list[str]]:
        with contextlib.suppress(Exception):
            self.cli("down", "--yes", timeout=120)
        return sweep(self.root, self.name)


def spec_data(name: str, root: Path, workers: int, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "provider": "local",
        "workers": {"count": workers},
        "ssh": {"connect_timeout": 3, "ready_timeout": 60},
        "setup": ["mkdir -p scratch", 'echo "set up $FLEET_NODE_NAME" > scratch/setup.txt'],
        "local": {"root": str(root)},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def new_fleet(base: Path, workers: int, *, name: str | None = None, run_as: str | None = None,
              **overrides: Any) -> CliFleet:
    name = name or unique_name()
    directory = base / name
    directory.mkdir(parents=True)
    root = directory / "nodes"
    spec = write_spec(directory / "fleet.yaml", spec_data(name, root, workers, **overrides))
    return CliFleet(dir=directory, name=name, root=root, spec=spec, run_as=run_as)


