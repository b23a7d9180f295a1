"""runtime_install: installing fleet's node runtime on 1 vs 16 local nodes, and the
check that a second `up` makes on a complete fleet.

One local fleet of 16 nodes (head + 15 workers) is brought up without the runtime
(`runtime.install: false`); then the runtime step of `up` (`Runtime.ensure`, the same
code `up` and every replacement run) is timed on 1 node and on all 16, alternating
REPEATS times with the runtime removed in between, so that a slow moment of this shared
machine hits both sizes; the medians are compared (goal: 16 nodes <= 2.0x one node).

Two cases, each against its own 1-node reference:
- fresh (`install_*`, the goal's figures): the fleet knows no layout yet, as on its first
  `up`: one node (the pilot) installs in full, the others of its environment stage the
  tree meanwhile and then get its layout on the same channel. 1 node = the pilot alone.
- known (`known_*`): the layout is known (a replacement, an `up` after a node lost its
  runtime): every node gets the tree and the layout in its one operation.
Each removed runtime is moved aside, not deleted, until the fleet goes (see clear()).
The wheel and its tree are built before the timing (once per source digest, in the
user's cache; the build from scratch is timed apart). Last, the step on the complete
fleet (nothing to install: one stamp check per node), per node (goal < 1 s).

Run: .venv/bin/python benchmarks/runtime_install.py [--repeats N] [--tmpfs]
Last line: {"install_1_s", "install_16_s", "ratio", "known_ratio", "complete_per_node_s", ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from _tmpfs import private_tmpfs

from fleet.fleetops import Fleet, UpResult
from fleet.runtime import LAYOUTS, Runtime, build_tree, build_wheel
from fleet.spec.models import FleetSpec

GOAL_RATIO = 2.0
GOAL_COMPLETE_S = 1.0
NODES = 16


def spec_for(directory: Path, name: str, *, install: bool) -> FleetSpec:
    return FleetSpec.model_validate({
        "name": name, "provider": "local", "workers": {"count": NODES - 1},
        "ssh": {"ready_timeout": 120}, "local": {"root": str(directory / "nodes")},
        "runtime": {"install": install},
    })


def node_cpu_s(inits: list[int]) -> float:
    """CPU seconds used so far by the nodes' processes (each node's init and everything
    under it, the reaped ones included through their parents' children times)."""
    total = 0.0
    for init in inits:
        try:
            tree = [psutil.Process(init), *psutil.Process(init).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in tree:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
    return total


def timed_ensure(fleet: Fleet, nodes: list, inits: list[int] | None = None,
                 cpu: dict[str, list[float]] | None = None) -> float:
    result = UpResult()
    node_before, own_before = node_cpu_s(inits or []), time.process_time()
    started = time.perf_counter()
    ready = fleet.runtime.ensure(nodes, result)
    elapsed = time.perf_counter() - started
    if cpu is not None:
        cpu["nodes"].append(node_cpu_s(inits or []) - node_before)
        cpu["control_plane"].append(time.process_time() - own_before)
    if result.failures or len(ready) != len(nodes):
        raise SystemExit(f"runtime installation failed: {result.failures}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmpfs", action="store_true",
                        help="the fleets' files on a private tmpfs (see benchmarks/_tmpfs.py)")
    args = parser.parse_args()
    with private_tmpfs() if args.tmpfs else contextlib.nullcontext():
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="fleet-runtime-bench-"))
    name = f"rt{uuid.uuid4().hex[:8]}"
    spec_path = directory / "fleet.yaml"
    spec_path.write_text("# written by benchmarks/runtime_install.py\n")
    bare = Fleet(spec_for(directory, name, install=False), spec_path)
    fleet = Fleet(spec_for(directory, name, install=True), spec_path)
    try:
        up = bare.up()
        if not up.ok or len(up.nodes) != NODES:
            print(f"up failed: {up.failures}", file=sys.stderr)
            return 1
        nodes = up.nodes
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fleet-wheel-") as scratch:
            build_tree(build_wheel(Path(scratch)))
        build_s = time.perf_counter() - started
        fleet.runtime.artifacts()

        cleared = iter(range(10**6))

        def clear(*, forget: bool) -> None:
            # Moved aside, deleted with the nodes at the end: on this machine every node's
            # disk is one ext4, whose inode allocator scans past the inodes deleted in the
            # last seconds (recently_deleted(), measured with perf: 60% of tar's CPU right
            # after an rm -rf of 16 runtimes). A cloud's nodes each unpack on a disk of their own.
            bare.exec(nodes, f'mkdir -p "$HOME/.fleet-old" && mv "$HOME/.fleet/runtime" "$HOME/.fleet-old/{next(cleared)}" '
                             '2>/dev/null; true')
            if forget:  # as on a fleet's first `up`: no layout known
                shutil.rmtree(fleet.runtime.cache / LAYOUTS, ignore_errors=True)
                fleet.runtime = Runtime(fleet)

        inits = [json.loads(path.read_text())["init_pid"] for path in (directory / "nodes").rglob("node.json")]
        times: dict[tuple[bool, int], list[float]] = {(f, n): [] for f in (True, False) for n in (1, NODES)}
        cpu: dict[tuple[bool, int], dict[str, list[float]]] = {key: {"nodes": [], "control_plane": []}
                                                                for key in times}
        for _ in range(args.repeats):
            for forget in (True, False):
                for size in (1, NODES):
                    clear(forget=forget)
                    times[(forget, size)].append(timed_ensure(fleet, nodes[:size], inits, cpu[(forget, size)]))
        complete = [timed_ensure(fleet, nodes) for _ in range(args.repeats)]
    finally:
        bare.down()
        fleet.close()
        bare.close()
        shutil.rmtree(directory, ignore_errors=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    one, many = median[(True, 1)], median[(True, NODES)]
    known_one, known_many = median[(False, 1)], median[(False, NODES)]
    check = statistics.median(complete)
    ratio, known_ratio = many / one, known_many / known_one
    per_node = check / NODES
    print(f"runtime install, fresh: 1 node {one:.2f} s, {NODES} nodes {many:.2f} s (ratio {ratio:.2f}, goal <= "
          f"{GOAL_RATIO}); layout known: {known_one:.2f} s, {known_many:.2f} s (ratio {known_ratio:.2f}); "
          f"complete fleet {check:.3f} s = {per_node:.3f} s/node (goal < {GOAL_COMPLETE_S}); "
          f"wheel build {build_s:.2f} s", file=sys.stderr)
    print(json.dumps({
        "install_1_s": round(one, 3), "install_16_s": round(many, 3), "ratio": round(ratio, 3),
        "goal_ratio": GOAL_RATIO, "ratio_met": ratio <= GOAL_RATIO,
        "known_1_s": round(known_one, 3), "known_16_s": round(known_many, 3), "known_ratio": round(known_ratio, 3),
        "complete_16_s": round(check, 3), "complete_per_node_s": round(per_node, 4),
        "goal_complete_per_node_s": GOAL_COMPLETE_S, "complete_met": per_node < GOAL_COMPLETE_S,
        "wheel_build_s": round(build_s, 3), "repeats": args.repeats, "disk": "tmpfs" if args.tmpfs else "tmp",
        "reference": "install_1_s / known_1_s (same run)",
        "runs_s": {f"{'fresh' if f else 'known'}_{n}": [round(t, 3) for t in v] for (f, n), v in times.items()},
        # CPU seconds (medians): all the nodes' processes together, and this control plane.
        "cpu_s": {f"{'fresh' if f else 'known'}_{n}": {who: round(statistics.median(v), 3) for who, v in c.items()}
                  for (f, n), c in cpu.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
