"""Seed 003: task dependencies: two matrices made by tasks, multiplied by a third.

    fleet ray submit --working-dir templates/ray -- python dependencies.py [--size 1000]

Ray starts `multiply_matrices` only when both `create_matrix` results exist; the object
references are passed, not the matrices (Ray moves them between nodes). A chain of
dependent tasks runs no faster than in a row: parallelism needs independent tasks.
"""

import argparse
import json
import time

import numpy as np
import ray


@ray.remote
def create_matrix(size: list[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=size)


@ray.remote
def multiply_matrices(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.dot(x, y)


def run(size: int = 1000) -> dict:
    start = time.time()
    x_id = create_matrix.remote([size, size], 1)
    y_id = create_matrix.remote([size, size], 2)
    z = ray.get(multiply_matrices.remote(x_id, y_id))
    expected = np.dot(np.random.default_rng(1).normal(size=[size] * 2), np.random.default_rng(2).normal(size=[size] * 2))
    return {"program": "dependencies", "shape": list(z.shape), "matches_local": bool(np.allclose(z, expected)),
            "wall_s": round(time.time() - start, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1000)
    args = parser.parse_args()
    ray.init()
    print(json.dumps(run(args.size)))


if __name__ == "__main__":
    main()
