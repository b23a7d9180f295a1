"""What a caller of a serving can catch (both are `FleetError`s: one line, a hint)."""

from __future__ import annotations

from fleet.errors import FleetError


class ServingError(FleetError):
    """The request cannot be answered: unknown serving, fleet down, the model failed."""


class ServingTimeout(ServingError):
    """The request's deadline passed before an answer came."""
