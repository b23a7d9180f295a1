"""JSON Schemas (draft 2020-12) of `fleet.yaml` and `job.yaml`, for editors.

Generated from the pydantic models, so they cannot drift from what the loader accepts:
every key has a description, unknown keys are refused (`additionalProperties: false`).

`${VAR}` references: an editor validates the file as written, before interpolation, so
`count: ${N}` is a string where an integer belongs. Every field that is not a free
string (numbers, booleans, fixed choices, names with a pattern) therefore also accepts a
string containing `${`; the loader checks the interpolated value. Use with e.g. the YAML
language server: `# yaml-language-server: $schema=fleet.schema.json`.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from fleet.spec.models import FleetSpec

DRAFT = "https://json-schema.org/draft/2020-12/schema"
INTERPOLATED = {
    "type": "string",
    "pattern": r"\$\{",
    "description": "a ${VAR} or ${VAR:-default} reference, checked after interpolation",
}
# Keywords that describe a value rather than constrain it: they stay on the outer schema.
_ANNOTATIONS = ("title", "description", "default", "examples")


def fleet_json_schema() -> dict[str, Any]:
    """The JSON Schema of fleet.yaml."""
    schema = _schema(
        FleetSpec,
        title="fleet.yaml",
        description="A fleet of machines for offline batch jobs: provider, head, workers, SSH, "
        "shared directory, setup commands and monitor settings.",
    )
    # A cloud provider needs its block (the model's `_provider_block_present`).
    schema["allOf"] = [
        {
            "if": {"properties": {"provider": {"const": cloud}}, "required": ["provider"]},
            "then": {"required": [cloud]},
        }
        for cloud in ("gcp", "aws")
    ]
    return schema


def job_json_schema() -> dict[str, Any]:
    """The JSON Schema of job.yaml."""
    from fleet.spec.job import JobSpec

    schema = _schema(
        JobSpec,
        title="job.yaml",
        description="A batch job run across a fleet: exactly one of `worker:` (the bundled "
        "worker), `run:` (any command) or `serve:` (a model served to callers, `fleet serve`).",
    )
    schema["oneOf"] = [{"required": ["worker"]}, {"required": ["run"]}, {"required": ["serve"]}]
    return schema


def _schema(model: type[BaseModel], *, title: str, description: str) -> dict[str, Any]:
    generated = copy.deepcopy(model.model_json_schema(mode="validation"))
    body = _allow_interpolation(generated)
    schema: dict[str, Any] = {"$schema": DRAFT, "title": title, "description": description}
    schema.update({k: v for k, v in body.items() if k not in ("title", "description")})
    return schema


def _is_leaf_to_widen(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind in ("integer", "number", "boolean"):
        return True
    if "enum" in schema or "const" in schema:
        return True
    return kind == "string" and "pattern" in schema


def _allow_interpolation(schema: Any) -> Any:
    """Walk a schema (by keyword, so a property called `type` is not mistaken for the
    keyword) and let every non-free-string leaf also be a `${...}` string."""
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    for keyword in ("properties", "$defs", "patternProperties"):
        if isinstance(result.get(keyword), dict):
            result[keyword] = {name: _allow_interpolation(sub) for name, sub in result[keyword].items()}
    for keyword in ("items", "additionalProperties", "not", "contains"):
        if isinstance(result.get(keyword), dict):
            result[keyword] = _allow_interpolation(result[keyword])
    for keyword in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(result.get(keyword), list):
            result[keyword] = [_allow_interpolation(sub) for sub in result[keyword]]
    if isinstance(result.get("anyOf"), list):
        result["anyOf"] = _flatten_alternatives(result["anyOf"])
    if isinstance(result.get("patternProperties"), dict) and "additionalProperties" not in result:
        result["additionalProperties"] = False  # dict keys with a pattern: others are refused
    if _is_leaf_to_widen(result):
        outer = {k: result.pop(k) for k in _ANNOTATIONS if k in result}
        return {**outer, "anyOf": [result, INTERPOLATED]}
    return result


def _flatten_alternatives(alternatives: list[Any]) -> list[Any]:
    """`anyOf: [{anyOf: [int, ${}]}, null]` -> `anyOf: [int, null, ${}]`."""
    flat: list[Any] = []
    widened = False
    for sub in alternatives:
        if isinstance(sub, dict) and set(sub) == {"anyOf"} and INTERPOLATED in sub["anyOf"]:
            flat.extend(alt for alt in sub["anyOf"] if alt != INTERPOLATED)
            widened = True
        elif sub != INTERPOLATED:
            flat.append(sub)
        else:
            widened = True
    return [*flat, INTERPOLATED] if widened else flat
