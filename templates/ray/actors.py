"""Seed 004: a stateful actor, the Counter, four of them, and one that survives its node.

    fleet ray submit --working-dir templates/ray -- python actors.py

Each Counter keeps its own state: one increment each reads [1, 1, 1, 1], ten more read
[11, 11, 11, 11]. An actor lives on one node: when a spot node is preempted, an actor
without restarts is lost (its calls raise ActorDiedError). `max_restarts=-1` recreates it
elsewhere (its state starts over from __init__; keep what matters in checkpoints on the
shared directory) and `max_task_retries=-1` resends the calls that were in flight.
"""

import json

import ray


@ray.remote(max_restarts=-1, max_task_retries=-1)
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def increment(self) -> None:
        self.n += 1

    def read(self) -> int:
        return self.n


def run() -> dict:
    counters = [Counter.remote() for _ in range(4)]
    [c.increment.remote() for c in counters]
    first = ray.get([c.read.remote() for c in counters])
    for _ in range(10):
        [c.increment.remote() for c in counters]
    second = ray.get([c.read.remote() for c in counters])
    return {"program": "actors", "first": first, "second": second}


def main() -> None:
    ray.init()
    print(json.dumps(run()))


if __name__ == "__main__":
    main()
