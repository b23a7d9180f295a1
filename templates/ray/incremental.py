"""Seeds 003/004: `ray.wait` to process results as they come, and `ray.put`.

    fleet ray submit --working-dir templates/ray -- python incremental.py

Tasks of random length (0-4 s): `ray.get` on all would wait for the slowest, `ray.wait`
hands back each one as soon as it is done. `ray.put` puts a value in the object store
once; tasks given its reference read it there. The sum of 0..3 is 6.
"""

import json
import random
import time

import ray


@ray.remote
def do_some_work(x: int) -> int:
    time.sleep(random.uniform(0, 4))
    return x


def process_incremental(total: int, result: int) -> int:
    time.sleep(1)  # some processing of each result, overlapped with the tasks still running
    return total + result


@ray.remote
def scaled(x: int, factor: int) -> int:
    return x * factor


def main() -> None:
    ray.init()
    start = time.time()
    pending = [do_some_work.remote(x) for x in range(4)]
    total = 0
    order = []
    while pending:
        done, pending = ray.wait(pending)
        value = ray.get(done[0])
        order.append(value)
        total = process_incremental(total, value)
    factor = ray.put(10)  # stored once, passed by reference
    scaled_sum = sum(ray.get([scaled.remote(i, factor) for i in range(4)]))
    print(json.dumps({"program": "incremental", "result": total, "order": order, "put": ray.get(factor),
                      "scaled_sum": scaled_sum, "wall_s": round(time.time() - start, 3)}))


if __name__ == "__main__":
    main()
