"""What the executor is given (Target) and what it returns (CommandResult, GroupResult).

Every call returns one result per node, never an exception for a node's failure: a
node that cannot be reached, refuses our key, shows a changed host key or runs past its
timeout has a result whose `error` says so, and the other nodes' results are intact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from fleet.errors import FleetError

TAIL_LINES = 10


@dataclass(frozen=True)
class Target:
    """How to reach one node."""

    name: str  # node name; also the host key alias in the fleet's known_hosts
    address: str
    port: int
    user: str
    host_key: str | None = None  # "ssh-ed25519 AAAA..." vouched for by the provider
    trust_on_first_use: bool = False  # the fleet just created this node: pin the first key seen


def reason(node: str, error: FleetError) -> str:
    """`Type: message` of a node's error, without repeating the node's name."""
    message = error.message
    if message.startswith(f"{node}: "):
        message = message[len(node) + 2 :]
    return f"{type(error).__name__}: {message}"


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


@dataclass(frozen=True)
class CommandResult:
    node: str
    command: str
    exit_code: int | None
    stdout: str
    stderr: str
    duration: float
    error: FleetError | None = None
    truncated: bool = field(default=False, compare=False)  # output was longer than kept

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0

    def describe(self) -> str:
        """Node, command, outcome and the last lines of output (like invoke's UnexpectedExit)."""
        command = self.command if len(self.command) <= 200 else self.command[:197] + "..."
        if self.error is not None:
            head = f"{self.node}: {reason(self.node, self.error)}"
        elif self.exit_code == 0:
            head = f"{self.node}: `{command}` succeeded in {self.duration:.2f}s"
        else:
            head = f"{self.node}: `{command}` exited with {self.exit_code} after {self.duration:.2f}s"
        parts = [head]
        if self.error is not None and self.error.hint:
            parts.append(f"  hint: {self.error.hint}")
        if self.error is not None and self.command:
            parts.append(f"  command: `{command}`")
        for stream, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text.strip():
                parts.append(f"--- {stream} (last {TAIL_LINES} lines) ---")
                parts.append(tail(text))
        return "\n".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "duration": round(self.duration, 4),
            "error": None if self.error is None else str(self.error),
        }


class GroupResult:
    """Node name -> CommandResult, in target order."""

    def __init__(self, results: dict[str, CommandResult]) -> None:
        self.results = results

    @property
    def succeeded(self) -> dict[str, CommandResult]:
        return {name: result for name, result in self.results.items() if result.ok}

    @property
    def failed(self) -> dict[str, CommandResult]:
        return {name: result for name, result in self.results.items() if not result.ok}

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results.values())

    def __getitem__(self, name: str) -> CommandResult:
        return self.results[name]

    def __iter__(self) -> Iterator[CommandResult]:
        return iter(self.results.values())

    def __len__(self) -> int:
        return len(self.results)

    def summary(self) -> str:
        total = len(self.results)
        failed = self.failed
        text = f"{total - len(failed)}/{total} nodes succeeded"
        if not failed:
            return text
        reasons = []
        for name, result in failed.items():
            if result.error is not None:
                reasons.append(f"{name} ({reason(name, result.error)})")
            else:
                reasons.append(f"{name} (exit {result.exit_code})")
        return text + "; failed: " + "; ".join(reasons)

    def __repr__(self) -> str:
        return f"GroupResult({self.summary()})"
