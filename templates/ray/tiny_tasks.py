"""Seed 004: 100,000 tiny tasks (0.1 ms of work each), and the same work batched.

    fleet ray submit --working-dir templates/ray -- python tiny_tasks.py [--items 100000]

Every task costs Ray scheduling, a worker round trip and an object; with 0.1 ms of work
that overhead dominates. Batching the items (here 1,000 per task) is the fix, as the
seed says; for files on the shared directory the bundled worker's chunks do that.
"""

import argparse
import json
import time

import ray


@ray.remote
def tiny_work(x: int) -> int:
    time.sleep(0.0001)
    return x


@ray.remote
def tiny_batch(xs: list[int]) -> list[int]:
    out = []
    for x in xs:
        time.sleep(0.0001)
        out.append(x)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    ray.init()
    start = time.time()
    results = ray.get([tiny_work.remote(x) for x in range(args.items)])
    tiny_s = time.time() - start
    start = time.time()
    batches = ray.get([tiny_batch.remote(list(range(i, min(i + args.batch, args.items))))
                       for i in range(0, args.items, args.batch)])
    batched_s = time.time() - start
    assert sum(results) == sum(x for b in batches for x in b)
    print(json.dumps({"program": "tiny_tasks", "items": args.items, "tiny_tasks_s": round(tiny_s, 3),
                      "batched_s": round(batched_s, 3), "batch": args.batch}))


if __name__ == "__main__":
    main()
