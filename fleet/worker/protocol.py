"""The remote protocol of a job's processes: what runs on a node, what it leaves in the
job directory on the shared filesystem, and the status lines the head prints about it.

The control plane (`fleet.jobs`: start, progress, restart, cancel) and the node side
(the launcher below) both follow this one description instead of each spelling the
paths in its own shell strings. Standard library only: `fleet.worker` never imports the
control plane. In `<shared>/jobs/<job>/` (see `fleet.worker.layout` for the worker's own
files):

    pids/<node>.pid        the launcher's pid = its process group (setsid)
    pids/<node>.beat       the launcher's heartbeat, rewritten (not touched: its time is
                           the head's clock, also through a mount) every BEAT_S seconds
    status/<node>.exit     the launcher's exit code, written when it ends (or by the control
                           plane for a node where the job could not start: its setup failed)
    logs/<node>.log        everything the node's processes printed
    cancelled              `fleet cancel` was asked: nothing restarts
    .prepared              `prepare` ran (once, on the head)

and on each node, outside the shared directory, `~/.fleet/jobs/<job>/launcher.pid`: the
trusted copy of the running launcher's process group. A pid without an exit whose beat
is older than STALE_S is a launcher that was killed (SIGKILL, OOM): its node confirms
that it is gone before it is started again.

Status lines (`status_script`, parsed by `parse_status`): `EXIT <node> <code>`,
`PID <node>`, `BEAT <node> <age seconds>`, `CANCELLED`, and after a `STATUS` line the
worker's JSON progress (`python -m fleet.worker . --status`).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

BEAT_S = 2  # the launcher's heartbeat period
STALE_S = 8.0  # a launcher whose beat is older is presumed dead
CANCELLED = "cancelled"
PREPARED = ".prepared"
LAUNCHER_PID = "launcher.pid"  # in ~/.fleet/jobs/<job>/ on the node, beside launch.sh


def pid_file(node: str) -> str:
    return f"pids/{shlex.quote(node)}.pid"


def exit_file(node: str) -> str:
    return f"status/{shlex.quote(node)}.exit"


def handover_file(node: str) -> str:
    """Written by the control plane before it stops a node's launcher to start it again at
    once (the head moved under it): that launcher then leaves no exit status, so that no
    progress read in between counts the node as ended (and failed)."""
    return f"status/{shlex.quote(node)}.handover"


def log_file(node: str) -> str:
    return f"logs/{shlex.quote(node)}.log"


def write_exit(node: str, code: int) -> str:
    """Shell, in the job directory: record `code` as the node's exit status (atomically)."""
    tmp = f"status/.{shlex.quote(node)}.exit.tmp"
    return f"mkdir -p status && echo {int(code)} > {tmp} && mv {tmp} {exit_file(node)}"


LAUNCHER_TEMPLATE = r"""#!/bin/sh
# fleet job launcher: started by `fleet run` on every selected node (setsid, nohup),
# from ~/.fleet/jobs/<job>/launch.sh (never from the shared directory), in the job dir.
# Environment from the caller: FLEET_NODE_NAME FLEET_NODE_RANK FLEET_NUM_NODES FLEET_SHARED
# FLEET_JOB FLEET_PYTHON FLEET_PROCESSES FLEET_RETRIES FLEET_NOTICE [FLEET_RUN] + the job's env.
JOB_DIR=$(pwd)
NODE="$FLEET_NODE_NAME"
mkdir -p pids status logs metrics
echo $$ > "pids/.$NODE.pid.tmp" && mv "pids/.$NODE.pid.tmp" "pids/$NODE.pid"
rm -f "status/$NODE.exit" "status/$NODE.handover"
# Trusted copy of our process group, outside the shared directory: a restart after this
# launcher was killed stops what is left of its group (the worker) before starting anew.
echo $$ > "${0%/*}/launcher.pid"
# The heartbeat: written (not touched) so that its time is the head's clock, also through the mount.
( while kill -0 $$ 2>/dev/null; do
    echo $$ > "pids/.$NODE.beat.tmp" && mv "pids/.$NODE.beat.tmp" "pids/$NODE.beat"; sleep @BEAT_S@
  done ) >/dev/null 2>&1 &
# The node runtime (fleet's virtualenv, installed by `fleet up`) must be there, and be this control plane's.
if [ -n "$FLEET_RUNTIME" ]; then
  rc=0
  ( @RUNTIME_CHECK@ ) || rc=$?
  if [ "$rc" != 0 ]; then echo "$rc" > "status/.$NODE.exit.tmp" && mv "status/.$NODE.exit.tmp" "status/$NODE.exit"; exit "$rc"; fi
fi
"$FLEET_PYTHON" -P -m fleet.worker.sampler --out "metrics/$NODE.jsonl" --node "$NODE" --pid $$ >/dev/null 2>&1 &
watcher=""
if [ -n "$FLEET_NOTICE" ] && [ "$FLEET_NOTICE" != local ]; then
  "$FLEET_PYTHON" -P -m fleet.worker.notice --provider "$FLEET_NOTICE" --pgid $$ &
  watcher=$!
fi
child=""
stopping=""
on_term() { stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null; }
trap on_term TERM INT
attempt=0
while :; do
  if [ -n "$FLEET_RUN" ]; then
    sh -c "$FLEET_RUN" &
  else
    "$FLEET_PYTHON" -P -m fleet.worker "$JOB_DIR" --node "$NODE" --processes "$FLEET_PROCESSES" &
  fi
  child=$!
  rc=0
  wait "$child" || rc=$?
  # `wait` returns early when a trapped signal arrives: wait for the child to finish its stop.
  while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
  [ "$rc" = 0 ] && break
  [ -n "$stopping" ] && break
  attempt=$((attempt + 1))
  [ "$attempt" -gt "$FLEET_RETRIES" ] && break
  echo "fleet: attempt $attempt of $FLEET_RETRIES: restarting after exit code $rc" >&2
  sleep 1
done
# Stopped by a signal (cancel, preemption notice): not finished, a later run resumes here.
[ -n "$stopping" ] && rc=143
[ -n "$watcher" ] && kill -TERM "$watcher" 2>/dev/null
# Stopped to be started again at once (a handover): no exit status, the node has not ended.
if [ -n "$stopping" ] && [ -f "status/$NODE.handover" ]; then rm -f "status/$NODE.handover" "${0%/*}/launcher.pid"; exit "$rc"; fi
echo "$rc" > "status/.$NODE.exit.tmp" && mv "status/.$NODE.exit.tmp" "status/$NODE.exit"
rm -f "${0%/*}/launcher.pid"
exit "$rc"
"""


def launcher_script(runtime_check: str) -> str:
    """The launcher, with the control plane's check that the node runtime is its own."""
    return LAUNCHER_TEMPLATE.replace("@RUNTIME_CHECK@", runtime_check).replace("@BEAT_S@", str(BEAT_S))


def status_script() -> str:
    """Shell, in the job directory: the status lines of every node's launcher."""
    return (
        'for f in status/*.exit; do [ -f "$f" ] && echo "EXIT $(basename "$f" .exit) $(cat "$f")"; done; '
        'for f in pids/*.pid; do [ -f "$f" ] && echo "PID $(basename "$f" .pid)"; done; '
        'now=$(date +%s); for f in pids/*.beat; do [ -f "$f" ] && '
        'echo "BEAT $(basename "$f" .beat) $(( now - $(stat -c %Y "$f" 2>/dev/null || echo $now) ))"; done; '
        f"if [ -f {CANCELLED} ]; then echo CANCELLED; fi; true"
    )


@dataclass
class LauncherStatus:
    exits: dict[str, int] = field(default_factory=dict)  # node -> exit code
    started: set[str] = field(default_factory=set)  # nodes with a pid file
    beats: dict[str, int] = field(default_factory=dict)  # node -> age of its heartbeat, s
    cancelled: bool = False
    worker: dict[str, int] = field(default_factory=dict)  # the worker's --status JSON

    def stale(self, node: str) -> bool:
        """Started, not ended, and its heartbeat is older than STALE_S."""
        return node in self.started and node not in self.exits and self.beats.get(node, 0) > STALE_S


def parse_status(text: str) -> LauncherStatus:
    status = LauncherStatus()
    lines = text.splitlines()
    status.cancelled = "CANCELLED" in lines
    for i, line in enumerate(lines):
        if line.startswith("EXIT "):
            _, name, code = (line.split(" ") + ["1"])[:3]
            status.exits[name] = int(code) if code.strip().lstrip("-").isdigit() else 1
        elif line.startswith("PID "):
            status.started.add(line.split(" ", 1)[1])
        elif line.startswith("BEAT "):
            _, name, age = (line.split(" ") + ["0"])[:3]
            status.beats[name] = int(age) if age.lstrip("-").isdigit() else 0
        elif line == "STATUS" and i + 1 < len(lines):
            status.worker = json.loads(lines[i + 1])
    return status
