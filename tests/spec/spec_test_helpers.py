"""Assertion helpers shared by the spec tests."""

from __future__ import annotations

from fleet.errors import SpecError, SpecErrors


def only_error(errors: SpecErrors) -> SpecError:
    assert len(errors.errors) == 1, str(errors)
    return errors.errors[0]


def error_for(errors: SpecErrors, field: str) -> SpecError:
    matching = [e for e in errors.errors if e.field == field]
    assert matching, f"no error for {field!r} in:\n{errors}"
    return matching[0]
