"""Seed 003: linear vs tree aggregation of 1..8 with one-second `add` tasks.

    fleet ray submit --working-dir templates/ray -- python aggregate.py [--seconds 1]

The linear chain has 7 dependent steps (~7 s); the tree has depth 3 (~3 s). Both give 36.
"""

import argparse
import json
import time

import ray


@ray.remote
def add(x: int, y: int, seconds: float) -> int:
    time.sleep(seconds)
    return x + y


def run(s: float = 1.0) -> dict:
    start = time.time()
    linear = add.remote(1, 2, s)
    for value in range(3, 9):
        linear = add.remote(linear, value, s)
    linear_result = ray.get(linear)
    linear_s = time.time() - start

    start = time.time()
    level = [add.remote(a, a + 1, s) for a in (1, 3, 5, 7)]
    while len(level) > 1:  # pairs of the level below: depth log2(n)
        level = [add.remote(level[i], level[i + 1], s) for i in range(0, len(level), 2)]
    tree_result = ray.get(level[0])
    tree_s = time.time() - start
    return {"program": "aggregate", "linear": linear_result, "tree": tree_result,
            "linear_s": round(linear_s, 3), "tree_s": round(tree_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0)
    seconds = parser.parse_args().seconds
    ray.init()
    print(json.dumps(run(seconds)))


if __name__ == "__main__":
    main()
