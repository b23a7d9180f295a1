"""`ray:` jobs of `fleet run`: what `fleet.jobs.JobRunner` adds for them.

The job runs like any `run:` job (the launcher, the sampler, logs, pids, cancel), with
`RAY_COMMAND` as its command on every selected node (`fleet.worker.ray_jobs follow`):
the head submits the Ray job and follows it, the workers keep their samplers going
until the head is done. The submission (entrypoint, runtime_env, which node is the
head, the dashboard's port) reaches the nodes in the job's env.sh (0600, the node's own
~/.fleet/jobs/<job>/), the working directory as a zip beside it on the head: neither
passes through the shared directory, which any worker can write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.errors import JobError, UsageError
from fleet.model import Node, head_name
from fleet.ray.package import zip_working_dir

if TYPE_CHECKING:
    from fleet.jobs import JobRunner

RAY_COMMAND = 'exec "$FLEET_PYTHON" -P -m fleet.worker.ray_jobs follow'
WORKING_DIR_ZIP = "working_dir.zip"


def ray_job_env(runner: JobRunner) -> dict[str, str]:
    """The job's extra variables in env.sh: FLEET_RAY_JOB (the submission, JSON)."""
    ray = runner.job.ray
    fleet = runner.fleet
    if ray is None:
        return {}
    if not fleet.spec.ray.enabled:
        raise UsageError(f"job {runner.job.name} is a Ray job, but fleet {fleet.spec.name} runs no Ray cluster",
                         hint="set `ray: {enabled: true}` in the fleet spec and run `fleet up`")
    spec = {"entrypoint": ray.entrypoint, "runtime_env": ray.runtime_env, "working_dir": bool(ray.working_dir),
            "head": head_name(fleet.spec.name), "port": fleet.spec.ray.dashboard_port}
    return {"FLEET_RAY_JOB": json.dumps(spec, separators=(",", ":"))}


def put_working_dir(runner: JobRunner, head: Node) -> None:
    """The working directory's zip into the head's ~/.fleet/jobs/<job>/ (0600)."""
    ray = runner.job.ray
    if ray is None or not ray.working_dir:
        return
    data = zip_working_dir(Path(os.path.expanduser(ray.working_dir)))
    put = runner.fleet.executor.put([runner.fleet.target(head)], data,
                                    f".fleet/jobs/{runner.job.name}/{WORKING_DIR_ZIP}", mode=0o600, dir_mode=0o700)
    if not put.ok:
        raise JobError(f"could not put the Ray job's working directory on the head: {put.summary()}")
