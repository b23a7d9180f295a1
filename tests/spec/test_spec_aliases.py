"""YAML alias expansion is bounded in every loader (billion laughs): fleet specs, job
specs (`handler_options` keeps whatever it is given), and the worker's job.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.errors import SpecErrors
from fleet.spec.loader import parse_fleet_spec, parse_job_spec
from fleet.worker.errors import WorkerError
from fleet.worker.layout import JobLayout, load_worker_config
from fleet.worker.serve import load_serve_config
from fleet.worker.yamlbound import ALIAS_EXPANSION_LIMIT, safe_load_bounded


def laughs(levels: int, indent: str = "") -> str:
    """Anchors a0..a{levels-1}, each a list of nine aliases of the one before."""
    lines = [f'{indent}a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"{indent}a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def bomb_job(levels: int) -> str:
    return ("name: laughs\nworker:\n  handler: checksum\n  inputs: '*.txt'\n  outputs: out\n"
            "  handler_options:\n" + laughs(levels, "    "))


def test_a_job_whose_handler_options_explode_is_refused_with_its_file() -> None:
    text = bomb_job(6)  # ~600 bytes, 590,000 values expanded
    assert len(text) < 1000
    with pytest.raises(SpecErrors) as caught:
        parse_job_spec(text, file="laughs.yaml", env={})
    message = str(caught.value)
    assert "laughs.yaml" in message and "aliases expand" in message


def test_a_fleet_spec_with_an_alias_bomb_is_refused() -> None:
    text = "name: demo\nprovider: local\nworkers: {count: 1}\nlocal:\n" + laughs(8, "  ")
    with pytest.raises(SpecErrors, match="aliases expand"):
        parse_fleet_spec(text, file="fleet.yaml", env={})


def test_ordinary_aliases_still_work() -> None:
    text = ("name: small\nworker:\n  handler: checksum\n  inputs: '*.txt'\n  outputs: out\n"
            "  handler_options:\n    base: &base {a: 1, b: [1, 2, 3]}\n    again: *base\n    more: {<<: *base, c: 2}\n")
    job = parse_job_spec(text, file="small.yaml", env={})
    assert job.worker is not None
    assert job.worker.handler_options["again"] == {"a": 1, "b": [1, 2, 3]}
    assert job.worker.handler_options["more"]["c"] == 2


def test_the_bound_counts_expanded_values_not_written_ones() -> None:
    assert len(safe_load_bounded("[" + ", ".join(["1"] * (ALIAS_EXPANSION_LIMIT * 2)) + "]")) == 20_000
    with pytest.raises(ValueError, match="aliases expand"):
        safe_load_bounded(laughs(5))


def test_the_worker_refuses_an_alias_bomb_planted_in_job_yaml(tmp_path: Path) -> None:
    layout = JobLayout(tmp_path)
    layout.job_yaml.write_text(bomb_job(6))
    with pytest.raises(WorkerError, match="aliases expand"):
        load_worker_config(layout)


def test_a_model_server_refuses_an_alias_bomb_planted_in_job_yaml(tmp_path: Path) -> None:
    layout = JobLayout(tmp_path)
    layout.job_yaml.write_text(bomb_job(6).replace("worker:\n  handler: checksum\n  inputs: '*.txt'\n  outputs: out\n",
                                                   "serve:\n  handler: checksum\n"))
    with pytest.raises(WorkerError, match="aliases expand"):
        load_serve_config(layout)
