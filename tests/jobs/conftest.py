"""The job tests' fixtures. They live in jobs_fleet.py: a module with a name of its own,
so that test modules import helpers from it unambiguously (every test directory has a
conftest.py, and a bare `import conftest` finds whichever comes first on sys.path)."""

from jobs_fleet import make_fleet, module_fleet

__all__ = ["make_fleet", "module_fleet"]
