"""Seed 003: 100 one-second remote tasks, spread over the fleet's workers.

    fleet ray submit --working-dir templates/ray -- python tasks.py [--tasks 100] [--seconds 1]

With W workers of C CPUs this takes about ceil(tasks / (W*C)) seconds instead of `tasks`
seconds in a row; the last line is JSON: the results' sum, the wall time, the nodes used.
"""

import argparse
import json
import os
import time

import ray


@ray.remote(num_cpus=1)  # retried on another node when the one running it is preempted
def f(x: int, seconds: float) -> tuple[int, str]:
    time.sleep(seconds)
    return x, os.environ.get("FLEET_NODE_NAME", ray.get_runtime_context().get_node_id())


def run(tasks: int = 100, seconds: float = 1.0) -> dict:
    cpus = int(ray.cluster_resources().get("CPU", 0))
    start = time.time()
    results = ray.get([f.remote(i, seconds) for i in range(tasks)])
    wall = time.time() - start
    return {"program": "tasks", "sum": sum(x for x, _ in results), "tasks": len(results),
            "wall_s": round(wall, 3), "cpus": cpus, "nodes": sorted({node for _, node in results})}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    ray.init()
    print(json.dumps(run(args.tasks, args.seconds)))


if __name__ == "__main__":
    main()
