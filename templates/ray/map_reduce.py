"""Seed 004: map-reduce, simple and as a tree.

    fleet ray submit --working-dir templates/ray -- python map_reduce.py

Map i -> 2i over 0..99 as 100 tasks; reduce in one task over all 100 results, or in
five partial sums of 20 and one over those (a tree: no single task waits for all 100
inputs, and partial sums run where their inputs are). Both give 9900.
"""

import json

import numpy as np
import ray


@ray.remote
def map_one(obj: int, f) -> int:
    return f(obj)


@ray.remote
def sum_results(*elements: int) -> int:
    return int(np.sum(elements))


def run() -> dict:
    items = list(range(100))
    remote_elements = [map_one.remote(i, lambda i: i * 2) for i in items]
    simple = ray.get(sum_results.remote(*remote_elements))
    intermediate = [sum_results.remote(*remote_elements[i * 20:(i + 1) * 20]) for i in range(5)]
    tree = ray.get(sum_results.remote(*intermediate))
    return {"program": "map_reduce", "simple": simple, "tree": tree}


def main() -> None:
    ray.init()
    print(json.dumps(run()))


if __name__ == "__main__":
    main()
