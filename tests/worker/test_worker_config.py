"""WorkerConfig: the `worker:` section of job.yaml, and how the worker reads job.yaml."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet.worker.config import WorkerConfig
from fleet.worker.errors import WorkerError
from fleet.worker.layout import JobLayout, load_worker_config


def test_defaults_and_derived_values() -> None:
    files = WorkerConfig(handler="checksum", inputs="corpus/*.txt", outputs="out")
    records = WorkerConfig(
        handler="checksum", inputs="x/*.jsonl", outputs="out", mode="records", lease_seconds=20
    )
    assert (files.batch_size, files.max_wait_ms, files.memoize, files.device) == (64, 10.0, False, "auto")
    assert files.effective_chunk_size == 100 and records.effective_chunk_size == 10_000
    assert files.effective_heartbeat_seconds == 15.0 and records.effective_heartbeat_seconds == 5.0


@pytest.mark.parametrize(
    "bad",
    [
        {"handler": "text embed"},
        {"handler": "pkg.mod"},
        {"device": "gpu"},
        {"mode": "lines"},
        {"batch_size": 0},
        {"lease_seconds": 10, "heartbeat_seconds": 10},
        {"typo_field": 1},
    ],
)
def test_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValidationError):
        WorkerConfig(**{"handler": "checksum", "inputs": "a/*", "outputs": "o", **bad})


def test_accepts_plugin_reference_and_cuda_index() -> None:
    config = WorkerConfig(handler="my_pkg.handlers:make", inputs="a/*", outputs="o", device="cuda:3")
    assert config.handler == "my_pkg.handlers:make"


def test_every_field_has_a_description_for_the_json_schema() -> None:
    schema = WorkerConfig.model_json_schema()
    missing = [name for name, prop in schema["properties"].items() if not prop.get("description")]
    assert missing == []
    assert schema["additionalProperties"] is False


def test_config_module_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, fleet.worker.config, fleet.worker; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_job_yaml_other_keys_are_ignored(tmp_path: Path) -> None:
    job = tmp_path / "jobs" / "j"
    job.mkdir(parents=True)
    (job / "job.yaml").write_text(
        "name: j\nnodes: all\nenv: {A: b}\nsetup: [echo hi]\nretries: 3\npython: python3\n"
        "worker:\n  handler: checksum\n  inputs: c/*.txt\n  outputs: out\n"
    )
    assert load_worker_config(JobLayout.at(job)).inputs == "c/*.txt"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worker: [\n", "job.yaml:"),
        ("name: j\nrun: ./go.sh\n", "no `worker:` section"),
        ("worker:\n  handler: checksum\n  inputs: a\n  outputs: o\n  batch_size: -1\n", "worker.batch_size"),
    ],
)
def test_bad_job_yaml_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    job = tmp_path / "jobs" / "j"
    job.mkdir(parents=True)
    (job / "job.yaml").write_text(text)
    with pytest.raises(WorkerError) as info:
        load_worker_config(JobLayout.at(job))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cpu_processes_share_the_cores_and_a_users_choice_is_kept() -> None:
    from fleet.worker.cpus import share_cpus, usable_cpus

    env: dict[str, str] = {}
    assert share_cpus(1, env) is None and env == {}  # one process: torch's own default
    expected = max(1, usable_cpus() // 2)
    assert share_cpus(2, env) == expected
    assert env == {"OMP_NUM_THREADS": str(expected), "MKL_NUM_THREADS": str(expected)}
    chosen = {"OMP_NUM_THREADS": "3"}
    assert share_cpus(4, chosen) is None and chosen == {"OMP_NUM_THREADS": "3"}
