"""Jobs across the fleet: put a job on the shared dir, start it on nodes, follow it.

A job lives in `<shared>/jobs/<name>/` on the head (layout in `fleet.worker.layout`);
this module adds what the control side needs there:

    job.yaml               the validated spec (interpolated), as submitted
    launch.sh              the per-node launcher (below), written once
    .prepared              `prepare` ran (once, on the head)
    pids/<node>.pid        the launcher's pid = its process group (setsid)
    status/<node>.exit     the launcher's exit code, written when it ends
    logs/<node>.log        everything the node's processes printed
    bulk/packer.log        the head's packer (bulk I/O, `fleet.worker.packer`)
    cancelled              `fleet cancel` was asked: nothing restarts

Processes are started with `setsid nohup` so that they survive the SSH session that
started them. The launcher runs the sampler beside the work, and on clouds the
preemption-notice watcher, which turns the provider's notice into SIGTERM for the
process group: the worker then finishes or releases the chunk in hand.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from fleet.errors import JobError, UsageError
from fleet.fleetops import Fleet, _home_path
from fleet.model import Node
from fleet.spec.job import JobSpec
from fleet.ssh import GroupResult

_LAUNCHER = r"""#!/bin/sh
# fleet job launcher: started by `fleet run` on every selected node (setsid, nohup).
# Environment from the caller: FLEET_NODE_NAME FLEET_NODE_RANK FLEET_NUM_NODES FLEET_SHARED
# FLEET_JOB FLEET_PYTHON FLEET_PROCESSES FLEET_RETRIES FLEET_NOTICE [FLEET_RUN] + the job's env.
JOB_DIR=$(pwd)
NODE="$FLEET_NODE_NAME"
mkdir -p pids status logs metrics
echo $$ > "pids/.$NODE.pid.tmp" && mv "pids/.$NODE.pid.tmp" "pids/$NODE.pid"
rm -f "status/$NODE.exit"
"$FLEET_PYTHON" -m fleet.worker.sampler --out "metrics/$NODE.jsonl" --node "$NODE" --pid $$ >/dev/null 2>&1 &
watcher=""
if [ -n "$FLEET_NOTICE" ] && [ "$FLEET_NOTICE" != local ]; then
  "$FLEET_PYTHON" -m fleet.worker.notice --provider "$FLEET_NOTICE" --pgid $$ &
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
    "$FLEET_PYTHON" -m fleet.worker "$JOB_DIR" --node "$NODE" --processes "$FLEET_PROCESSES" &
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
echo "$rc" > "status/.$NODE.exit.tmp" && mv "status/.$NODE.exit.tmp" "status/$NODE.exit"
exit "$rc"
"""


@dataclass(frozen=True)
class Progress:
    total: int
    done: int
    failed: int
    running_nodes: int
    finished_nodes: int
    failed_nodes: list[str]
    chunks: int = 0
    chunks_done: int = 0
    cancelled: bool = False

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.done + self.failed >= self.total


def q(value: str) -> str:
    return shlex.quote(value)


class JobRunner:
    """Start, follow, restart and cancel one job on a fleet."""

    def __init__(self, fleet: Fleet, job: JobSpec) -> None:
        self.fleet = fleet
        self.job = job
        self.spec_text = yaml.safe_dump(job.model_dump(mode="json", exclude_none=True), sort_keys=False)

    # -- paths as the nodes see them -------------------------------------------------------
    @property
    def rel_dir(self) -> str:
        return f"jobs/{self.job.name}"

    def job_dir_for(self, node: Node) -> str:
        """Shell word for the job dir on a node (head: the export; workers: the mount)."""
        base = self.fleet.shared_path_for(node).rstrip("/")
        return _home_path(f"{base}/{self.rel_dir}")

    def python_for(self) -> str:
        if self.job.python:
            return self.job.python
        return sys.executable if self.fleet.spec.provider == "local" else "python3"

    def notice_kind(self) -> str:
        return {"gcp": "gcp", "aws": "aws"}.get(self.fleet.spec.provider, "local")

    def selected(self, nodes: Sequence[Node]) -> list[Node]:
        selector = self.job.nodes
        if isinstance(selector, list):
            return self.fleet.select(nodes, ",".join(selector))
        return self.fleet.select(nodes, selector)

    def head(self, nodes: Sequence[Node]) -> Node:
        head = self.fleet.head(nodes)
        if head is None:
            raise JobError(f"the head of fleet {self.fleet.spec.name} is not running",
                           hint="run `fleet up` first")
        return head

    def _on_head(self, head: Node, script: str, *, timeout: float | None = None, env: dict[str, str] | None = None):
        result = self.fleet.exec([head], script, timeout=timeout, extra_env=env).results[head.name]
        return result

    # -- submit ---------------------------------------------------------------------------
    def submit(self, nodes: Sequence[Node]) -> str:
        """Put the job on the shared dir (or find it there). Returns new|same|finished."""
        head = self.head(nodes)
        job_dir = self.job_dir_for(head)
        check = self._on_head(head, f"cat {job_dir}/job.yaml 2>/dev/null || true")
        existing = check.stdout
        if existing.strip():
            if yaml.safe_load(existing) != yaml.safe_load(self.spec_text):
                raise UsageError(
                    f"a different job named {self.job.name!r} already exists on the shared directory",
                    hint="give the job a new name, or remove jobs/<name> on the head to start over",
                )
            state = "same"
        else:
            state = "new"
        put = self.fleet.executor.put([self.fleet.target(head)], self.spec_text.encode(),
                                      f"{self.fleet.spec.shared.path.rstrip('/')}/{self.rel_dir}/job.yaml")
        launcher = self.fleet.executor.put([self.fleet.target(head)], _LAUNCHER.encode(),
                                           f"{self.fleet.spec.shared.path.rstrip('/')}/{self.rel_dir}/launch.sh",
                                           mode=0o755)
        for result in (put, launcher):
            if not result.ok:
                raise JobError(f"could not write the job to the head: {result.summary()}")
        self._on_head(head, f"rm -f {job_dir}/cancelled")
        self.fleet.state.upsert_job(self.job.name, status="submitted", spec=self.spec_text)
        return state

    def prepare(self, nodes: Sequence[Node]) -> None:
        head = self.head(nodes)
        job_dir = self.job_dir_for(head)
        if self.job.prepare:
            script = (f"if [ -f {job_dir}/.prepared ]; then exit 0; fi; set -e; "
                      + "\n".join(self.job.prepare) + f"\ntouch {job_dir}/.prepared")
            result = self._on_head(head, script, env=self._job_env())
            if not result.ok:
                raise JobError(f"prepare failed on the head: {result.describe()}")
            self.fleet.state.add_event("prepared", head.name, f"job {self.job.name}")
        if self.job.worker is not None:
            init = self._on_head(head, f"cd {job_dir} && {q(self.python_for())} -m fleet.worker . --init")
            if not init.ok:
                raise JobError(f"the worker could not freeze the job's inputs: {init.describe()}")
            self.start_packer(head)

    def start_packer(self, head: Node) -> None:
        """Bulk I/O: the head's packer (`fleet.worker.packer`, fleet's installed code; -P
        keeps the job directory off sys.path). It exits at once when the job does not use
        bulk I/O and when another packer serves the job, so starting it again is harmless."""
        worker = self.job.worker
        if worker is None or worker.mode != "files" or worker.io == "mount":
            return
        job_dir = self.job_dir_for(head)
        started = self._on_head(
            head,
            # Only the packer goes to the background (a backgrounded `a && b` list would keep
            # this SSH session open until the packer exits).
            f"cd {job_dir} || exit 1; mkdir -p bulk; setsid nohup {q(self.python_for())} -P -m fleet.worker.packer "
            f"\"$PWD\" >> bulk/packer.log 2>&1 < /dev/null & echo started",
        )
        if not started.ok:  # the workers read and write through the mount instead
            self.fleet.state.add_event("packer_failed", head.name, started.describe())

    def _job_env(self) -> dict[str, str]:
        return {"FLEET_JOB": self.job.name, "FLEET_PYTHON": self.python_for(), **self.job.env}

    # -- start / restart ------------------------------------------------------------------
    def start(self, nodes: Sequence[Node], *, all_nodes: Sequence[Node] | None = None) -> GroupResult:
        """Start the job's processes on these nodes, unless they already run there or
        finished. Ranks are positions among every selected node."""
        ranked = self.selected(all_nodes if all_nodes is not None else nodes)
        ranks = {n.name: i for i, n in enumerate(ranked)}
        targets = [n for n in nodes if n.name in ranks]
        if self.job.setup:
            setup = "set -e\n" + "\n".join(self.job.setup)
            marker = f'"$HOME"/.fleet/jobs/{q(self.job.name)}.setup'
            script = f"if [ -f {marker} ]; then exit 0; fi; mkdir -p \"$HOME/.fleet/jobs\"; ( {setup}\n) && touch {marker}"
            results = self.fleet.exec(targets, script, extra_env=self._job_env())
            bad = [r for r in results.results.values() if not r.ok]
            for r in bad:
                self.fleet.state.add_event("job_setup_failed", r.node, r.describe())
            targets = [n for n in targets if results.results[n.name].ok]
        processes = self.job.processes_per_node
        env = {
            **self._job_env(),
            "FLEET_PROCESSES": str(processes),
            "FLEET_RETRIES": str(self.job.retries if self.job.run else 0),
            "FLEET_NOTICE": self.notice_kind(),
            "FLEET_RUN": self.job.run or "",
        }
        results = self._start_on(targets, env, ranks, len(ranked))
        for name, result in results.results.items():
            if result.ok and result.stdout.strip() == "started":
                self.fleet.state.add_event("working", name, f"job {self.job.name} started")
        return results

    def _start_on(self, nodes: Sequence[Node], env: dict[str, str], ranks: dict[str, int], count: int) -> GroupResult:
        by_name = {n.name: n for n in nodes}
        if not nodes:
            return GroupResult({})

        def command(target) -> str:
            node = by_name[target.name]
            job_dir = self.job_dir_for(node)
            prefix = self.fleet.node_env_prefix(node, ranks[node.name], count, env)
            return (
                prefix + f"cd {job_dir} || exit 1; "
                f"if [ -f cancelled ]; then echo cancelled; exit 0; fi; "
                f"if [ -f status/{q(node.name)}.exit ] && [ \"$(cat status/{q(node.name)}.exit)\" = 0 ]; then echo finished; exit 0; fi; "
                f"if [ -f pids/{q(node.name)}.pid ] && kill -0 \"$(cat pids/{q(node.name)}.pid)\" 2>/dev/null; then echo running; exit 0; fi; "
                f"mkdir -p logs; setsid nohup sh ./launch.sh >> logs/{q(node.name)}.log 2>&1 < /dev/null & "
                f"echo started"
            )

        return self.fleet.executor.run([self.fleet.target(n) for n in nodes], command)

    # -- progress -------------------------------------------------------------------------
    def progress(self, nodes: Sequence[Node]) -> Progress:
        head = self.head(nodes)
        job_dir = self.job_dir_for(head)
        selected = self.selected(nodes)
        status_script = (
            f"cd {job_dir} || exit 1; for f in status/*.exit; do [ -f \"$f\" ] && echo \"EXIT $(basename \"$f\" .exit) $(cat \"$f\")\"; done; "
            f"for f in pids/*.pid; do [ -f \"$f\" ] && echo \"PID $(basename \"$f\" .pid)\"; done; "
            f"if [ -f cancelled ]; then echo CANCELLED; fi; true"
        )
        if self.job.worker is not None:
            status_script += f"; echo STATUS; {q(self.python_for())} -m fleet.worker . --status"
        result = self._on_head(head, status_script, timeout=60)
        if not result.ok:
            raise JobError(f"cannot read the job's progress on the head: {result.describe()}")
        exits: dict[str, int] = {}
        started: set[str] = set()
        status: dict[str, int] = {}
        lines = result.stdout.splitlines()
        cancelled = "CANCELLED" in lines
        for i, line in enumerate(lines):
            if line.startswith("EXIT "):
                _, name, code = (line.split(" ") + ["1"])[:3]
                exits[name] = int(code) if code.strip().lstrip("-").isdigit() else 1
            elif line.startswith("PID "):
                started.add(line.split(" ", 1)[1])
            elif line == "STATUS" and i + 1 < len(lines):
                status = json.loads(lines[i + 1])
        selected_names = {n.name for n in selected}
        finished = [name for name in exits if name in selected_names or name in started]
        failed_nodes = [name for name, code in exits.items() if code != 0]
        running = len([n for n in selected if n.name in started and n.name not in exits])
        if self.job.worker is not None:
            return Progress(total=int(status.get("total", 0)), done=int(status.get("done", 0)),
                            failed=int(status.get("failed", 0)), running_nodes=running,
                            finished_nodes=len(finished), failed_nodes=failed_nodes,
                            chunks=int(status.get("chunks", 0)), chunks_done=int(status.get("chunks_done", 0)),
                            cancelled=cancelled)
        # run: jobs: one unit of work per selected node, done when it exited 0.
        total = len(selected_names | set(exits))
        done = len([name for name, code in exits.items() if code == 0])
        return Progress(total=total, done=done, failed=len(failed_nodes), running_nodes=running,
                        finished_nodes=len(finished), failed_nodes=failed_nodes, cancelled=cancelled)

    # -- the end of a job -----------------------------------------------------------------
    def sweep_temporaries(self, nodes: Sequence[Node], *, age: int = 5) -> int:
        """Delete the temporary files that writers killed mid-write left behind (a node
        preempted without notice dies between writing `.<name>.<random>.tmp` and renaming
        it). Call it when every item is done and the processes have ended; files written
        to in the last `age` seconds are spared all the same. Returns how many went."""
        if self.job.worker is None:
            return 0
        head = self.head(nodes)
        shared = self.fleet.shared_path_for(head).rstrip("/")
        outputs = self.job.worker.outputs
        outputs_dir = outputs if outputs.startswith(("/", "~")) else f"{shared}/{outputs}"
        script = (
            f"cutoff=$(( $(date +%s) - {age} )); "
            f"find {_home_path(outputs_dir)} {self.job_dir_for(head)} -name '.*.tmp' -type f "
            f"! -newermt \"@$cutoff\" -print -delete 2>/dev/null | wc -l"
        )
        result = self._on_head(head, script, timeout=300)
        count = int(result.stdout.strip() or 0) if result.ok and result.stdout.strip().isdigit() else 0
        if count:
            self.fleet.state.add_event("swept", head.name, f"job {self.job.name}: deleted {count} temporary file(s) "
                                       "left by writers that were killed")
        return count

    # -- cancel / logs --------------------------------------------------------------------
    def cancel(self, nodes: Sequence[Node]) -> GroupResult:
        head = self.head(nodes)
        self._on_head(head, f"mkdir -p {self.job_dir_for(head)} && touch {self.job_dir_for(head)}/cancelled")
        alive = self.fleet.alive(nodes)

        def command(target) -> str:
            node = next(n for n in alive if n.name == target.name)
            pid_file = f"{self.job_dir_for(node)}/pids/{q(node.name)}.pid"
            return (
                f"[ -f {pid_file} ] || exit 0; pg=$(cat {pid_file}); "
                f"kill -TERM -- -\"$pg\" 2>/dev/null || exit 0; "
                f"for i in $(seq 1 100); do kill -0 -- -\"$pg\" 2>/dev/null || exit 0; sleep 0.1; done; "
                f"kill -KILL -- -\"$pg\" 2>/dev/null; exit 0"
            )

        results = self.fleet.executor.run([self.fleet.target(n) for n in alive], command, timeout=60)
        self.stop_packer(head)
        self.fleet.state.set_job_status(self.job.name, "cancelled")
        self.fleet.state.add_event("cancelled", None, f"job {self.job.name}")
        return results

    def stop_packer(self, head: Node) -> None:
        """After the workers stopped (their last deliveries are unpacked by then): SIGTERM
        the head's packer, which unpacks what is pending and exits. The pid is checked to
        be a packer's (a stale pid file must not kill whatever reuses the number)."""
        self._on_head(
            head,
            f"cd {self.job_dir_for(head)} 2>/dev/null && [ -f bulk/packer.pid ] || exit 0; pid=$(cat bulk/packer.pid); "
            "case \"$pid\" in ''|*[!0-9]*) exit 0;; esac; "  # workers can write there: a number or nothing
            "tr '\\0' ' ' < /proc/\"$pid\"/cmdline 2>/dev/null | grep -q fleet.worker.packer || exit 0; "
            "kill -TERM \"$pid\" 2>/dev/null || exit 0; "
            "for i in $(seq 1 100); do kill -0 \"$pid\" 2>/dev/null || exit 0; sleep 0.1; done; "
            "kill -KILL \"$pid\" 2>/dev/null; exit 0",
            timeout=60,
        )

    def log_command(self, node_name: str | None, *, follow: bool, head: Node) -> str:
        logs = f"{self.job_dir_for(head)}/logs"
        name = f"{q(node_name)}.log" if node_name else "*.log"
        if follow:
            return f"cd {logs} && tail -n +1 -F {name}"
        return f"cd {logs} && for f in {name}; do [ -f \"$f\" ] && sed \"s/^/$(basename \"$f\" .log) | /\" \"$f\"; done; true"


def job_from_state(fleet: Fleet, name: str) -> JobSpec:
    from fleet.spec.loader import parse_job_spec

    record = fleet.state.job(name)
    if record is None:
        raise UsageError(f"no job named {name!r} was run on fleet {fleet.spec.name}", hint="`fleet jobs` lists them")
    return parse_job_spec(record.spec, file=f"<job {name}>", env={})
