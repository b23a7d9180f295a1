"""Load `fleet.yaml` and `job.yaml`: read, interpolate, validate, report every problem.

    spec = load_fleet_spec("fleet.yaml")          # FleetSpec, or raises SpecErrors
    job = load_job_spec("job.yaml", env={...})    # JobSpec
    job = parse_job_spec(text, file="job.yaml")   # the same from text in memory

All problems of a file (syntax, duplicate keys, missing variables, unknown keys, wrong
types, values out of range) are collected in one pass and raised together as
`fleet.errors.SpecErrors`, each naming file, line, column and field path. Nothing else
escapes for bad input.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fleet.errors import SpecError, SpecErrors
from fleet.spec.diagnostics import validation_errors
from fleet.spec.job import JobSpec, worker_or_run_problem
from fleet.spec.models import FleetSpec, SpecValueError, provider_block_problem
from fleet.spec.yamlsource import SourceDocument, parse_source, read_source

ModelT = TypeVar("ModelT", bound=BaseModel)

# Checks run on the raw data when validation fails, so that problems an "after"
# validator would have found are reported together with the others.
ExtraCheck = Callable[[Any], SpecValueError | None]


def load_fleet_spec(path: str | Path, env: Mapping[str, str] | None = None) -> FleetSpec:
    """Read and validate a fleet spec; raise `SpecErrors` listing every problem."""
    return load_spec(path, FleetSpec, env, extra_checks=[provider_block_problem])


def load_job_spec(path: str | Path, env: Mapping[str, str] | None = None) -> JobSpec:
    """Read and validate a job spec; raise `SpecErrors` listing every problem."""
    return load_spec(path, JobSpec, env, extra_checks=[worker_or_run_problem])


def parse_fleet_spec(
    text: str, *, file: str = "fleet.yaml", env: Mapping[str, str] | None = None
) -> FleetSpec:
    """Like `load_fleet_spec`, from text already in memory (`file` names it in errors)."""
    return _parse(text, file, FleetSpec, env, [provider_block_problem])


def parse_job_spec(text: str, *, file: str = "job.yaml", env: Mapping[str, str] | None = None) -> JobSpec:
    """Like `load_job_spec`, from text already in memory (`file` names it in errors)."""
    return _parse(text, file, JobSpec, env, [worker_or_run_problem])


def _parse(
    text: str, file: str, model: type[ModelT], env: Mapping[str, str] | None, checks: Sequence[ExtraCheck]
) -> ModelT:
    try:
        document = parse_source(text, file, os.environ if env is None else env)
    except SpecErrors:
        raise
    except SpecError as error:
        raise SpecErrors([error]) from None
    return validate_document(document, model, checks)


def load_spec(
    path: str | Path,
    model: type[ModelT],
    env: Mapping[str, str] | None = None,
    *,
    extra_checks: Sequence[ExtraCheck] = (),
) -> ModelT:
    environment = os.environ if env is None else env
    try:
        document = read_source(path, environment)
    except SpecErrors:
        raise
    except SpecError as error:
        raise SpecErrors([error]) from None
    return validate_document(document, model, extra_checks)


def validate_document(
    document: SourceDocument, model: type[ModelT], extra_checks: Sequence[ExtraCheck] = ()
) -> ModelT:
    problems = list(document.problems)
    spec: ModelT | None = None
    try:
        spec = model.model_validate(document.data)
    except ValidationError as exc:
        problems.extend(validation_errors(exc, model, document))
        for check in extra_checks:
            cause = check(document.data)
            if cause is not None:
                where = document.locate(cause.at)
                field = cause.field if cause.field is not None else (*where.matched, *where.rest)
                extra = document.error_at(where.node, cause.message, loc=field, hint=cause.hint)
                if not any(str(extra) == str(p) for p in problems):
                    problems.append(extra)
    if problems:
        raise SpecErrors(_sorted(problems))
    if spec is None:  # validation failed, yet every error was a repeat: say so plainly
        raise SpecErrors([SpecError("invalid spec", file=document.file)])
    return spec


def _sorted(problems: list[SpecError]) -> list[SpecError]:
    return sorted(problems, key=lambda e: (e.line or 0, e.column or 0))
