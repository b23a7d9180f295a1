"""Estimated hourly prices for `fleet up --dry-run`, from a small bundled table.

The table (`prices.json`, beside this module) carries the date its figures were taken;
every estimate names it, so that nobody mistakes it for a quote. GCP prices are the
machine plus its accelerators; AWS instance types include their GPUs. AWS can also ask
the live price API (`describe_spot_price_history`) instead: see `fleet.providers.aws`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_TABLE = Path(__file__).with_name("prices.json")


@dataclass(frozen=True)
class PriceEstimate:
    per_hour: float | None
    source: str | None


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return json.loads(_TABLE.read_text())


def table_date() -> str:
    return str(_table()["date"])


def _price(entry: dict[str, float] | None, spot: bool) -> float | None:
    if not entry:
        return None
    return entry["spot" if spot else "on_demand"]


def estimate(
    provider: str,
    machine: str | None,
    *,
    spot: bool,
    accelerator: str | None = None,
    accelerator_count: int = 0,
) -> PriceEstimate:
    """Price per hour of one node, or `per_hour=None` when the table does not know a part."""
    block = _table().get(provider, {})
    base = _price(block.get("machines", {}).get(machine or ""), spot)
    if base is None:
        return PriceEstimate(None, None)
    total = base
    if accelerator and accelerator_count and provider == "gcp":
        gpu = _price(block.get("accelerators", {}).get(accelerator), spot)
        if gpu is None:
            return PriceEstimate(None, None)
        total += gpu * accelerator_count
    return PriceEstimate(round(total, 4), f"bundled table {table_date()}")
