"""Taking a fleet down: everything the provider finds for it by label (instances, the
head's data disk unless kept, firewall rules), also with no local state; an existing
head's cleanup (the mount key, the job process groups its launchers recorded); the
fleet's temporary keys and connection files."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.bringup import mount_key_line
from fleet.errors import FleetError
from fleet.model import head_name
from fleet.providers.base import CleanupReport
from fleet.ssh.quote import home_path

if TYPE_CHECKING:
    from fleet.fleetops import Fleet


def down(fleet: Fleet, *, keep_data: bool = False) -> CleanupReport:
    """Delete everything the provider finds for this fleet (the head's data disk too,
    unless `keep_data`); clean up an existing head; remove the fleet's temporary keys
    and connection files."""
    report = fleet.provider.destroy_all(keep_data=keep_data)
    head = fleet.existing_head()
    if head is not None:
        try:
            outcome = fleet.executor.run([fleet.target(head)], existing_head_cleanup(fleet), timeout=90)[head.name]
        except FleetError as error:
            report.errors.append(f"existing head {head.address}: {error}")
        else:
            if outcome.ok:
                stopped = outcome.stdout.count("STOPPED ")
                report.deleted.append(f"the fleet's mount key and {stopped} job process group(s) on "
                                      f"existing head {head.address}")
            else:
                report.errors.append(f"existing head {head.address}: cleanup failed: {outcome.describe()}")
    fleet.close_connections()
    for record in fleet.state.nodes():
        fleet.state.mark_gone(record.name)
    fleet.state.add_event("down", None, f"deleted {len(report.deleted)} resource(s)")
    for path in (fleet.paths.mount_key, Path(f"{fleet.paths.mount_key}.pub"), fleet.paths.known_hosts,
                 fleet.paths.ssh_config):
        path.unlink(missing_ok=True)
    if fleet.paths.generated_key:
        fleet.paths.key.unlink(missing_ok=True)
        Path(f"{fleet.paths.key}.pub").unlink(missing_ok=True)
    return report

def existing_head_cleanup(fleet: Fleet) -> str:
    """Shell for an existing head (a machine fleet does not own): remove the mount
    key, and stop the job process groups the head's launchers recorded, each checked
    to be led by that job's launcher (never a pattern over command lines). Prints
    `STOPPED <pg>` per group; exits non-zero if one is still alive."""
    from fleet.jobs import NODE_JOBS, valid_group_check

    mount_pub = Path(f"{fleet.paths.mount_key}.pub")
    script = "set -u; "
    if mount_pub.exists():
        line = mount_key_line(fleet)
        keys = '"$HOME/.ssh/authorized_keys"'
        script += (f"if [ -f {keys} ]; then (umask 077 && grep -vxF {shlex.quote(line)} {keys} > {keys}.fleet-tmp); "
                   f"[ $? -le 1 ] || exit 1; mv {keys}.fleet-tmp {keys} || exit 1; fi; ")
    if fleet.spec.ray.enabled:
        from fleet.ray.cluster import stop_group_script

        script += stop_group_script()
    pid_name = shlex.quote(f"{head_name(fleet.spec.name)}.pid")
    script += (
        f"left=0; for f in {home_path(fleet.spec.shared.path)}/jobs/*/pids/{pid_name}; do "
        '[ -f "$f" ] || continue; j=${f%/pids/*}; j=${j##*/}; '
        + valid_group_check('"$f"', f'"$HOME"/{NODE_JOBS}/"$j"/launch.sh') +
        '[ -n "$pg" ] || continue; kill -TERM -- -"$pg" 2>/dev/null; i=0; '
        'while kill -0 -- -"$pg" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done; '
        'kill -KILL -- -"$pg" 2>/dev/null; sleep 0.1; '
        'if kill -0 -- -"$pg" 2>/dev/null; then echo "ALIVE $pg"; left=1; else echo "STOPPED $pg"; fi; '
        'done; exit $left'
    )
    return script
