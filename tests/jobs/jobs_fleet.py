"""Fixtures of the job tests: real local fleets (one OpenSSH server per node, sshfs
mounts of the head's shared dir) driven through the `fleet` CLI.

Every fleet fixture runs `fleet down --yes` when it ends, also when the test failed,
then sweeps whatever could be left under the test's local root: processes of the fleet
(they carry `FLEET_LOCAL_FLEET=<name>` or name the root on their command line) and
FUSE mounts under the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from fleet.providers.localnode import FLEET_MARKER, LocalNode, detach_mount, fuse_mounts_under
from fleet.providers.localns import FleetNetwork, IsolatedNode, missing_for_namespaces

FLEET_BIN = str(Path(sys.executable).with_name("fleet"))
HERE = Path(__file__).resolve().parent
PLUGINS_ON_NODE = "/root/.fleet-test-plugins"  # isolated nodes' home is /root (the tests run as root)


def ship_plugins_command() -> str:
    """A `setup:` command that writes jobs_plugins.py into PLUGINS_ON_NODE."""
    source = (HERE / "jobs_plugins.py").read_text()
    assert "FLEET_PLUGINS_EOF" not in source
    return (f"mkdir -p {PLUGINS_ON_NODE} && cat > {PLUGINS_ON_NODE}/jobs_plugins.py <<'FLEET_PLUGINS_EOF'\n"
            f"{source}FLEET_PLUGINS_EOF")


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return ""


def fleet_processes(fleet_name: str, root: Path | None = None) -> list[psutil.Process]:
    """Processes started on the fleet's nodes (or serving a config under `root`): on
    loopback nodes they carry the fleet's marker; on isolated ones (`root` given) they
    are whatever runs in the fleet's network namespaces."""
    found = []
    pids: set[int] = set()
    if root is not None:
        for netns in FleetNetwork.of(root / "nodes", fleet_name).namespaces():
            listed = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
            pids.update(int(p) for p in listed.stdout.split() if p.isdigit())
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        if (proc.pid in pids or _environ(proc).get(FLEET_MARKER) == fleet_name
                or (root is not None and str(root) in _cmdline(proc))):
            found.append(proc)
    return found


def launched_processes_matching(fleet_name: str, text: str) -> list[str]:
    """Command lines containing `text` of the processes anywhere on this machine that
    fleet started on a node of `fleet_name` (they inherit the launcher's
    FLEET_FLEET=<name>): found also once the nodes' namespaces are gone."""
    return [cmd for proc in psutil.process_iter()
            if _environ(proc).get("FLEET_FLEET") == fleet_name and text in (cmd := _cmdline(proc))]


def node_processes_matching(fleet_name: str, text: str, root: Path | None = None) -> list[str]:
    """Command lines of the fleet's node processes that contain `text` (like
    `pgrep -f TEXT`, limited to the nodes' processes; give `root` for isolated nodes)."""
    return [cmd for proc in fleet_processes(fleet_name, root) if text in (cmd := _cmdline(proc))]


def sweep(fleet_name: str, root: Path) -> list[str]:
    """Kill what is left of the fleet and detach its mounts; returns what was found."""
    left = []
    for _ in range(5):
        procs = fleet_processes(fleet_name, root)
        if not procs:
            break
        for proc in procs:
            left.append(_cmdline(proc))
            with contextlib.suppress(psutil.Error, OSError):
                proc.send_signal(signal.SIGKILL)
        time.sleep(0.1)
    for point in fuse_mounts_under(root):
        left.append(f"mount {point}")
        detach_mount(point)
    if missing_for_namespaces() is None:  # this fleet's bridge, namespaces and tables, if any are left
        left.extend(FleetNetwork.of(root / "nodes", fleet_name).remove())
    return left


class LocalFleet:
    """A fleet of real local nodes, driven through the `fleet` command line."""

    def __init__(self, root: Path, *, workers: int = 3, monitor: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None, isolation: str = "auto") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.name = f"jt{uuid.uuid4().hex[:6]}"
        self.spec_path = root / "fleet.yaml"
        # `auto`: isolated nodes as root (the jobs run with the runtime installed from the
        # image, the test tree out of sight); tests name `loopback` where they need it.
        self.isolation = isolation
        spec: dict[str, Any] = {
            "name": self.name,
            "provider": "local",
            "workers": {"count": workers},
            "local": {"root": str(root / "nodes"), "isolation": isolation},
            "monitor": {"interval": 1, "grace": 4, **(monitor or {})},
        }
        extra = dict(extra or {})
        if self.isolated:
            # The test plug-ins reach isolated nodes the way a user's own code does: `setup:`
            # writes them on every node (replacements too); the test tree stays invisible.
            extra["setup"] = [ship_plugins_command(), *extra.get("setup", [])]
        spec.update(extra)
        self.spec = spec
        self.spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))

    # -- the CLI --------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 180, check: bool = False) -> subprocess.CompletedProcess[str]:
        command = [FLEET_BIN, args[0], "-f", str(self.spec_path), *args[1:]]
        result = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=timeout,
                                env=self.env(), check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        command = [FLEET_BIN, args[0], "-f", str(self.spec_path), *args[1:]]
        return subprocess.Popen(command, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env())

    @contextlib.contextmanager
    def running(self, *args: str) -> Iterator[subprocess.Popen[str]]:
        """`popen(*args)`, killed and reaped on the way out when it still runs (a test
        that failed or timed out leaves no `fleet` process behind)."""
        process = self.popen(*args)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()

    @staticmethod
    def env() -> dict[str, str]:
        return {**os.environ, "COLUMNS": "200", "TERM": "dumb"}

    def up(self) -> None:
        self.cli("up", timeout=180, check=True)

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.cli("down", "--yes", timeout=180)

    def status(self) -> list[dict[str, Any]]:
        """Nodes as the provider lists them (node.json of each local node)."""
        nodes = []
        for path in sorted((self.root / "nodes" / self.name).glob("*/node.json")):
            nodes.append(json.loads(path.read_text()))
        return nodes

    def events(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("events", "--json", check=True).stdout)

    # -- paths ----------------------------------------------------------------------------
    @property
    def isolated(self) -> bool:
        """Whether the fleet's nodes run in namespaces of their own (`auto` as root)."""
        if self.isolation == "auto":
            return missing_for_namespaces() is None
        return self.isolation == "namespaces"

    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / self.name / node

    def on_node(self, node: str, path: str) -> Path:
        """A path of the running isolated node as this machine reaches it (resolved
        inside the node: IsolatedNode.host_path)."""
        isolated = LocalNode.load(self.node_dir(node))
        assert isinstance(isolated, IsolatedNode), f"{node} is not an isolated node"
        return isolated.host_path(path)

    @property
    def shared(self) -> Path:
        head = f"{self.name}-head"
        if self.isolated:  # a symlink into the head's share chroot (fleet.share)
            return self.on_node(head, "/root/shared")
        return self.node_home(head) / "shared"

    def job_dir(self, job: str) -> Path:
        return self.shared / "jobs" / job

    def node_home(self, node: str) -> Path:
        """The node's home, as this machine reaches it (isolated fleets run as root)."""
        if self.isolated:
            return self.on_node(node, "/root")
        return self.node_dir(node) / "home"

    def netns(self, node: str) -> str:
        """The isolated node's network namespace."""
        nid = json.loads((self.node_dir(node) / "node.json").read_text())["nid"]
        return FleetNetwork.of(self.root / "nodes", self.name).netns(nid)

    def server_health(self, record: dict[str, Any]) -> dict[str, Any]:
        """The /health of a server of `fleet serve` (its registry record), seen from its
        node: loopback nodes share this machine's 127.0.0.1; an isolated node's servers
        are reached inside its network namespace (the bridge lets only SSH in from here)."""
        url = f"http://127.0.0.1:{int(record['port'])}/health"
        if not self.isolated:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return json.loads(answer.read())
        fetch = f"import sys, urllib.request; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
        done = subprocess.run(["ip", "netns", "exec", self.netns(record["node"]), sys.executable, "-c", fetch],
                              capture_output=True, text=True, timeout=30, check=True)
        return json.loads(done.stdout)

    def sshd_pid(self, node: str) -> int:
        """The host pid of the node's listening sshd."""
        if not self.isolated:
            return int((self.node_dir(node) / "sshd" / "sshd.pid").read_text())
        init = json.loads((self.node_dir(node) / "node.json").read_text())["init_pid"]
        listeners = [child.pid for child in psutil.Process(init).children() if child.name() == "sshd"]
        assert len(listeners) == 1, f"{node}: sshd listeners {listeners}"
        return listeners[0]

    def home_on_node(self, node: str) -> str:
        """The node's home as the node itself sees it."""
        return "/root" if self.isolated else str(self.node_home(node))

    def plugin_env(self) -> dict[str, str]:
        """The job env that puts the test plug-ins on the worker's path: this directory on
        loopback nodes, the copy `setup:` wrote on isolated ones."""
        return {"PYTHONPATH": PLUGINS_ON_NODE if self.isolated else str(HERE)}

    def worker(self, slot: int, generation: int = 1) -> str:
        return f"{self.name}-w{slot}-g{generation}"

    def write_job(self, job: dict[str, Any], filename: str | None = None) -> Path:
        path = self.root / (filename or f"{job['name']}.yaml")
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        return path


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[..., LocalFleet]]:
    """Factory: `make_fleet(workers=3, monitor={...})` -> a LocalFleet that is up."""
    made: list[LocalFleet] = []

    def make(**kwargs: Any) -> LocalFleet:
        fleet = LocalFleet(tmp_path / f"f{len(made)}", **kwargs)
        made.append(fleet)
        fleet.up()
        return fleet

    try:
        yield make
    finally:
        for fleet in made:
            finish_fleet(fleet)


def finish_fleet(fleet: LocalFleet) -> None:
    try:
        fleet.down()
    finally:
        sweep(fleet.name, fleet.root)


@pytest.fixture(scope="module")
def module_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """One fleet (head + 3 workers) shared by the tests of a module that do not break it."""
    root = tmp_path_factory.mktemp("fleet")
    fleet = LocalFleet(root, workers=3)
    try:
        fleet.up()
        yield fleet
    finally:
        finish_fleet(fleet)


# -- jobs and checks ----------------------------------------------------------------------
def checksum_job(name: str, items: int, *, chunk_size: int = 20, lease_seconds: int = 8, batch_size: int = 5,
                 **extra: Any) -> dict[str, Any]:
    """A job over `items` small files made by `prepare` on the head (handler set by
    `plain_job` or `counted_job`)."""
    worker: dict[str, Any] = {
        "inputs": f"data-{name}/*.txt",
        "outputs": f"out-{name}",
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "max_wait_ms": 5,
        "lease_seconds": lease_seconds,
    }
    job: dict[str, Any] = {
        "name": name,
        "nodes": "workers",
        "prepare": [
            (f'mkdir -p "$FLEET_SHARED/data-{name}" && cd "$FLEET_SHARED/data-{name}" && '
             f'for i in $(seq 1 {items}); do echo "item $i of {name}" > "item-$i.txt"; done')
        ],
        "worker": worker,
        **extra,
    }
    return job


def counted_job(name: str, items: int, count_dir: Path | str, *, delay_s: float,
                plugin_env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """The test plugin's slow checksum (same outputs, `delay_s` per item), which counts
    every item it computes in `count_dir` (one file per process, flushed per batch; a
    path the nodes see). `plugin_env`: the fleet's `plugin_env()` (default: loopback's)."""
    job = checksum_job(name, items, **kwargs)
    job["env"] = dict(plugin_env or {"PYTHONPATH": str(HERE)})
    job["worker"]["handler"] = "jobs_plugins:slow_checksum"
    job["worker"]["handler_options"] = {"delay_s": delay_s, "count_dir": str(count_dir)}
    return job


def plain_job(name: str, items: int, **kwargs: Any) -> dict[str, Any]:
    job = checksum_job(name, items, **kwargs)
    job["worker"]["handler"] = "checksum"
    return job


def check_outputs(fleet: LocalFleet, job: dict[str, Any], *, complete: bool = True) -> int:
    """Every input has exactly one correct output (or none yet, when not `complete`);
    no temporary file is left anywhere in the job's tree. Returns the outputs' count."""
    data = fleet.shared / job["worker"]["inputs"].split("/")[0]
    outputs = fleet.shared / job["worker"]["outputs"]
    inputs = sorted(p.name for p in data.iterdir())
    found = sorted(p.name for p in outputs.iterdir()) if outputs.exists() else []
    expected = {f"{name}.sha256" for name in inputs}
    strays = [name for name in found if name not in expected]
    assert not strays, f"unexpected files among the outputs: {strays[:5]}"
    if complete:
        assert len(found) == len(inputs), f"{len(inputs) - len(found)} input(s) without output"
    for name in found:
        digest = hashlib.sha256((data / name[: -len('.sha256')]).read_bytes()).hexdigest()
        assert (outputs / name).read_text() == digest + "\n", f"wrong output {name}"
    temporary = [str(p) for base in (outputs, fleet.job_dir(job["name"])) if base.exists()
                 for p in base.rglob("*") if p.name.endswith(".tmp")]
    assert not temporary, f"temporary files left: {temporary[:5]}"
    return len(found)


def computed_items(count_dir: Path) -> int:
    """Items the plugin computed, over every process of every node (preempted ones too)."""
    return sum(len(p.read_text().splitlines()) for p in count_dir.glob("*.count"))


def metrics_batch_items(fleet: LocalFleet, job: str) -> int:
    """Sum of `items` over the "batch" lines of metrics/<node>.worker*.jsonl."""
    total = 0
    for path in fleet.job_dir(job).glob("metrics/*.worker*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a last line that was not flushed whole
            if record.get("kind") == "batch":
                total += int(record["items"])
    return total


def done_chunks(fleet: LocalFleet, job: str) -> int:
    done = fleet.job_dir(job) / "done"
    return len([p for p in done.iterdir() if not p.name.startswith(".")]) if done.exists() else 0


def wait_for(condition: Callable[[], bool], timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def summary_of(result: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> dict[str, Any]:
    stdout = result.stdout if hasattr(result, "stdout") else result[1]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary in: {stdout!r}"
    return json.loads(lines[-1])
