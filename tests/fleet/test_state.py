"""The fleet's SQLite record (`fleet.state`) under the ways `fleet` opens it: several
handles in one process (a command and its monitor's session) beside other commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fleet.state import State

_ADD = "import sys; from fleet.state import State; s = State(sys.argv[1]); s.add_event(sys.argv[2]); s.close()"
_KINDS = "import sys; from fleet.state import State; print(' '.join(e.kind for e in State(sys.argv[1]).events()))"


def _python(code: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout


def test_a_second_handle_in_one_process_loses_nothing_another_command_writes_beside(tmp_path: Path) -> None:
    # `fleet run`: the follower's state, then the monitor's session opens a second one.
    # Opening the file beside SQLite dropped the process's locks on it: `fleet preempt`
    # (another process) then took the database for unused, checkpointed and deleted the
    # WAL, and every later write of the first handle was lost.
    db = tmp_path / ".fleet" / "t" / "state.db"
    first = State(db)
    first.add_event("before")
    second = State(db)
    _python(_ADD, str(db), "from-another-command")
    first.add_event("after")
    second.add_event("from-the-session")
    assert _python(_KINDS, str(db)).split() == ["before", "from-another-command", "after", "from-the-session"]
    assert (db.stat().st_mode & 0o777) == 0o600
    first.close()
    second.close()
