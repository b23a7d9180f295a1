"""The serving tests' fixtures live in serve_fleet.py (a module name of its own, see
tests/jobs/conftest.py)."""

from serve_fleet import served_fleet

__all__ = ["served_fleet"]
