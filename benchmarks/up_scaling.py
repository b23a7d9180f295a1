"""up_scaling: `fleet up` of 1 worker vs 16 workers on the local provider.

Runs the real CLI (`fleet up -f SPEC`, as a user would) on a fresh fleet with a trivial
setup command and the shared-directory mounts, times it from start to exit, then
`fleet down --yes`. Each size is measured REPEATS times, alternating (1, 16, 1, 16...)
so that a slow moment of this shared machine hits both; the medians are compared.
Goal: 16 workers take at most 2.0x the time of 1.

`--isolation` picks the local provider's mode (default: namespaces when this machine
can run them, else loopback). In namespaces mode it also times the boot of one
isolated node (namespaces, bridge port, overlay root, startup script, host key, sshd)
against the start of one loopback node (an sshd), measured the same way in this run.

Run: .venv/bin/python benchmarks/up_scaling.py [--repeats N] [--isolation MODE] [--tmpfs]
Last line: {"up_1_s", "up_16_s", "ratio", "isolation", "node_boot_s", ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml
from _tmpfs import private_tmpfs

BIN = Path(sys.executable).parent
FLEET = [str(BIN / "fleet")] if (BIN / "fleet").exists() else [sys.executable, "-m", "fleet"]
GOAL = 2.0


def write_spec(directory: Path, workers: int, isolation: str) -> Path:
    name = f"bench{uuid.uuid4().hex[:8]}"
    spec = {
        "name": name,
        "provider": "local",
        "workers": {"count": workers},
        "ssh": {"connect_timeout": 10, "ready_timeout": 120},
        "setup": ["mkdir -p scratch && echo ready > scratch/setup.txt"],
        "local": {"root": str(directory / "nodes"), "isolation": isolation},
    }
    path = directory / "fleet.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fleet(spec: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command, *rest = args
    return subprocess.run([*FLEET, command, "-f", str(spec), *rest], check=False, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=spec.parent)


def time_up(workers: int, isolation: str) -> float:
    directory = Path(tempfile.mkdtemp(prefix=f"fleet-up-{workers}-"))
    spec = write_spec(directory, workers, isolation)
    try:
        started = time.perf_counter()
        result = fleet(spec, "up", "--json")
        elapsed = time.perf_counter() - started
        data = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
        if result.returncode != 0 or len(data.get("nodes", [])) != workers + 1:
            raise SystemExit(f"fleet up of {workers} worker(s) failed (exit {result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
        check = fleet(spec, "exec", "--nodes", "workers", "--", 'mountpoint -q "$FLEET_SHARED"')
        if check.returncode != 0:
            raise SystemExit(f"the shared directory is not mounted on every worker:\n{check.stderr}")
        return elapsed
    finally:
        down = fleet(spec, "down", "--yes")
        if down.returncode != 0:
            print(f"warning: fleet down failed: {down.stderr}", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)


def time_node_boots(repeats: int) -> dict[str, float]:
    """Median seconds to boot one isolated node, and to start one loopback node."""
    from fleet.providers.localnode import LocalNode, generate_ed25519_keypair
    from fleet.providers.localns import FleetNetwork, IsolatedNode
    from fleet.providers.startup import render_startup_script

    directory = Path(tempfile.mkdtemp(prefix="fleet-boot-"))
    name = f"boot{uuid.uuid4().hex[:8]}"
    root = directory / "nodes"
    public = generate_ed25519_keypair(directory / "key", "bench")
    boots: list[float] = []
    starts: list[float] = []
    try:
        for i in range(repeats):
            script = render_startup_script(provider="local", fleet_name=name, node=f"n{i}", role="worker",
                                           user="root", public_key=public, ssh_port=22)
            started = time.perf_counter()
            node = IsolatedNode.create_isolated(root, name=f"n{i}", fleet=name, user="root", startup_script=script)
            boots.append(time.perf_counter() - started)
            node.destroy()
            started = time.perf_counter()
            plain = LocalNode.create(root, name=f"l{i}", fleet=name, authorized_keys=[public])
            starts.append(time.perf_counter() - started)
            plain.destroy()
    finally:
        FleetNetwork.of(root, name).remove()
        shutil.rmtree(directory, ignore_errors=True)
    boot, start = statistics.median(boots), statistics.median(starts)
    return {"node_boot_s": round(boot, 3), "loopback_node_start_s": round(start, 3),
            "boot_vs_loopback_ratio": round(boot / start, 2)}


def main() -> int:
    from fleet.providers.localns import missing_for_namespaces

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmpfs", action="store_true",
                        help="the fleets' files on a private tmpfs (see benchmarks/_tmpfs.py)")
    parser.add_argument("--isolation", choices=("namespaces", "loopback"),
                        default="namespaces" if missing_for_namespaces() is None else "loopback")
    args = parser.parse_args()
    with private_tmpfs() if args.tmpfs else contextlib.nullcontext():
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    times: dict[int, list[float]] = {1: [], 16: []}
    fleet_env_check = subprocess.run([*FLEET, "--version"], check=False, capture_output=True, text=True)
    if fleet_env_check.returncode != 0:
        raise SystemExit(f"cannot run the fleet CLI: {fleet_env_check.stderr}")
    for repeat in range(args.repeats):
        for workers in (1, 16):
            seconds = time_up(workers, args.isolation)
            times[workers].append(seconds)
            print(f"repeat {repeat + 1}: fleet up with {workers:2d} worker(s): {seconds:.2f} s", flush=True)
    boots = time_node_boots(max(args.repeats, 3)) if args.isolation == "namespaces" else {}
    up_1, up_16 = statistics.median(times[1]), statistics.median(times[16])
    ratio = up_16 / up_1
    print(f"median up: 1 worker {up_1:.2f} s, 16 workers {up_16:.2f} s, ratio {ratio:.2f} "
          f"({'meets' if ratio <= GOAL else 'misses'} the goal of {GOAL}x) on {os.cpu_count()} CPU(s)")
    if boots:
        print(f"one isolated node boots in {boots['node_boot_s']:.3f} s; "
              f"a loopback node starts in {boots['loopback_node_start_s']:.3f} s")
    print(json.dumps({"up_1_s": round(up_1, 3), "up_16_s": round(up_16, 3), "ratio": round(ratio, 3),
                      "goal_ratio": GOAL, "repeats": args.repeats, "isolation": args.isolation,
                      "disk": "tmpfs" if args.tmpfs else "tmp", **boots,
                      "up_1_runs_s": [round(t, 3) for t in times[1]],
                      "up_16_runs_s": [round(t, 3) for t in times[16]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
