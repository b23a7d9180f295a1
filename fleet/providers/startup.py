"""The startup script every cloud node runs at boot (GCP `startup-script` metadata, EC2
user data), rendered from `templates/startup/node.sh.j2`.

It installs sshfs where missing, mounts a head's data disk (formatting it only when
blank), creates the SSH user with the fleet's public key, and moves sshd to the fleet's
port when that is not 22. The preemption-notice watcher is
not started here: `fleet.jobs` starts it beside each job, with the job's process group.
Every value is shell-quoted by the template's `shquote` filter.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import jinja2

import fleet
from fleet.model import DATA_MOUNT

_TEMPLATE = "node.sh.j2"


def _template_dirs() -> list[Path]:
    # fleet/templates links to the repository's templates/, so wheels carry them too.
    return [Path(fleet.__file__).resolve().parent / "templates" / "startup"]


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in _template_dirs()]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # a shell script, not HTML: values go through shquote instead
        keep_trailing_newline=True,
    )
    env.filters["shquote"] = lambda value: shlex.quote(str(value))
    return env


def render_startup_script(
    *, provider: str, fleet_name: str, node: str, role: str, user: str, public_key: str, ssh_port: int,
    data_disk: bool = False, data_devices: Sequence[str] = (),
) -> str:
    """The script for one node. With `data_disk` (a head that has one), it waits for the
    first of `data_devices` (block devices, e.g. /dev/disk/by-id/google-fleet-data) and
    mounts it at DATA_MOUNT, unless something (the local provider's init) already did."""
    return (
        _environment()
        .get_template(_TEMPLATE)
        .render(
            provider=provider,
            fleet=fleet_name,
            node=node,
            role=role,
            user=user,
            public_key=public_key.strip(),
            ssh_port=int(ssh_port),
            data_disk=data_disk,
            data_devices=list(data_devices),
            data_mount=DATA_MOUNT,
        )
    )
