"""The SSH tests' fixtures. They live in ssh_lab.py: a module with a name of its own, so
that test modules (and the processes they spawn) import helpers from it unambiguously;
every test directory has a conftest.py, and a bare `import conftest` finds whichever
comes first on sys.path."""

from ssh_lab import accepted_logins, closed_port, hung_listener, lab, trio, trio_targets

__all__ = ["accepted_logins", "closed_port", "hung_listener", "lab", "trio", "trio_targets"]
