"""runtime_install: installing fleet's node runtime on 1 vs 16 local nodes, and the
check that a second `up` makes on a complete fleet.

One local fleet of 16 nodes (head + 15 workers) is brought up without the runtime
(`runtime.install: false`); then the runtime step of `up` (`Runtime.ensure`, the same
code `up` and every replacement run) is timed on 1 node and on all 16, alternating
REPEATS times with the runtime removed in between, so that a slow moment of this shared
machine hits both sizes; the medians are compared (goal: 16 nodes <= 2.0x one node).
The wheel is built before the timing (once per version; its time is reported apart).
Last, the step on the complete fleet (nothing to install: one stamp check per node),
per node (goal < 1 s).

Run: .venv/bin/python benchmarks/runtime_install.py [--repeats N]
Last line: {"install_1_s", "install_16_s", "ratio", "complete_per_node_s", ...}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fleet.fleetops import Fleet, UpResult
from fleet.runtime import build_wheel
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


def timed_ensure(fleet: Fleet, nodes: list) -> float:
    result = UpResult()
    started = time.perf_counter()
    ready = fleet.runtime.ensure(nodes, result)
    elapsed = time.perf_counter() - started
    if result.failures or len(ready) != len(nodes):
        raise SystemExit(f"runtime installation failed: {result.failures}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
        build_wheel(fleet.runtime.cache)
        fleet.runtime.artifacts()
        build_s = time.perf_counter() - started

        def clear() -> None:
            bare.exec(nodes, 'rm -rf "$HOME/.fleet/runtime"')

        ones, sixteens = [], []
        for _ in range(args.repeats):
            clear()
            ones.append(timed_ensure(fleet, nodes[:1]))
            clear()
            sixteens.append(timed_ensure(fleet, nodes))
        complete = [timed_ensure(fleet, nodes) for _ in range(args.repeats)]
    finally:
        bare.down()
        fleet.close()
        bare.close()
        shutil.rmtree(directory, ignore_errors=True)
    one, many, check = statistics.median(ones), statistics.median(sixteens), statistics.median(complete)
    ratio = many / one
    per_node = check / NODES
    print(f"runtime install: 1 node {one:.2f} s, {NODES} nodes {many:.2f} s (ratio {ratio:.2f}, goal <= "
          f"{GOAL_RATIO}); complete fleet {check:.3f} s = {per_node:.3f} s/node (goal < {GOAL_COMPLETE_S}); "
          f"wheel build {build_s:.2f} s", file=sys.stderr)
    print(json.dumps({
        "install_1_s": round(one, 3), "install_16_s": round(many, 3), "ratio": round(ratio, 3),
        "goal_ratio": GOAL_RATIO, "ratio_met": ratio <= GOAL_RATIO,
        "complete_16_s": round(check, 3), "complete_per_node_s": round(per_node, 4),
        "goal_complete_per_node_s": GOAL_COMPLETE_S, "complete_met": per_node < GOAL_COMPLETE_S,
        "wheel_build_s": round(build_s, 3), "repeats": args.repeats, "reference": "install_1_s (same run)",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
