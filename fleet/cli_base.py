"""What every command module of the CLI shares: the two consoles and opening the fleet.

`fleet.cli` (the parser, the fleet commands) and the command modules it registers
(`fleet.cli_jobs`, `fleet.cli_serve`) import this module, never each other's parent, so
the CLI has no import cycle and a broken command module fails loudly at start-up
instead of silently dropping its commands.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from fleet.spec.loader import load_fleet_spec
from fleet.textsafe import labelled

# Piped into a log, rich would squeeze tables into 80 columns; COLUMNS still rules.
_PIPE_WIDTH = None if "COLUMNS" in os.environ else 160
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else _PIPE_WIDTH)
out = Console(highlight=False, width=None if sys.stdout.isatty() else _PIPE_WIDTH)


def spec_path(args: argparse.Namespace) -> Path:
    return Path(args.file)


def open_fleet(args: argparse.Namespace, *, quiet: bool = False, stream: bool = False):
    from fleet.fleetops import Fleet

    spec = load_fleet_spec(spec_path(args))

    def log(message: str) -> None:
        if not quiet:
            err.print(labelled(time.strftime('%H:%M:%S'), message, label_style="dim", separator=" "))

    def on_line(node: str, stream_name: str, line: str) -> None:
        (err if stream_name == "stderr" else out).print(labelled(node, line), soft_wrap=True)

    return Fleet(spec, spec_path(args), log=log, on_line=on_line if stream else None)
