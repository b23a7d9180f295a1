"""Small statistics over sample series: mean and p95, and a named pair of both."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Stat:
    mean: float | None
    p95: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(mean(values), percentile(values, 95))

    @staticmethod
    def rounded(value: float | None, digits: int = 1) -> float | None:
        return None if value is None else round(value, digits)
