"""Text from nodes, made safe for a terminal.

Whatever a node prints (command output, error messages that quote it, event details)
is shown as plain text, never as rich markup, and with terminal control sequences
removed: a line holding `[/usr/lib]` must not crash the CLI, and an ANSI escape from a
node must not retitle, recolour or clear the user's terminal.
"""

from __future__ import annotations

import re

from rich.text import Text

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), and two-character escapes.
_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# C0 controls except tab and newline, DEL, and C1 controls (which some terminals obey).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` without escape sequences and control characters (tabs and newlines kept)."""
    return _CONTROL.sub("", _ESCAPE.sub("", text))


def plain(text: str, style: str = "") -> Text:
    """A rich Text of `text` made printable: never parsed as markup."""
    return Text(printable(text), style=style)


def labelled(label: str, text: str, *, label_style: str = "bold", separator: str = " | ") -> Text:
    """`label | text` with only the label styled."""
    return Text.assemble((printable(label), label_style), separator, printable(text))
