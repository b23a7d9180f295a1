"""Fixtures of the end-to-end tests (see e2e_helpers): every fleet a fixture makes is
brought down and its local root swept, also when the test fails."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import CliFleet, new_fleet

FleetFactory = Callable[..., CliFleet]


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[FleetFactory]:
    """`make_fleet(workers, **spec overrides)` -> a CliFleet (not up yet), torn down after the test."""
    fleets: list[CliFleet] = []

    def make(workers: int = 3, **overrides: Any) -> CliFleet:
        fleet = new_fleet(tmp_path, workers, **overrides)
        fleets.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in fleets:
            fleet.teardown()


@pytest.fixture(scope="module")
def shared_fleet() -> Iterator[CliFleet]:
    """Head + 3 workers, up, shared by the read-only tests of a module."""
    base = Path(tempfile.mkdtemp(prefix="fleet-e2e-"))
    fleet = new_fleet(base, 3)
    try:
        fleet.up()
        yield fleet
    finally:
        fleet.teardown()
        shutil.rmtree(base, ignore_errors=True)
