"""The fleet's ssh_config file and the argv of `fleet ssh NODE`.

Both hand the OpenSSH client exactly what the executor uses: the fleet's key only
(`IdentitiesOnly yes`), the fleet's known_hosts, the node name as `HostKeyAlias` (keys
are pinned by name) and `StrictHostKeyChecking yes`. With the file included from
~/.ssh/config (`Include <path>`, placed before any `Host`/`Match` block), plain
`ssh demo-w1-g1`, `sshfs demo-head:shared /mnt` and `rsync -e ssh` use the pinned keys.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fleet.errors import UsageError
from fleet.ssh.hostkeys import validate_alias
from fleet.ssh.results import Target

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:@%+/=,-]+$")


def _config_value(value: str, what: str) -> str:
    """A value for an ssh_config line: bare when safe, else double-quoted."""
    if not value or any(ch in value for ch in '"\n\r\0'):
        raise UsageError(f"{what} {value!r} cannot be written into an ssh_config file")
    return value if _SAFE_VALUE.match(value) else f'"{value}"'


def _check_target(target: Target) -> None:
    validate_alias(target.name)
    if not _SAFE_VALUE.match(target.address) or not _SAFE_VALUE.match(target.user) or "/" in target.user:
        raise UsageError(f"node {target.name}: unusable address or user {target.address!r} / {target.user!r}")
    if not 0 < int(target.port) < 65536:
        raise UsageError(f"node {target.name}: bad port {target.port}")


def include_line(path: Path) -> str:
    """The line to put at the top of ~/.ssh/config."""
    return f"Include {_config_value(str(Path(path).resolve()), 'path')}"


def render_ssh_config(fleet: str, targets: Sequence[Target], key_path: Path, known_hosts: Path) -> str:
    key = _config_value(str(Path(key_path).resolve()), "key path")
    hosts = _config_value(str(Path(known_hosts).resolve()), "known_hosts path")
    lines = [
        f"# ssh_config of fleet {fleet}, written by `fleet`; rewritten on every change.",
        "# Use it with `ssh -F <this file> NODE`, or add this line at the TOP of ~/.ssh/config",
        "# (before any Host or Match block) to make plain `ssh NODE`, sshfs and rsync work:",
        "#   Include <absolute path of this file>",
        "",
    ]
    for target in targets:
        _check_target(target)
        lines += [
            f"Host {target.name}",
            f"    HostName {target.address}",
            f"    Port {int(target.port)}",
            f"    User {target.user}",
            f"    IdentityFile {key}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {hosts}",
            "    GlobalKnownHostsFile none",
            f"    HostKeyAlias {target.name}",
            "    StrictHostKeyChecking yes",
            "    PasswordAuthentication no",
            "    KbdInteractiveAuthentication no",
            "    ServerAliveInterval 15",
            "    ServerAliveCountMax 3",
            "",
        ]
    return "\n".join(lines)


def write_ssh_config(
    path: Path, fleet: str, targets: Sequence[Target], key_path: Path, known_hosts: Path
) -> Path:
    """Write (atomically, 0600) one `Host <node-name>` block per target."""
    text = render_ssh_config(fleet, targets, key_path, known_hosts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def interactive_ssh_argv(
    target: Target, key_path: Path, known_hosts_path: Path, command: Sequence[str] = ()
) -> list[str]:
    """argv for `fleet ssh NODE` (os.execvp it): the OpenSSH client with pinned keys."""
    _check_target(target)
    key = str(Path(key_path).resolve())
    hosts = _config_value(str(Path(known_hosts_path).resolve()), "known_hosts path")
    argv = [
        "ssh",
        "-i",
        key,
        "-p",
        str(int(target.port)),
        "-l",
        target.user,
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={hosts}",
        "-o",
        "GlobalKnownHostsFile=none",
        "-o",
        f"HostKeyAlias={target.name}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "PasswordAuthentication=no",
        "-o",
        "ServerAliveInterval=15",
        "--",
        target.address,
    ]
    return argv + list(command)
