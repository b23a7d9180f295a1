"""Shell quoting for everything `fleet` puts into a remote command line.

Remote commands go through the node's login shell (`sh -c`), so every value that is
interpolated into one is passed through `shlex.quote`. Environment variables cannot
travel as SSH "env" requests (sshd's `AcceptEnv` is off by default), so they become an
`export K='v' ...;` prefix here, with the names validated and the values quoted.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePosixPath

from fleet.errors import UsageError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

quote = shlex.quote


def shell_join(args: Iterable[str]) -> str:
    """One shell word per argument: `shell_join(["echo", "a b"])` -> `echo 'a b'`."""
    return " ".join(shlex.quote(str(arg)) for arg in args)


def validate_env_name(name: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise UsageError(
            f"invalid environment variable name {name!r}",
            hint="names are letters, digits and underscores, not starting with a digit",
        )
    return name


def env_prefix(env: Mapping[str, str] | None) -> str:
    """`export A='1' B='x y'; ` for a mapping (empty string for none)."""
    if not env:
        return ""
    words = []
    for name, value in env.items():
        validate_env_name(name)
        if value is None:
            raise UsageError(f"environment variable {name} has no value")
        text = str(value)
        if "\0" in text:
            raise UsageError(f"environment variable {name} contains a NUL byte")
        words.append(f"{name}={shlex.quote(text)}")
    return "export " + " ".join(words) + "; "


def with_env(command: str, env: Mapping[str, str] | None) -> str:
    """The command with its environment exported in front of it."""
    return env_prefix(env) + command


def home_path(path: str) -> str:
    """A shell word for a path as the node sees it: relative paths are under $HOME."""
    if path.startswith("/"):
        return shlex.quote(path)
    path = path.removeprefix("~/")
    return f'"$HOME"/{shlex.quote(path)}'


def receive_files(files: Sequence[tuple[str, int]]) -> str:
    """Shell that writes the first bytes of its stdin to these files (home-relative paths,
    their sizes), each 0600 in a 0700 directory, written beside and renamed over. `dd`
    reads exactly a file's bytes; exits 1 when stdin ends early. The umask is the
    caller's again after it, for what the command does next."""
    lines = ["fleet_umask=$(umask)", "umask 077"]
    made: set[str] = set()
    for path, size in files:
        word = home_path(path)
        parent = str(PurePosixPath(path.removeprefix("~/")).parent)
        if parent not in made:  # the directory once, named here (no `dirname` per file)
            made.add(parent)
            where = '"$HOME"' if parent == "." else home_path(parent)
            lines.append(f"mkdir -p {where} && chmod 700 {where} "
                         f"|| {{ echo 'fleet: could not make '{where} >&2; exit 1; }}")
        lines.append(f"dd of={word}.part bs={size} count=1 iflag=fullblock status=none && "
                     f'[ "$(stat -c %s {word}.part)" = {size} ] && mv -f {word}.part {word} '
                     f"|| {{ echo 'fleet: could not write '{word}' from stdin' >&2; exit 1; }}")
    lines.append('umask "$fleet_umask"')
    return "\n".join(lines) + "\n"
