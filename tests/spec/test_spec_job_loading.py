"""job.yaml loading: worker xor run, node selection, errors inside the worker section."""

from __future__ import annotations

from pathlib import Path

import pytest
from spec_test_helpers import error_for, only_error

from fleet.errors import SpecErrors
from fleet.spec.job import JobSpec
from fleet.spec.loader import load_job_spec, parse_job_spec
from fleet.worker.config import WorkerConfig

WORKER_JOB = """
name: text-embed
worker:
  handler: text-embed
  inputs: corpus/**/*.txt
  outputs: embeddings
"""


def load_errors(path: Path, env: dict[str, str] | None = None) -> SpecErrors:
    with pytest.raises(SpecErrors) as caught:
        load_job_spec(path, env=env or {})
    return caught.value


def test_worker_job_loads_with_defaults(spec_file) -> None:
    job = load_job_spec(spec_file(WORKER_JOB, "job.yaml"), env={})
    assert isinstance(job, JobSpec) and isinstance(job.worker, WorkerConfig)
    assert job.name == "text-embed" and job.run is None
    assert job.nodes == "workers" and job.processes_per_node == "auto"
    assert job.env == {} and job.prepare == [] and job.setup == []
    assert job.retries == 0 and job.python is None
    assert job.worker.handler == "text-embed" and job.worker.batch_size == 64


def test_run_job_with_every_field(spec_file) -> None:
    path = spec_file(
        """
        name: train
        nodes: [demo-w1-g1, demo-w2-g3]
        processes_per_node: ${PPN}
        env:
          OMP_NUM_THREADS: 4
          DATA: ${DATA_DIR:-/data}
        prepare:
          - tar xf corpus.tar
        setup: [pip install -q mypkg]
        run: python train.py --rank ${FLEET_NODE_RANK} --of $${FLEET_NUM_NODES}
        retries: 3
        python: /usr/bin/python3
        """,
        "job.yaml",
    )
    job = load_job_spec(path, env={"PPN": "2"})
    assert job.nodes == ["demo-w1-g1", "demo-w2-g3"]
    assert job.processes_per_node == 2
    assert job.env == {"OMP_NUM_THREADS": "4", "DATA": "/data"}
    assert job.prepare == ["tar xf corpus.tar"] and job.setup == ["pip install -q mypkg"]
    assert job.run == "python train.py --rank ${FLEET_NODE_RANK} --of ${FLEET_NUM_NODES}"
    assert (job.retries, job.python, job.worker) == (3, "/usr/bin/python3", None)


@pytest.mark.parametrize("nodes", ["all", "head", "workers"])
def test_node_groups(spec_file, nodes) -> None:
    job = load_job_spec(spec_file(f"name: j1\nnodes: {nodes}\nrun: 'true'\n", "job.yaml"), env={})
    assert job.nodes == nodes


def test_both_worker_and_run(spec_file) -> None:
    path = spec_file(WORKER_JOB + "run: echo hi\n", "job.yaml")
    error = only_error(load_errors(path))
    assert (error.line, error.column, error.field) == (6, 6, "run")
    assert error.message == "give either `worker:` or `run:`, not both"


def test_neither_worker_nor_run(spec_file) -> None:
    error = only_error(load_errors(spec_file("name: idle\nretries: 1\n", "job.yaml")))
    assert (error.line, error.column, error.field) == (1, 1, "worker")
    assert "`worker:`" in error.message and "`run:`" in error.message


def test_neither_is_reported_with_other_errors(spec_file) -> None:
    errors = load_errors(spec_file("name: idle\nretries: -1\n", "job.yaml"))
    assert {e.field for e in errors.errors} == {"worker", "retries"}


def test_typo_in_worker_section_points_into_it(spec_file) -> None:
    path = spec_file(
        """
        name: text-embed
        worker:
          handler: text-embed
          inputs: corpus/**/*.txt
          outputs: embeddings
          batchsize: 128
          lease_seconds: 0
        """,
        "job.yaml",
    )
    errors = load_errors(path)
    typo = error_for(errors, "worker.batchsize")
    assert (typo.file, typo.line, typo.column) == (str(path), 6, 3)
    assert typo.message == "unknown key 'batchsize'" and typo.hint == "did you mean 'batch_size'?"
    lease = error_for(errors, "worker.lease_seconds")
    assert (lease.line, lease.column) == (7, 18)
    assert lease.message == "expected a number >= 1 and <= 86400, got 0"
    assert len(errors.errors) == 2


def test_missing_worker_key_points_at_worker_mapping(spec_file) -> None:
    path = spec_file("name: text-embed\nworker:\n  handler: checksum\n  inputs: x/*\n", "job.yaml")
    error = only_error(load_errors(path))
    assert (error.line, error.column, error.field) == (3, 3, "worker.outputs")
    assert error.message == "missing required key 'outputs'"


def test_bad_handler_is_described_in_words(spec_file) -> None:
    path = spec_file(WORKER_JOB.replace("handler: text-embed", "handler: 'rm -rf /'"), "job.yaml")
    error = only_error(load_errors(path))
    assert error.field == "worker.handler" and "'package.module:factory'" in error.message


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("nodes: some", "nodes", "expected 'workers', 'all', 'head' or a list of node names"),
        ("nodes: []", "nodes", "at least one node name"),
        ("nodes: [w1, 'a;b']", "nodes[1]", "expected a node name"),
        ("nodes: [w1, w1]", "nodes[1]", "listed twice"),
        ("processes_per_node: 0", "processes_per_node", "expected 'auto' or an integer >= 1, got 0"),
        ("processes_per_node: many", "processes_per_node", "got 'many'"),
        ("processes_per_node: true", "processes_per_node", "got true"),
        ("retries: -1", "retries", "expected an integer >= 0 and <= 1000, got -1"),
        ("env: {'A B': x}", "env.A B", "expected an environment variable name"),
        ("env: [A=1]", "env", "expected a mapping"),
        ("setup: make", "setup", "expected a list of commands"),
        ("prepare: [[a]]", "prepare[0]", "expected a string"),
        ("workers: 3", "workers", "unknown key 'workers'"),
    ],
)
def test_job_field_errors(spec_file, line, field, words) -> None:
    path = spec_file(f"name: j1\nrun: 'true'\n{line}\n", "job.yaml")
    error = only_error(load_errors(path))
    assert error.field == field and error.line == 3, str(error)
    assert words in error.message, str(error)


def test_unknown_job_key_suggests(spec_file) -> None:
    error = only_error(load_errors(spec_file("name: j1\nrun: 'true'\nretry: 2\n", "job.yaml")))
    assert error.hint == "did you mean 'retries'?"


def test_jobspec_is_strict_when_built_directly() -> None:
    with pytest.raises(ValueError):
        JobSpec(name="j1", run="x", worker=WorkerConfig(handler="checksum", inputs="a", outputs="b"))
    with pytest.raises(ValueError):
        JobSpec(name="j1")
    with pytest.raises(ValueError):
        JobSpec(name="j1", run="x", cont=1)  # type: ignore[call-arg]


def test_parse_from_text_names_the_given_file() -> None:
    job = parse_job_spec("name: j1\nrun: echo ${X}\n", file="jobs/j1/job.yaml", env={"X": "x"})
    assert job.run == "echo x"
    with pytest.raises(SpecErrors) as caught:
        parse_job_spec("name: j1\nrun: [\n", file="jobs/j1/job.yaml", env={})
    assert str(caught.value).startswith("jobs/j1/job.yaml:3:1: invalid YAML")


def test_serve_section(spec_file) -> None:
    path = spec_file("name: embed\nserve:\n  handler: text-embed\n  batch_size: 32\n  max_wait_ms: 5\n", "job.yaml")
    job = load_job_spec(path, env={})
    assert job.serve is not None and (job.serve.batch_size, job.serve.processes_per_node) == (32, "auto")
    assert job.worker is None and job.run is None


def test_serve_and_run(spec_file) -> None:
    path = spec_file("name: embed\nrun: echo hi\nserve:\n  handler: text-embed\n", "job.yaml")
    error = only_error(load_errors(path))
    assert error.field == "serve" and error.message == "give either `run:` or `serve:`, not both"


def test_serve_typo_points_into_it(spec_file) -> None:
    path = spec_file("name: embed\nserve:\n  handler: text-embed\n  batchsize: 32\n", "job.yaml")
    error = only_error(load_errors(path))
    assert (error.line, error.field) == (4, "serve.batchsize")
