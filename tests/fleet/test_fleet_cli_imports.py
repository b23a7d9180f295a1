"""The CLI has no import cycle: the command modules share `fleet.cli_base`, never
import `fleet.cli`, and `fleet.cli` registers them unconditionally (a broken command
module fails `fleet` at start-up instead of silently dropping run/jobs/logs/...)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fleet

COMMAND_MODULES = ("cli_jobs.py", "cli_serve.py", "cli_base.py")


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_command_modules_do_not_import_the_cli_module() -> None:
    root = Path(fleet.__file__).parent
    for name in COMMAND_MODULES:
        assert "fleet.cli" not in _imported(root / name), f"{name} imports fleet.cli (an import cycle)"
    source = (root / "cli.py").read_text()
    assert "except ImportError" not in source


def test_every_job_command_is_registered_from_a_fresh_interpreter() -> None:
    script = ("import fleet.cli_jobs, fleet.cli as c; "
              "print(' '.join(sorted(c.build_parser()._subparsers._group_actions[0].choices)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    commands = set(done.stdout.split())
    assert {"run", "jobs", "logs", "cancel", "watch", "report", "serve"} <= commands
