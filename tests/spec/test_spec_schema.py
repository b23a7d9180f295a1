"""The JSON Schemas agree with the loader on example specs, and editors can use them."""

from __future__ import annotations

import json
import textwrap

import jsonschema
import pytest
import yaml

from fleet.errors import SpecErrors
from fleet.spec.loader import load_fleet_spec, load_job_spec
from fleet.spec.schema import fleet_json_schema, job_json_schema

FLEETS = {
    "minimal": "name: demo\nprovider: local\nworkers: {count: 3}\n",
    "full-local": """
        name: demo
        provider: local
        head: {disk_gb: 20}
        workers:
          count: 4
          spot: true
          accelerators: {type: nvidia-tesla-t4, count: 1}
        ssh: {connect_timeout: 5, ready_timeout: 60, parallelism: 16}
        shared: {path: shared, mount: shared, options: [reconnect]}
        setup: [echo ready]
        monitor: {interval: 2, grace: 5, max_replacements: 10}
        local: {address: 127.0.0.1}
        """,
    "gcp": """
        name: embed-gcp
        provider: gcp
        workers:
          count: 8
          machine: n1-standard-8
          gcp: {provisioning_model: SPOT}
        gcp: {project: my-project, zones: [us-central1-a, us-central1-b]}
        """,
    "aws": """
        name: embed-aws
        provider: aws
        workers: {count: 2, machine: g4dn.xlarge, aws: {max_price: '0.50'}}
        aws: {region: us-east-1, ami: ami-0123456789abcdef0, zones: [us-east-1a]}
        """,
    "interpolated": """
        name: ${FLEET_NAME}
        provider: ${PROVIDER:-local}
        workers:
          count: ${WORKERS}
          spot: ${SPOT:-true}
        ssh:
          parallelism: ${PAR:-8}
        """,
}

JOBS = {
    "worker": """
        name: text-embed
        nodes: workers
        processes_per_node: auto
        env: {TOKENIZERS_PARALLELISM: 'false'}
        prepare: [python -m make_corpus]
        worker:
          handler: text-embed
          inputs: corpus/**/*.txt
          outputs: embeddings
          batch_size: 32
          chunk_size: 50
          memoize: true
        """,
    "run": """
        name: train
        nodes: [demo-w1-g1, demo-w2-g1]
        processes_per_node: 2
        run: python train.py --rank ${FLEET_NODE_RANK}
        retries: 2
        python: python3
        """,
    "interpolated": """
        name: job-${SUFFIX}
        processes_per_node: ${PPN}
        worker:
          handler: checksum
          inputs: ${INPUTS}
          outputs: out
          batch_size: ${BATCH:-16}
        """,
}

ENV = {"FLEET_NAME": "demo", "WORKERS": "3", "SUFFIX": "a1", "PPN": "1", "INPUTS": "data/*"}


def as_data(text: str) -> object:
    return yaml.safe_load(textwrap.dedent(text))


@pytest.mark.parametrize("schema_function", [fleet_json_schema, job_json_schema])
def test_schema_is_valid_draft_2020_12(schema_function) -> None:
    schema = schema_function()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    json.dumps(schema)  # plain JSON, printable by `fleet schema`


def test_schema_has_descriptions_and_refuses_unknown_keys() -> None:
    schema = fleet_json_schema()
    assert schema["additionalProperties"] is False
    for name, model in schema["$defs"].items():
        assert model.get("additionalProperties") is False, name
        for key, prop in model["properties"].items():
            assert prop.get("description"), f"{name}.{key} has no description"
    for key, prop in schema["properties"].items():
        assert prop.get("description"), f"{key} has no description"
    job = job_json_schema()
    assert job["additionalProperties"] is False
    assert all(prop.get("description") for prop in job["properties"].values())


@pytest.mark.parametrize("name", sorted(FLEETS))
def test_example_fleets_pass_schema_and_loader(spec_file, name) -> None:
    text = FLEETS[name]
    jsonschema.validate(as_data(text), fleet_json_schema(), cls=jsonschema.Draft202012Validator)
    load_fleet_spec(spec_file(text), env=ENV)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_example_jobs_pass_schema_and_loader(spec_file, name) -> None:
    text = JOBS[name]
    jsonschema.validate(as_data(text), job_json_schema(), cls=jsonschema.Draft202012Validator)
    load_job_spec(spec_file(text, "job.yaml"), env=ENV)


@pytest.mark.parametrize(
    "text",
    [
        "name: demo\nprovider: local\nworkers: {cont: 3}\n",  # unknown key
        "name: demo\nprovider: local\nworkers: {count: -1}\n",  # out of range
        "name: demo\nprovider: local\nworkers: {count: three}\n",  # wrong type
        "name: Demo!\nprovider: local\nworkers: {count: 1}\n",  # bad name
        "name: demo\nprovider: azure\nworkers: {count: 1}\n",  # unknown provider
        "name: demo\nprovider: local\n",  # missing workers
        "name: demo\nprovider: local\nworkers: {count: 1}\nsetup: echo\n",  # not a list
        "name: demo\nprovider: gcp\nworkers: {count: 1}\n",  # no gcp block
    ],
)
def test_bad_fleets_fail_schema_and_loader(spec_file, text) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(as_data(text), fleet_json_schema(), cls=jsonschema.Draft202012Validator)
    with pytest.raises(SpecErrors):
        load_fleet_spec(spec_file(text), env={})


@pytest.mark.parametrize(
    "text",
    [
        "name: j1\nrun: x\nworker: {handler: checksum, inputs: a, outputs: b, batchsize: 2}\n",
        "name: j1\nrun: x\nprocesses_per_node: 0\n",
        "name: j1\nrun: x\nnodes: some\n",
        "name: j1\nrun: x\nenv: {'bad key': x}\n",
        "name: j1\nrun: x\nretries: -1\n",
        "name: j1\n",  # neither worker nor run
        "name: j1\nrun: x\nworker: {handler: checksum, inputs: a, outputs: b}\n",  # both
    ],
)
def test_bad_jobs_fail_schema_and_loader(spec_file, text) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(as_data(text), job_json_schema(), cls=jsonschema.Draft202012Validator)
    with pytest.raises(SpecErrors):
        load_job_spec(spec_file(text, "job.yaml"), env={})


def test_interpolation_is_tolerated_only_where_a_reference_is_written() -> None:
    schema = fleet_json_schema()
    ok = {"name": "demo", "provider": "local", "workers": {"count": "${N}"}}
    jsonschema.validate(ok, schema, cls=jsonschema.Draft202012Validator)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**ok, "workers": {"count": "N"}}, schema, cls=jsonschema.Draft202012Validator)
