"""`${VAR}` interpolation of spec strings from an environment.

Syntax (a small, predictable subset of the shell's):

- `${VAR}`: the value of VAR; an error when VAR is not set.
- `${VAR:-default}`: VAR's value, or `default` when VAR is unset or empty.
- `$${`: a literal `${` (so `$${FLEET_NODE_RANK}` reaches the node's shell untouched).
- A `$` not followed by `{` is left alone (`$HOME` stays `$HOME`).
- The variables that `fleet` sets on the nodes (`NODE_VARIABLES`: FLEET_NODE_RANK...)
  are never taken from the local environment: `${FLEET_NODE_RANK}` in a command reaches
  the node's shell as written, which is the only place where it has a meaning.

The loader calls `interpolate` on every string scalar of a spec before validation and
turns the returned problems into `SpecError`s at that scalar's line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `$${` (escape) or `${...}` (reference); anything else is copied as is.
_TOKEN = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\}?)")


NODE_VARIABLES = frozenset(
    {"FLEET_NODE_NAME", "FLEET_NODE_RANK", "FLEET_NUM_NODES", "FLEET_SHARED", "FLEET_JOB"}
)


@dataclass(frozen=True)
class InterpolationProblem:
    message: str
    hint: str | None = None
    offset: int = 0  # where in the string the problem starts


def needs_interpolation(text: str) -> bool:
    return "${" in text


def interpolate(
    text: str, env: Mapping[str, str], *, passthrough: frozenset[str] = NODE_VARIABLES
) -> tuple[str, list[InterpolationProblem]]:
    """Return `text` with every reference replaced, and the problems found.

    References to `passthrough` variables are kept as written. On problems the returned
    text keeps the offending references as written."""
    problems: list[InterpolationProblem] = []
    pieces: list[str] = []
    position = 0
    for match in _TOKEN.finditer(text):
        pieces.append(text[position : match.start()])
        position = match.end()
        if match.group(0) == "$${":
            pieces.append("${")
            continue
        body, closed = match["body"], bool(match["close"])
        if not closed:
            problems.append(
                InterpolationProblem(
                    f"unterminated '${{' in {text!r}",
                    hint="close it with '}', or write '$${' for a literal '${'",
                    offset=match.start(),
                )
            )
            pieces.append(match.group(0))
            continue
        name, has_default, default = body.partition(":-")
        if not VARIABLE_NAME.fullmatch(name):
            problems.append(
                InterpolationProblem(
                    f"invalid variable reference '${{{body}}}'",
                    hint="write ${NAME} or ${NAME:-default} (letters, digits, '_'), "
                    "or '$${' for a literal '${'",
                    offset=match.start(),
                )
            )
            pieces.append(match.group(0))
            continue
        if name in passthrough:
            pieces.append(match.group(0))
            continue
        value = env.get(name)
        if has_default and not value:
            pieces.append(default)
        elif value is not None:
            pieces.append(value)
        else:
            problems.append(
                InterpolationProblem(
                    f"environment variable {name} is not set",
                    hint=f"export {name}, give a default with ${{{name}:-value}}, "
                    f"or write $${{{name}}} to pass '${{{name}}}' through to the node's shell",
                    offset=match.start(),
                )
            )
            pieces.append(match.group(0))
    pieces.append(text[position:])
    return "".join(pieces), problems
