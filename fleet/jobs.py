"""Jobs across the fleet: put a job on the shared dir, start it on nodes, follow it.

A job lives in `<shared>/jobs/<name>/` on the head (the worker's files in
`fleet.worker.layout`; the launcher, its pid, heartbeat, exit and log files and the
status lines in `fleet.worker.protocol`); this module adds:

    job.yaml               the validated spec (interpolated), as submitted, without `env:`
    bulk/packer.log        the head's packer (bulk I/O, `fleet.worker.packer`)

A launcher whose heartbeat goes stale on a live node (killed: SIGKILL, OOM) is started
again (`restart_stale`), after what is left of its process group is stopped.

Nothing on the shared directory is ever executed or imported by a node: any worker can
write there. Each node keeps what it runs in `~/.fleet/jobs/<name>/` (0700, written by
the control plane over SFTP): `launch.sh` (0700) and `env.sh` (0600, the job's `env:`,
sourced by the commands; the values never appear on a command line, in job.yaml, or in a
message); every Python the fleet runs there is started with `-P` (no current directory
on sys.path), and pid files read back from the shared directory are checked to name this
job's launcher before anything is signalled.

Processes are started with `setsid nohup` so that they survive the SSH session that
started them. The launcher runs the sampler beside the work, and on clouds the
preemption-notice watcher, which turns the provider's notice into SIGTERM for the
process group: the worker then finishes or releases the chunk in hand.
"""

from __future__ import annotations

import dataclasses
import posixpath
import shlex
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from fleet.errors import JobError, UsageError
from fleet.fleetops import Fleet
from fleet.model import Node
from fleet.runtime import runtime_check
from fleet.spec.job import JobSpec
from fleet.ssh import CommandResult, GroupResult
from fleet.ssh.quote import home_path
from fleet.worker import protocol
from fleet.worker.protocol import STALE_S
from fleet.worker.yamlbound import safe_load_bounded

# What the launcher runs for a `serve:` job (as a `run:` command: restarts, stop on signal).
SERVE_COMMAND = 'exec "$FLEET_PYTHON" -P -m fleet.worker.serve "$(pwd)" --node "$FLEET_NODE_NAME"'
_LAUNCHER = protocol.launcher_script(runtime_check())


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
    stale_nodes: tuple[str, ...] = ()  # started, no exit, heartbeat older than STALE_S

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.done + self.failed >= self.total


def q(value: str) -> str:
    return shlex.quote(value)


REDACTED = "***"
NODE_JOBS = ".fleet/jobs"
SETUP_RETRY_S = 1.0  # pause between two tries of a job's setup on a node  # under the node's home: what each node keeps of its jobs (0700)


def redact(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret value replaced by ***."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def valid_group_check(pid_file: str, launcher: str) -> str:
    """Shell: set `pg` from `pid_file` only if it names a live process group led by this
    job's launcher (`sh <launcher>`); else leave `pg` empty. A pid file on the shared
    directory can be rewritten by any worker: `1`, a stranger's pid, or another job's."""
    return (
        f'launcher={launcher}; pg=$(head -c 32 {pid_file} 2>/dev/null | tr -d " \\n"); '
        f'case "$pg" in ""|*[!0-9]*) pg="" ;; esac; '
        f'if [ -n "$pg" ] && [ "$pg" -gt 1 ] && [ "$(ps -o pgid= -p "$pg" 2>/dev/null | tr -d " ")" = "$pg" ] '
        f'&& [ "$(tr "\\000" " " < /proc/"$pg"/cmdline 2>/dev/null)" = "sh $launcher " ]; then :; else pg=""; fi; '
    )


class JobRunner:
    """Start, follow, restart and cancel one job on a fleet."""

    def __init__(self, fleet: Fleet, job: JobSpec) -> None:
        self.fleet = fleet
        self.job = job
        self._starting = threading.Lock()  # one start at a time (the follower's restarts, the monitor's replacements)
        # The whole spec (env too) stays in the fleet's state.db (0600); the shared
        # directory, readable by every worker, gets it without the env.
        self.spec_text = yaml.safe_dump(job.model_dump(mode="json", exclude_none=True), sort_keys=False)
        self.shared_text = yaml.safe_dump(job.model_dump(mode="json", exclude_none=True, exclude={"env"}),
                                          sort_keys=False)

    def redact(self, text: str) -> str:
        """`text` with the values of the job's env replaced by ***."""
        return redact(text, list(self.job.env.values()))

    # -- what each node keeps outside the shared directory ----------------------------------
    @property
    def node_dir(self) -> str:
        """Shell word of ~/.fleet/jobs/<job> on a node (0700)."""
        return f'"$HOME"/{NODE_JOBS}/{q(self.job.name)}'

    @property
    def launcher(self) -> str:
        return f"{self.node_dir}/launch.sh"

    @property
    def env_file(self) -> str:
        return f"{self.node_dir}/env.sh"

    def env_text(self) -> str:
        from fleet.ray.jobspec import ray_job_env

        env = {**self.job.env, **ray_job_env(self)}  # a `ray:` job's submission travels here too
        return "".join(f"export {name}={q(value)}\n" for name, value in env.items())

    def install(self, nodes: Sequence[Node]) -> dict[str, str]:
        """Write launch.sh (0700) and env.sh (0600) into ~/.fleet/jobs/<job>/ (0700) on
        each node. Returns node -> why it failed."""
        if not nodes:
            return {}
        targets = [self.fleet.target(n) for n in nodes]
        base = f"{NODE_JOBS}/{self.job.name}"
        failures: dict[str, str] = {}
        for data, name, mode in ((_LAUNCHER.encode(), "launch.sh", 0o700), (self.env_text().encode(), "env.sh", 0o600)):
            results = self.fleet.executor.put(targets, data, f"{base}/{name}", mode=mode, dir_mode=0o700)
            for node_name, result in results.results.items():
                if not result.ok:
                    failures.setdefault(node_name, self.redact(result.describe()))
        return failures

    def _sourced(self, command: str) -> str:
        """`command` after the job's env file is sourced (its values never on a command line)."""
        return f". {self.env_file} || exit 1\n{command}"

    # -- paths as the nodes see them -------------------------------------------------------
    @property
    def rel_dir(self) -> str:
        return f"jobs/{self.job.name}"

    def job_dir_for(self, node: Node) -> str:
        """Shell word for the job dir on a node (head: the export; workers: the mount)."""
        base = self.fleet.shared_path_for(node).rstrip("/")
        return home_path(f"{base}/{self.rel_dir}")

    def python_word(self) -> str:
        """The interpreter of the job's processes as a shell word: the job's `python:`,
        else the node runtime's (FLEET_PYTHON), else python3 (runtime.install: false)."""
        if self.job.python:
            return q(self.job.python)
        return '"$FLEET_PYTHON"' if self.fleet.runtime.enabled else "python3"

    def runtime_check(self) -> str:
        """Shell that stops with an error naming the runtime when a node lacks it."""
        return runtime_check() + "; " if self.fleet.runtime.enabled and not self.job.python else ""

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
            try:
                same = safe_load_bounded(existing) == yaml.safe_load(self.shared_text)
            except (yaml.YAMLError, ValueError):
                same = False  # unreadable (or an alias bomb planted there): not our job
            if not same:
                raise UsageError(
                    f"a different job named {self.job.name!r} already exists on the shared directory",
                    hint="give the job a new name, or remove jobs/<name> on the head to start over",
                )
            state = "same"
        else:
            state = "new"
        put = self.fleet.executor.put([self.fleet.target(head)], self.shared_text.encode(),
                                      f"{self.fleet.spec.shared.path.rstrip('/')}/{self.rel_dir}/job.yaml",
                                      dir_mode=0o2775)  # workers (the share account) write in it
        if not put.ok:
            raise JobError(f"could not write the job to the head: {put.summary()}")
        failed = self.install([head])
        if failed:
            raise JobError(f"could not write the job's launcher to the head: {failed[head.name]}")
        if self.job.ray is not None:
            from fleet.ray.jobspec import put_working_dir

            put_working_dir(self, head)
        self._on_head(head, f"rm -f {job_dir}/{protocol.CANCELLED}")
        self.fleet.state.upsert_job(self.job.name, status="submitted", spec=self.spec_text)
        return state

    def prepare(self, nodes: Sequence[Node]) -> None:
        head = self.head(nodes)
        job_dir = self.job_dir_for(head)
        if self.job.prepare:
            prepared = f"{job_dir}/{protocol.PREPARED}"
            script = (f"if [ -f {prepared} ]; then exit 0; fi; {self.runtime_check()}set -e; "
                      + "\n".join(self.job.prepare) + f"\ntouch {prepared}")
            result = self._on_head(head, self._sourced(script), env=self._job_env())
            if not result.ok:
                raise JobError(f"prepare failed on the head: {self.redact(result.describe())}")
            self.fleet.state.add_event("prepared", head.name, f"job {self.job.name}")
        if self.job.worker is not None:
            init = self._on_head(head, self._sourced(
                f"{self.runtime_check()}cd {job_dir} && {self.python_word()} -P -m fleet.worker . --init"))
            if not init.ok:
                raise JobError(f"the worker could not freeze the job's inputs: {self.redact(init.describe())}")
            self.start_packer(head)

    def start_packer(self, head: Node) -> None:
        """Bulk I/O: the head's packer (`fleet.worker.packer`, fleet's installed code; -P
        keeps the job directory off sys.path). It exits at once when the job does not use
        bulk I/O and when another packer serves the job, so starting it again is harmless."""
        worker = self.job.worker
        if worker is None or worker.mode != "files" or worker.io == "mount":
            return
        job_dir = self.job_dir_for(head)
        # Only the packer goes to the background (a backgrounded `a && b` list would keep
        # this SSH session open until the packer exits).
        started = self._on_head(head, self._sourced(
            f"{self.runtime_check()}cd {job_dir} || exit 1; mkdir -p bulk; setsid nohup {self.python_word()} -P "
            f"-m fleet.worker.packer \"$PWD\" >> bulk/packer.log 2>&1 < /dev/null & echo started"))
        if not started.ok:  # the workers read and write through the mount instead
            self.fleet.state.add_event("packer_failed", head.name, self.redact(started.describe()))

    def _job_env(self) -> dict[str, str]:
        """FLEET_* variables of the job's commands (the job's own env comes from env.sh)."""
        env = {"FLEET_JOB": self.job.name}
        if self.job.python:
            env["FLEET_PYTHON"] = self.job.python
        elif self.fleet.runtime.enabled:
            env["FLEET_RUNTIME"] = self.fleet.runtime.stamp()
        else:
            env["FLEET_PYTHON"] = "python3"
        return env

    # -- start / restart ------------------------------------------------------------------
    def start(self, nodes: Sequence[Node], *, all_nodes: Sequence[Node] | None = None) -> GroupResult:
        """Start the job's processes on these nodes, unless they already run there or
        finished. Ranks are positions among every selected node."""
        with self._starting:
            return self._start(nodes, all_nodes)

    def _start(self, nodes: Sequence[Node], all_nodes: Sequence[Node] | None) -> GroupResult:
        ranked = self.selected(all_nodes if all_nodes is not None else nodes)
        ranks = {n.name: i for i, n in enumerate(ranked)}
        targets = [n for n in nodes if n.name in ranks]
        not_installed = self.install(targets)
        for name, why in not_installed.items():
            self.fleet.state.add_event("job_setup_failed", name, why)
        targets = [n for n in targets if n.name not in not_installed]
        setup_failed = self.run_setup(targets, all_nodes if all_nodes is not None else nodes)
        targets = [n for n in targets if n.name not in setup_failed]
        processes = self.job.processes_per_node
        env = {
            **self._job_env(),
            "FLEET_PROCESSES": str(processes),
            "FLEET_RETRIES": str(self.job.retries if self.job.run or self.job.serve else 0),
            "FLEET_NOTICE": self.notice_kind(),
            "FLEET_RUN": self.job.run or (SERVE_COMMAND if self.job.serve else "") or self._ray_command(),
        }
        results = self._start_on(targets, env, ranks, len(ranked))
        for name, result in results.results.items():
            if result.ok and result.stdout.strip() == "started":
                self.fleet.state.add_event("working", name, f"job {self.job.name} started")
        return GroupResult({**results.results, **setup_failed})

    def run_setup(self, nodes: Sequence[Node], all_nodes: Sequence[Node]) -> dict[str, CommandResult]:
        """The job's `setup:` on each node, tried 1 + `retries` times. A node where it
        keeps failing is that node's failure: an event, and an exit status on the shared
        directory (`status/<node>.exit`, what its launcher would have left), so that the
        job's progress counts the node as ended and failed. Returns node -> its result."""
        if not self.job.setup or not nodes:
            return {}
        setup = "set -e\n" + "\n".join(self.job.setup)
        marker = f'"$HOME"/.fleet/jobs/{q(self.job.name)}.setup'
        script = self._sourced(
            f"if [ -f {marker} ]; then exit 0; fi; mkdir -p \"$HOME/.fleet/jobs\"; ( {setup}\n) && touch {marker}")
        pending = list(nodes)
        failed: dict[str, CommandResult] = {}
        attempts = 1 + self.job.retries
        for attempt in range(1, attempts + 1):
            results = self.fleet.exec(pending, script, extra_env=self._job_env())
            failed = {name: r for name, r in results.results.items() if not r.ok}
            for name, result in failed.items():
                self.fleet.state.add_event("job_setup_failed", name, f"attempt {attempt} of {attempts}: "
                                           + self.redact(result.describe()))
            pending = [n for n in pending if n.name in failed]
            if not pending:
                return {}
            if attempt < attempts:
                self.fleet.cancel.wait(SETUP_RETRY_S)
        failed = {name: dataclasses.replace(r, command="the job's setup", stdout=self.redact(r.stdout),
                                            stderr=self.redact(r.stderr)) for name, r in failed.items()}
        self._record_failed(failed, all_nodes)
        return failed

    def _record_failed(self, failed: dict[str, CommandResult], nodes: Sequence[Node]) -> None:
        """Write `status/<node>.exit` on the head for nodes whose job could not start."""
        head = self.fleet.head(nodes)
        if head is None or not failed:
            return
        job_dir = self.job_dir_for(head)
        lines = [f"cd {job_dir} || exit 1"]
        for name, result in failed.items():
            code = result.exit_code if result.exit_code not in (None, 0) else 1
            lines.append(protocol.write_exit(name, code))
        outcome = self._on_head(head, "\n".join(lines))
        if not outcome.ok:
            self.fleet.state.add_event("progress_error", head.name, "could not record failed setups: "
                                       + self.redact(outcome.describe()))

    def _ray_command(self) -> str:
        from fleet.ray.jobspec import RAY_COMMAND

        return RAY_COMMAND if self.job.ray is not None else ""

    def _start_on(self, nodes: Sequence[Node], env: dict[str, str], ranks: dict[str, int], count: int) -> GroupResult:
        by_name = {n.name: n for n in nodes}
        if not nodes:
            return GroupResult({})

        def command(target) -> str:
            node = by_name[target.name]
            job_dir = self.job_dir_for(node)
            prefix = self.fleet.node_env_prefix(node, ranks[node.name], count, env)
            exit_file = protocol.exit_file(node.name)
            return prefix + self._sourced(
                self.runtime_check() + f"cd {job_dir} || exit 1; "
                f"if [ -f {protocol.CANCELLED} ]; then echo cancelled; exit 0; fi; "
                f"if [ -f {exit_file} ] && [ \"$(cat {exit_file})\" = 0 ]; then echo finished; exit 0; fi; "
                + valid_group_check(protocol.pid_file(node.name), self.launcher) +
                "if [ -n \"$pg\" ]; then echo running; exit 0; fi; "
                + self._stop_leftovers() +
                f"mkdir -p logs; setsid nohup sh {self.launcher} >> {protocol.log_file(node.name)} 2>&1 < /dev/null & "
                f"echo started"
            )

        return self.fleet.executor.run([self.fleet.target(n) for n in nodes], command)

    def _stop_leftovers(self) -> str:
        """Shell: the launcher is not running, yet its process group may be (a launcher
        killed alone leaves its worker behind): TERM what is left (the worker releases
        its chunk), KILL it after 10 s. The group is read from the node's own copy
        (~/.fleet/jobs/<job>/launcher.pid, 0700 directory), never from the shared one."""
        return (
            f"old=$(head -c 32 {self.node_dir}/{protocol.LAUNCHER_PID} 2>/dev/null | tr -d ' \\n'); "
            'case "$old" in ""|*[!0-9]*) old="" ;; esac; '
            'if [ -n "$old" ] && [ "$old" -gt 1 ] && kill -0 -- -"$old" 2>/dev/null; then '
            'kill -TERM -- -"$old" 2>/dev/null; '
            'for i in $(seq 1 50); do kill -0 -- -"$old" 2>/dev/null || break; sleep 0.2; done; '
            'kill -KILL -- -"$old" 2>/dev/null; fi; '
            f"rm -f {self.node_dir}/{protocol.LAUNCHER_PID}; "
        )

    def restart_stale(self, stale: Sequence[str], nodes: Sequence[Node]) -> list[str]:
        """Start the job again on live nodes whose launcher's heartbeat went stale. The
        node decides: a launcher still running there is left alone. Returns the nodes
        where a new launcher started."""
        targets = [n for n in self.fleet.alive(nodes) if n.name in stale]
        if not targets:
            return []
        results = self.start(targets, all_nodes=nodes)
        restarted = [name for name, r in results.results.items() if r.ok and r.stdout.strip() == "started"]
        for name in restarted:
            self.fleet.state.add_event("launcher_restarted", name, f"job {self.job.name}: its launcher stopped "
                                       f"beating for more than {STALE_S:g} s (killed?); its chunk is taken over")
        return restarted

    # -- progress -------------------------------------------------------------------------
    def progress(self, nodes: Sequence[Node]) -> Progress:
        head = self.head(nodes)
        job_dir = self.job_dir_for(head)
        selected = self.selected(nodes)
        status_script = f"cd {job_dir} || exit 1; {protocol.status_script()}"
        if self.job.worker is not None:
            status_script += f"; echo STATUS; {self.runtime_check()}{self.python_word()} -P -m fleet.worker . --status"
        result = self._on_head(head, status_script, timeout=60)
        if not result.ok:
            raise JobError(f"cannot read the job's progress on the head: {self.redact(result.describe())}")
        launchers = protocol.parse_status(result.stdout)
        exits, started, status, cancelled = launchers.exits, launchers.started, launchers.worker, launchers.cancelled
        selected_names = {n.name for n in selected}
        finished = [name for name in exits if name in selected_names or name in started]
        failed_nodes = [name for name, code in exits.items() if code != 0]
        stale = tuple(n.name for n in selected if launchers.stale(n.name))
        running = len([n for n in selected if n.name in started and n.name not in exits and n.name not in stale])
        if self.job.worker is not None:
            return Progress(total=int(status.get("total", 0)), done=int(status.get("done", 0)),
                            failed=int(status.get("failed", 0)), running_nodes=running,
                            finished_nodes=len(finished), failed_nodes=failed_nodes,
                            chunks=int(status.get("chunks", 0)), chunks_done=int(status.get("chunks_done", 0)),
                            cancelled=cancelled, stale_nodes=stale)
        # run: jobs: one unit of work per selected node, done when it exited 0.
        total = len(selected_names | set(exits))
        done = len([name for name, code in exits.items() if code == 0])
        return Progress(total=total, done=done, failed=len(failed_nodes), running_nodes=running,
                        finished_nodes=len(finished), failed_nodes=failed_nodes, cancelled=cancelled,
                        stale_nodes=stale)

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
        outputs_dir = sweep_root(shared, self.job.worker.outputs)
        if outputs_dir is None:
            self.fleet.state.add_event("sweep_refused", head.name, f"job {self.job.name}: outputs "
                                       f"{self.job.worker.outputs!r} is not a directory of its own")
            return 0
        # Resolved on the head: the job dir must lie in the shared directory, and so must
        # relative outputs (a worker could have put a symlink there); outputs are never
        # `/`, the home, or a directory holding the job dir. find never follows links
        # (-P) nor leaves the file system (-xdev).
        inside = "" if self.job.worker.outputs.startswith(("/", "~")) else 'case "$o" in "$s"/*) ;; *) o="" ;; esac; '
        script = (
            f"cutoff=$(( $(date +%s) - {age} )); "
            f"s=$(cd {home_path(shared)} && pwd -P) && j=$(cd {self.job_dir_for(head)} && pwd -P) || {{ echo 0; exit 0; }}; "
            f'case "$j" in "$s"/*) ;; *) echo 0; exit 0 ;; esac; set -- "$j"; h=$(cd && pwd -P); '
            f"o=$(cd {home_path(outputs_dir)} 2>/dev/null && pwd -P) || o=''; " + inside +
            'case "$o/" in /|//|"$h"/) o="" ;; esac; case "$j/" in "$o"/*) o="" ;; esac; '
            '[ -n "$o" ] && set -- "$@" "$o"; '
            "find -P \"$@\" -xdev -name '.*.tmp' -type f "
            "! -newermt \"@$cutoff\" -print -delete 2>/dev/null | wc -l"
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
        self._on_head(head, f"mkdir -p {self.job_dir_for(head)} && touch {self.job_dir_for(head)}/{protocol.CANCELLED}")
        results = self.stop_processes(nodes)
        self.stop_packer(head)
        self.fleet.state.set_job_status(self.job.name, "cancelled")
        self.fleet.state.add_event("cancelled", None, f"job {self.job.name}")
        return results

    def stop_processes(self, nodes: Sequence[Node], *, handover: bool = False) -> GroupResult:
        """Stop the job's launcher (and its process group) on each alive node of `nodes`,
        the one its pid file records and only if it leads that group. `handover`: it is
        started again at once, so it leaves no exit status (the node has not ended)."""
        alive = self.fleet.alive(nodes)

        def command(target) -> str:
            node = next(n for n in alive if n.name == target.name)
            job_dir = self.job_dir_for(node)
            pid_file = f"{job_dir}/{protocol.pid_file(node.name)}"
            mark = (f"mkdir -p {job_dir}/status && : > {job_dir}/{protocol.handover_file(node.name)}; "
                    if handover else "")
            return (
                f"[ -f {pid_file} ] || exit 0; " + valid_group_check(pid_file, self.launcher) +
                "[ -n \"$pg\" ] || exit 0; " + mark +
                "kill -TERM -- -\"$pg\" 2>/dev/null || exit 0; "
                "for i in $(seq 1 100); do kill -0 -- -\"$pg\" 2>/dev/null || exit 0; sleep 0.1; done; "
                "kill -KILL -- -\"$pg\" 2>/dev/null; exit 0"
            )

        return self.fleet.executor.run([self.fleet.target(n) for n in alive], command, timeout=60)

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


def sweep_root(shared: str, outputs: str) -> str | None:
    """The path (as the head sees it) of the outputs the temporary-file sweep may walk,
    or None when it is plainly not a directory of the job's own: `/`, the home, the
    shared root, a parent of it, or the directory that holds the job directories."""
    if outputs.startswith("~"):
        path = posixpath.normpath(outputs[1:].lstrip("/") or ".")
    elif outputs.startswith("/"):
        path = posixpath.normpath(outputs)
    else:
        path = posixpath.normpath(f"{shared.rstrip('/')}/{outputs}")
    if path in ("/", ".") or path.split("/")[0] == "..":
        return None
    for holder in (shared.rstrip("/") or "/", posixpath.normpath(f"{shared.rstrip('/')}/jobs")):
        if holder == path or holder.startswith(path.rstrip("/") + "/"):
            return None
    return path


def job_from_state(fleet: Fleet, name: str) -> JobSpec:
    from fleet.spec.loader import parse_job_spec

    record = fleet.state.job(name)
    if record is None:
        raise UsageError(f"no job named {name!r} was run on fleet {fleet.spec.name}", hint="`fleet jobs` lists them")
    return parse_job_spec(record.spec, file=f"<job {name}>", env={})
