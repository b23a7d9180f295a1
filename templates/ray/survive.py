"""Surviving a preemption: retried tasks and an actor with restarts, while a node goes.

    fleet run templates/ray/survive-job.yaml        # the monitor replaces the lost worker
    fleet preempt <the node it prints as ACTOR_NODE>

Tasks keep Ray's retries (`max_retries`, 3 by default: a task on a node that vanished
runs again elsewhere, so no result is lost). The actor has `max_restarts=-1` and
`max_task_retries=-1`: when its node goes it is recreated on another node and the call
in flight is sent again (its state starts over: what must survive goes to the shared
directory). What does not survive: objects whose only copy was on the lost node and
whose owner is gone (`ray.put` by a task there), and actors without restarts.
"""

import argparse
import json
import os
import time

import ray


@ray.remote(num_cpus=1, max_retries=5)
def work(x: int, seconds: float) -> tuple[int, str]:
    time.sleep(seconds)
    return x, os.environ.get("FLEET_NODE_NAME", "?")


@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=1)
class Tally:
    def __init__(self) -> None:
        self.calls = 0

    def where(self) -> str:
        self.calls += 1
        return os.environ.get("FLEET_NODE_NAME", "?")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--wait-moved", type=float, default=90.0, help="how long to wait for the actor to move")
    args = parser.parse_args()
    ray.init()
    tally = Tally.remote()
    first = ray.get(tally.where.remote())
    print(f"ACTOR_NODE {first}", flush=True)
    start = time.time()
    results = ray.get([work.remote(i, args.seconds) for i in range(args.tasks)])
    wall = time.time() - start
    deadline = time.time() + args.wait_moved
    now = ray.get(tally.where.remote())
    while now == first and time.time() < deadline:  # the actor moves once its node is declared dead
        time.sleep(1)
        now = ray.get(tally.where.remote())
    print(f"ACTOR_NOW {now}", flush=True)
    done = sorted(x for x, _ in results)
    ok = done == list(range(args.tasks))
    print(json.dumps({"program": "survive", "tasks": len(done), "lost": args.tasks - len(set(done)),
                      "all_results": ok, "actor_first": first, "actor_now": now, "actor_moved": now != first,
                      "nodes": sorted({n for _, n in results}), "wall_s": round(wall, 3)}), flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
