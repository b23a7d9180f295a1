"""Seeds 003/004: `ray.wait` to process results as they come, and `ray.put`.

    fleet ray submit --working-dir templates/ray -- python incremental.py [--scale 1]

Tasks of random length (0-4 s): `ray.get` on all would wait for the slowest, `ray.wait`
hands back each one as soon as it is done. `ray.put` puts a value in the object store
once; tasks given its reference read it there. The sum of 0..3 is 6.
"""

import argparse
import json
import random
import time

import ray


@ray.remote
def do_some_work(x: int, scale: float) -> int:
    time.sleep(random.uniform(0, 4) * scale)
    return x


def process_incremental(total: int, result: int, scale: float) -> int:
    time.sleep(1 * scale)  # some processing of each result, overlapped with the tasks still running
    return total + result


@ray.remote
def scaled(x: int, factor: int) -> int:
    return x * factor


def run(scale: float = 1.0) -> dict:
    start = time.time()
    pending = [do_some_work.remote(x, scale) for x in range(4)]
    total = 0
    order = []
    while pending:
        done, pending = ray.wait(pending)
        value = ray.get(done[0])
        order.append(value)
        total = process_incremental(total, value, scale)
    factor = ray.put(10)  # stored once, passed by reference
    scaled_sum = sum(ray.get([scaled.remote(i, factor) for i in range(4)]))
    return {"program": "incremental", "result": total, "order": order, "put": ray.get(factor),
            "scaled_sum": scaled_sum, "wall_s": round(time.time() - start, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the seed's sleeps")
    scale = parser.parse_args().scale
    ray.init()
    print(json.dumps(run(scale)))


if __name__ == "__main__":
    main()
