"""Property: whatever a user does to a valid spec, loading either succeeds or raises
SpecError(s) with a position; never any other exception (no traceback for bad input)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.errors import SpecError, SpecErrors
from fleet.spec.job import JobSpec
from fleet.spec.loader import load_fleet_spec, load_job_spec
from fleet.spec.models import FleetSpec

VALID_FLEET: dict[str, Any] = {
    "name": "demo",
    "provider": "gcp",
    "head": {"disk_gb": 50, "spot": False},
    "workers": {"count": 3, "accelerators": {"type": "nvidia-tesla-t4", "count": 1}, "gcp": {}},
    "ssh": {"connect_timeout": 5.0, "parallelism": 8},
    "shared": {"options": ["reconnect"]},
    "setup": ["echo one", "echo ${HOME}"],
    "monitor": {"interval": 2},
    "gcp": {"project": "p", "zones": ["us-central1-a"]},
}
VALID_JOB: dict[str, Any] = {
    "name": "text-embed",
    "nodes": ["demo-w1-g1"],
    "processes_per_node": "auto",
    "env": {"A": "1"},
    "prepare": ["true"],
    "worker": {"handler": "text-embed", "inputs": "corpus/*.txt", "outputs": "out", "batch_size": 8},
}
ENV = {"HOME": "/root", "N": "4"}

yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "${N}",
            "${MISSING}",
            "${N:-x}",
            "$${N}",
            "${",
            "${1}",
            "yes",
            "~",
            "2024-13-45",
            "auto",
            "all",
            "-1",
            "0",
            "1e3",
            "gcp",
            "local",
            "[1, 2",
            "{a: 1}",
        ]
    ),
)
key_names = st.one_of(
    st.text(min_size=1, max_size=10), st.integers(), st.none(), st.sampled_from(["count", "cont", "name"])
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    data: Any = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["delete", "replace", "add", "wrap"]))
        if not path:
            if action == "replace":
                data = draw(yaml_scalars)
            continue
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if action == "delete":
            del parent[last]
        elif action == "replace":
            parent[last] = draw(yaml_scalars)
        elif action == "wrap":
            parent[last] = draw(st.sampled_from([[parent[last]], {"x": parent[last]}]))
        elif isinstance(parent[last], dict):
            parent[last][draw(key_names)] = draw(yaml_scalars)
        elif isinstance(parent[last], list):
            parent[last].append(draw(yaml_scalars))
        if not isinstance(data, (dict, list)):
            break
    return data


def _check(text: str, loader: Any, model: type) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "spec.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            result = loader(path, env=ENV)
        except SpecErrors as errors:
            assert errors.errors, "SpecErrors without any error"
            for error in errors.errors:
                assert isinstance(error, SpecError) and error.file == str(path)
                assert error.message
                str(error)
        else:
            assert isinstance(result, model)


fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(mutated(VALID_FLEET))
def test_mutated_fleet_specs_load_or_raise_spec_errors(data: Any) -> None:
    _check(yaml.safe_dump(data, allow_unicode=True), load_fleet_spec, FleetSpec)


@fast
@given(mutated(VALID_JOB))
def test_mutated_job_specs_load_or_raise_spec_errors(data: Any) -> None:
    _check(yaml.safe_dump(data, allow_unicode=True), load_job_spec, JobSpec)


@fast
@given(
    position=st.integers(min_value=0, max_value=400),
    junk=st.text(alphabet=st.sampled_from(list(":-{}[]&*!|>'\"%@`#,?\t\n ${}x1\x00\x07\ufeff")), max_size=6),
)
def test_corrupted_fleet_text_loads_or_raises_spec_errors(position: int, junk: str) -> None:
    text = yaml.safe_dump(VALID_FLEET, default_flow_style=False)
    position %= len(text)
    _check(text[:position] + junk + text[position:], load_fleet_spec, FleetSpec)
