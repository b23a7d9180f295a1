"""Every seed program in one driver (one `ray.init`), with quick settings by default.

    fleet ray submit --working-dir templates/ray -- python run_all.py [--full]

Prints one JSON line per program; `--full` uses the seeds' own sizes (100 one-second
tasks, 1 s adds, a 1000x1000 product, the seeds' sleeps).
"""

import argparse
import json

import actors
import aggregate
import dependencies
import incremental
import map_reduce
import ray
import tasks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    full = parser.parse_args().full
    ray.init()
    for result in (tasks.run(100, 1.0) if full else tasks.run(8, 0.5),
                   dependencies.run(1000 if full else 200),
                   aggregate.run(1.0 if full else 0.2),
                   incremental.run(1.0 if full else 0.25),
                   actors.run(),
                   map_reduce.run()):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
