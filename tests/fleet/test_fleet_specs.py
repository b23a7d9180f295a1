"""Bad specs through the CLI: exit 2, `file:line` in the message, no traceback, and
nothing created (the local root stays empty, no sshd started)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from e2e_helpers import fleet_argv, leftovers

BAD_SPECS = {
    "unknown_key": ("name: bad1\nprovider: local\nworkerz:\n  count: 1\n", 3, "did you mean 'workers'"),
    "wrong_type": ("name: bad2\nprovider: local\nworkers:\n  count: three\n", 4, "workers.count"),
    "negative_count": ("name: bad3\nprovider: local\nworkers:\n  count: -1\n", 4, "workers.count"),
    "missing_variable": ("name: bad4\nprovider: local\nworkers:\n  count: 1\nsetup:\n  - echo ${FLEET_TEST_NOPE_VAR}\n",
                         6, "FLEET_TEST_NOPE_VAR"),
    "bad_yaml": ("name: bad5\nprovider: local\nworkers:\n  count: 1\n  bad: [1, 2\nssh: {}\n", None, "YAML"),
}


CASES = [(case, ["up"]) for case in sorted(BAD_SPECS)] + [(case, ["validate"]) for case in sorted(BAD_SPECS)] + [
    ("unknown_key", ["status"]), ("missing_variable", ["exec", "--", "true"]), ("negative_count", ["down", "--yes"]),
    ("bad_yaml", ["preempt", "bad5-w1-g1"]),
]


@pytest.mark.parametrize(("case", "command"), CASES)
def test_bad_spec_exits_2_with_file_line_and_creates_nothing(tmp_path: Path, case: str, command: list[str]) -> None:
    text, line, words = BAD_SPECS[case]
    root = tmp_path / "nodes"
    spec = tmp_path / "fleet.yaml"
    spec.write_text(f"local:\n  root: {root}\n" + text)
    line = line + 2 if line else None
    env = {k: v for k, v in os.environ.items() if k != "FLEET_TEST_NOPE_VAR"}
    name, *rest = command
    result = subprocess.run([*fleet_argv(), name, "-f", str(spec), *rest], cwd=tmp_path, env={**env, "COLUMNS": "300"},
                            check=False, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    prefix = f"{spec}:{line}:" if line else f"{spec}:"
    assert prefix in result.stderr.replace("\n", ""), result.stderr
    assert words in result.stderr
    assert not root.exists() or not any(root.iterdir())
    assert not (tmp_path / ".fleet").exists(), "no key or state is made for an invalid spec"
    assert leftovers(root) == {"processes": [], "mounts": []}
