"""The `job.yaml` model: what to run across the fleet.

    name: text-embed
    nodes: workers            # or all, head, or a list of node names
    processes_per_node: auto  # one per GPU; or an integer
    env: {HF_HOME: /shared/hf}
    prepare: [python make_corpus.py]   # once, on the head, before any worker starts
    setup: [pip install -q mypkg]      # on every node (and every replacement)
    worker: {handler: text-embed, inputs: 'corpus/**/*.txt', outputs: embeddings}
    # or:  run: python train.py --rank $${FLEET_NODE_RANK}
    # or:  serve: {handler: text-embed, batch_size: 64, max_wait_ms: 5}   (`fleet serve`)
    # or:  ray: {entrypoint: python prog.py, working_dir: .}   (a Ray job, docs/ray.md)
    retries: 0                # restarts of a failed `run:` process on its node

Exactly one of `worker:` (the bundled worker, `fleet.worker.config.WorkerConfig`),
`run:` (any command), `serve:` (a model served to callers,
`fleet.worker.serve_config.ServeConfig`) and `ray:` (a job of the fleet's Ray cluster,
`RayJobConfig`; its `nodes` default to `all`, so the samplers cover every node) is given. Loading with file:line errors is `fleet.spec.loader`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet.spec.diagnostics import register_pattern_words, show
from fleet.spec.models import NAME_PATTERN, SpecValueError
from fleet.worker.config import DEVICE_PATTERN, HANDLER_PATTERN, WorkerConfig
from fleet.worker.serve_config import ServeConfig

NODE_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
NODE_GROUPS = ("workers", "all", "head")
JOB_KINDS = ("worker", "run", "serve", "ray")

register_pattern_words(HANDLER_PATTERN, "'text-embed', 'checksum' or 'package.module:factory'")
register_pattern_words(DEVICE_PATTERN, "'auto', 'cpu', 'cuda' or 'cuda:N'")


class RayJobConfig(BaseModel):
    """A Ray job: submitted to the fleet's Ray cluster by the head, followed to its end."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entrypoint: str = Field(min_length=1, description="the driver's command, e.g. 'python prog.py --n 100'")
    working_dir: str | None = Field(
        None, description="a directory of this machine (relative: to where `fleet run` runs) uploaded as the "
        "job's working directory"
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray's runtime_env (pip, env_vars, py_modules ...); not working_dir"
    )

    @field_validator("runtime_env")
    @classmethod
    def _no_working_dir(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "working_dir" in value:
            raise SpecValueError("give the working directory as `ray.working_dir`, not in runtime_env",
                                 at=("working_dir",))
        return value


class JobSpec(BaseModel):
    """A batch job: which nodes run what, prepared how."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    name: str = Field(
        pattern=NAME_PATTERN,
        description="the job's name (its directory on the shared disk); lowercase, digits, '-'",
    )
    nodes: (
        Literal["workers", "all", "head"]
        | Annotated[list[Annotated[str, Field(pattern=NODE_NAME_PATTERN)]], Field(min_length=1)]
    ) = Field(
        "workers",
        description="which nodes run the job: 'workers' (default), 'all', 'head', or a list of node names",
    )
    processes_per_node: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="processes started on each node: 'auto' (one per GPU, else 1) or a number >= 1"
    )
    env: dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], str] = Field(
        default_factory=dict, description="environment variables of the job's processes"
    )
    prepare: list[str] = Field(
        default_factory=list,
        description="commands run once on the head before any worker starts (e.g. fetch the data)",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="commands run on every node before the job starts (and on every replacement)",
    )
    worker: WorkerConfig | None = Field(None, description="the bundled worker's settings (or give `run:`)")
    run: str | None = Field(
        None,
        description="a command started on every selected node, with FLEET_NODE_NAME, FLEET_NODE_RANK, "
        "FLEET_NUM_NODES, FLEET_SHARED and FLEET_JOB set (or give `worker:`)",
    )
    serve: ServeConfig | None = Field(
        None, description="serve a model on the nodes, called item by item with `fleet.connect` (`fleet serve`)"
    )
    ray: RayJobConfig | None = Field(None, description="a Ray job on the fleet's Ray cluster (`fleet run`)")
    retries: int = Field(
        0, ge=0, le=1000,
        description="how often a failed `run:` process is restarted on its node, and a failed `setup:` tried again"
    )
    python: str | None = Field(
        None, description="Python interpreter that starts the worker on the nodes (default: chosen by fleet)"
    )

    @model_validator(mode="before")
    @classmethod
    def _ray_jobs_cover_every_node(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("ray") is not None and "nodes" not in data:
            return {**data, "nodes": "all"}
        return data

    @field_validator("nodes", mode="before")
    @classmethod
    def _check_nodes(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value in NODE_GROUPS:
                return value
            raise SpecValueError(
                f"expected 'workers', 'all', 'head' or a list of node names, got {value!r}",
                hint="several names go in a list: [demo-w1-g1, demo-w2-g1]",
            )
        if not isinstance(value, list):
            raise SpecValueError("expected 'workers', 'all', 'head' or a list of node names")
        if not value:
            raise SpecValueError("expected at least one node name, got an empty list")
        seen: set[str] = set()
        for index, name in enumerate(value):
            if not isinstance(name, str) or not re.fullmatch(NODE_NAME_PATTERN, name):
                raise SpecValueError(
                    f"expected a node name (lowercase letters, digits, '-'), got {name!r}", at=(index,)
                )
            if name in seen:
                raise SpecValueError(f"node {name!r} is listed twice", at=(index,))
            seen.add(name)
        return value

    @field_validator("processes_per_node", mode="before")
    @classmethod
    def _check_processes(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 1:
            return int(value)
        raise SpecValueError(f"expected 'auto' or an integer >= 1, got {show(value)}")

    @field_validator("env", mode="before")
    @classmethod
    def _check_env_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str) or not re.fullmatch(ENV_NAME_PATTERN, key):
                    raise SpecValueError(
                        f"expected an environment variable name (letters, digits, '_'), got {key!r}",
                        at=(str(key), "[key]"),
                    )
        return value

    @field_validator("prepare", "setup", mode="before")
    @classmethod
    def _no_single_command(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise SpecValueError(
                f"expected a list of commands, got {show(value)}",
                hint="write a YAML list: one '- command' per line",
            )
        return value

    @model_validator(mode="after")
    def _worker_xor_run(self) -> JobSpec:
        problem = worker_or_run_problem({kind: getattr(self, kind) for kind in JOB_KINDS})
        if problem is not None:
            raise problem
        return self


def worker_or_run_problem(data: Any) -> SpecValueError | None:
    """The `worker:` / `run:` / `serve:` / `ray:` rule (exactly one) checked on raw data, so that the
    loader can report it alongside other errors (an "after" validator only runs when
    everything else passed)."""
    if not isinstance(data, dict):
        return None
    given = [key for key in JOB_KINDS if data.get(key) is not None]
    if len(given) > 1:
        return SpecValueError(
            f"give either `{given[0]}:` or `{given[1]}:`, not both" if len(given) == 2
            else "give only one of `worker:`, `run:`, `serve:` and `ray:`",
            at=(given[-1],),
            hint="`worker:` runs the bundled worker; `run:` runs your own command; `serve:` serves a model; "
            "`ray:` submits a Ray job",
        )
    if not given:
        return SpecValueError(
            "a job needs `worker:` (the bundled worker), `run:` (a command) or `serve:` (a served model)",
            field=("worker",),
            hint="e.g. `run: python my_job.py`",
        )
    return None
