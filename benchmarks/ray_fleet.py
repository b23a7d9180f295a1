"""ray_fleet: the seeds' Ray programs on a local fleet (head + W workers, isolated nodes).

1. Seed 003's 100 one-second tasks (`templates/ray/tasks.py`, after a warm-up job) on W
   workers x C CPUs: `wall_s` as the driver measures it, `ideal_s` = ceil(100 / (W*C)),
   `ratio` = wall_s / ideal_s (goal <= 1.2).
2. Seed 004's 100,000 tiny tasks (`tiny_tasks.py`: 0.1 ms of work each, one task per
   item): `tiny_tasks_s`, and the same items batched 1,000 per task (`tiny_batched_s`);
   the reference, measured in the same run: the bundled worker's records mode on the
   same number of items (`benchmarks/tiny_items.py`'s job: `checksum`, one process, on
   this machine), `records_items_s`.
3. One worker preempted (`fleet preempt`, no notice) while `fleet run` follows a `ray:`
   job of retried tasks and an actor with restarts (`survive.py`): `detect_s` (the kill
   -> Ray marks the node DEAD, goal <= 10), `rejoin_s` (the kill -> the slot's
   replacement ALIVE in Ray, made by `fleet run`'s monitor), `tasks_lost` (goal 0), and
   whether the actor moved.
4. `fleet down`: `ray_processes_left` (goal 0).

Env: BENCH_WORKERS (2), BENCH_TASKS (100), BENCH_TINY (100000). The machine this runs on
is shared: say how loaded it was next to the figures. Last line: one JSON object.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "jobs"))
sys.path.insert(0, str(HERE))

from jobs_fleet import LocalFleet, finish_fleet, launched_processes_matching, wait_for
from tiny_items import bundled_worker_rate

WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
TASKS = int(os.environ.get("BENCH_TASKS", "100"))
TINY = int(os.environ.get("BENCH_TINY", "100000"))
TEMPLATES = REPO / "templates" / "ray"


def program_json(text: str, program: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{") and f'"program": "{program}"' in line:
            return json.loads(line)
    raise SystemExit(f"no result of {program} in:\n{text[-3000:]}")


def submit(fleet: LocalFleet, *command: str, timeout: float = 900) -> str:
    result = fleet.cli("ray", "submit", "--working-dir", str(TEMPLATES), "--", *command, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"ray submit {' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def preemption(fleet: LocalFleet) -> dict[str, Any]:
    import fleet as fleet_api

    job = fleet.root / "survive.yaml"
    job.write_text(f"name: survive\nray:\n  entrypoint: python survive.py --tasks 60 --seconds 1\n"
                   f"  working_dir: {TEMPLATES}\n")
    run = fleet.popen("run", str(job))
    log = fleet.job_dir("survive") / "logs" / f"{fleet.name}-head.log"
    try:
        wait_for(lambda: log.exists() and "ACTOR_NODE " in log.read_text(), 180, "the actor's first answer")
        victim = log.read_text().split("ACTOR_NODE ", 1)[1].split()[0]
        slot = victim.rsplit("-g", 1)[0]
        with fleet_api.connect(fleet.spec_path) as connection:
            api = connection.ray.jobs
            api.nodes()  # the tunnel is open before the clock starts
            killed = time.time()
            fleet.cli("preempt", victim, check=True)
            detect_s = rejoin_s = None
            while time.time() - killed < 300 and (detect_s is None or rejoin_s is None):
                try:
                    nodes = api.nodes()
                except Exception:  # noqa: BLE001 - a busy head answers late; try again
                    time.sleep(0.5)
                    continue
                now = time.time() - killed
                for entry in nodes:
                    name = next((k.split(":", 1)[1] for k in entry.get("resources_total", {})
                                 if k.startswith("fleet_node:")), None)
                    if name == victim and entry["state"] == "DEAD" and detect_s is None:
                        detect_s = now
                    if (name and name != victim and name.rsplit("-g", 1)[0] == slot and entry["state"] == "ALIVE"
                            and rejoin_s is None):
                        rejoin_s = now
                time.sleep(0.25)
        stdout, stderr = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    if run.returncode != 0:
        raise SystemExit(f"fleet run survive exited {run.returncode}:\n{stdout}\n{stderr}")
    outcome = program_json(log.read_text(), "survive")
    return {"detect_s": round(detect_s, 2) if detect_s is not None else None,
            "rejoin_s": round(rejoin_s, 2) if rejoin_s is not None else None,
            "tasks_lost": outcome["lost"], "survive_tasks": outcome["tasks"], "actor_moved": outcome["actor_moved"],
            "preempted": victim}


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    fleet = LocalFleet(root, workers=WORKERS, isolation="namespaces", monitor={"interval": 1, "grace": 4},
                       extra={"ray": {"enabled": True, "object_store_mb": 300}})
    figures: dict[str, Any] = {"workers": WORKERS, "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    try:
        started = time.monotonic()
        fleet.up()
        figures["up_s"] = round(time.monotonic() - started, 2)

        submit(fleet, "python", "tasks.py", "--tasks", str(4 * WORKERS), "--seconds", "0.2")  # warm the workers
        tasks = program_json(submit(fleet, "python", "tasks.py", "--tasks", str(TASKS), "--seconds", "1"), "tasks")
        cpus = tasks["cpus"]
        ideal = math.ceil(TASKS / cpus)
        figures.update({"tasks": TASKS, "cpus_per_worker": cpus / WORKERS, "wall_s": tasks["wall_s"],
                        "ideal_s": ideal, "ratio": round(tasks["wall_s"] / ideal, 3),
                        "tasks_nodes": len(tasks["nodes"])})

        tiny = program_json(submit(fleet, "python", "tiny_tasks.py", "--items", str(TINY)), "tiny_tasks")
        reference_root = root / "records"
        reference_root.mkdir()
        records_items_s, _, _, _ = bundled_worker_rate(reference_root, TINY)
        figures.update({"tiny_items": TINY, "tiny_tasks_s": tiny["tiny_tasks_s"],
                        "tiny_tasks_items_s": round(TINY / tiny["tiny_tasks_s"], 1),
                        "tiny_batched_s": tiny["batched_s"], "records_items_s": round(records_items_s, 1),
                        "records_s": round(TINY / records_items_s, 3)})

        figures.update(preemption(fleet))
        down = fleet.down()
        if down.returncode != 0:
            raise SystemExit(f"fleet down exited {down.returncode}: {down.stdout}\n{down.stderr}")
        time.sleep(2)
        figures["ray_processes_left"] = len(launched_processes_matching(fleet.name, "ray"))
        figures["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
        figures["reference"] = ("ideal_s = ceil(tasks / (workers x CPUs)); records_items_s: the bundled worker's "
                                "records mode (checksum, one process) on as many items, in this run")
    finally:
        finish_fleet(fleet)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
