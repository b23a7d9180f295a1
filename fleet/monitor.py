"""The reconcile loop: keep the fleet at its spec while machines disappear under it.

Every `monitor.interval` one pass probes the nodes over SSH (connections are reused,
so a probe is one cheap command; a mounted worker also checks that its mount
answers), then runs the reconciler (`fleet.reconcile.plan`, the same planner as
`fleet up`) on what the provider lists, the fleet's record and the probes, and carries
the plan out with the one applier (`fleet.applier`):

- a worker that is PREEMPTED or TERMINATED, or vanished from the provider's list
  without `fleet` deleting it, is replaced at once by the slot's next generation;
- a node that does not answer SSH for longer than `monitor.grace` is lost (the same
  rule for the head and the workers, whatever the provider says);
- a stopped head is started (its disks kept); a lost head is replaced (the data disk
  is attached to the new one), and every worker remounts it;
- a live node whose record is behind (a failed export, an interrupted `up`, a dead
  mount) is brought forward;
- failures back off (doubling from `monitor.backoff`, in the node's record), and
  replacements stop at `monitor.max_replacements` with a clear event;
- the nodes that came up are handed to the running job (`on_replaced`).

Every decision is an event in the fleet's state. The clock and sleep are injectable so
that tests of the decisions do not wait for real.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from fleet.applier import Applier, OnReplaced, PassReport
from fleet.fleetops import Fleet, UpResult
from fleet.model import Node, NodeState, Role, head_name
from fleet.reconcile import Create, Probe, Start
from fleet.ssh.quote import home_path
from fleet.state import exclusive_lock, make_private_dir

__all__ = ["MONITOR_LOCK", "Monitor", "OnReplaced", "PassReport", "monitor_lock"]
MONITOR_LOCK = "monitor.lock"


@contextlib.contextmanager
def monitor_lock(state_dir: Path) -> Iterator[None]:
    """The fleet's one monitor lock (`.fleet/<name>/monitor.lock`, flock), held for a pass."""
    make_private_dir(state_dir)
    with exclusive_lock(state_dir / MONITOR_LOCK):
        yield


class Monitor:
    def __init__(
        self,
        fleet: Fleet,
        *,
        on_replaced: OnReplaced | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        probe_ssh: bool = True,
    ) -> None:
        self.fleet = fleet
        self.spec = fleet.spec
        self.on_replaced = on_replaced
        self.clock = clock
        self.sleep = sleep
        self.probe_ssh = probe_ssh
        self.replacements = 0
        self.applier = Applier(fleet, on_replaced=on_replaced, clock=clock)
        self._replacing_head = False
        # On a session of its own (`Fleet.session`), stop() also ends the waits of a pass.
        self._stop = fleet.cancel if fleet.is_session else threading.Event()

    @property
    def exhausted(self) -> bool:
        return self.applier.exhausted

    # -- one pass -------------------------------------------------------------------------
    def reconcile_once(self) -> PassReport:
        """One pass, holding the fleet's monitor lock: two monitors (`fleet run` and
        `fleet watch`) never decide at once, so a lost slot gets one next generation
        (the second monitor's pass observes what the first one created)."""
        with monitor_lock(self.fleet.paths.state_dir):
            return self._reconcile_pass()

    def _reconcile_pass(self) -> PassReport:
        report = PassReport()
        observed = self.fleet.observe()
        report.observed = observed
        now = self.clock()
        probed = [n for n in observed if n.state in (NodeState.RUNNING, NodeState.UNREACHABLE)]
        probes = self._probe(probed, now) if self.probe_ssh and probed else {}
        left = max(0, self.spec.monitor.max_replacements - self.replacements)
        planned = self.fleet.plan(observed, probes, now=now, replacements_left=left)
        head = head_name(self.spec.name)
        moves = ([a for a in planned.of(Start) if a.node.name == head]
                 + [a for a in planned.of(Create) if a.request.name == head])
        if moves:
            self._replacing_head = True
        # The plan is judged at `now`; its back-off delays start from the clock too.
        self.applier.apply(planned, UpResult(), report)
        self.replacements += report.replacements
        if moves:  # a failed start or create of the head is tried again after its back-off
            self._replacing_head = head in report.failed and not self.exhausted
        return report

    def replacing_head(self) -> bool:
        """Whether this monitor is bringing a (re)started or new head up, or will try
        again after a failure (`fleet run` waits for it past its grace)."""
        return self._replacing_head

    def _probe(self, nodes: Sequence[Node], now: float) -> dict[str, Probe]:
        """One SSH probe per node; the record keeps since when each has not answered."""
        fleet = self.fleet
        records = {r.name: r for r in fleet.state.nodes()}
        mounts = {n.name for n in nodes if n.role == Role.WORKER and n.name in records
                  and records[n.name].step in ("mounted", "job_started")}
        mount = home_path(self.spec.shared.mount)
        # Dead (the head went away under sshfs): UNMOUNTED; statfs, unlike `ls`, is never
        # answered from sshfs's cache. Slow (137: given up after 1 s; `mountpoint` stats the
        # mount too): the head's own probe judges that; the mount counts as there. A
        # process waiting on a dead sshfs stays in its FUSE request whatever the signal,
        # and the session ends only when nothing holds its output: so SIGKILL (`timeout`
        # returns at once, not after its child) and no stdio from the session (the
        # probe took as long as sshfs waited on its dead connection: 10 s a check).
        quiet = "</dev/null >/dev/null 2>&1"
        check = (f"timeout -s KILL 1 mountpoint -q {mount} {quiet}; rc=$?; if [ $rc = 137 ]; then echo MOUNTED; "
                 f"elif [ $rc != 0 ]; then echo UNMOUNTED; else timeout -s KILL 1 stat -f {mount} {quiet}; "
                 "rc=$?; if [ $rc = 0 ] || [ $rc = 137 ]; then echo MOUNTED; else echo UNMOUNTED; fi; fi")

        def command(target) -> str:
            return check if target.name in mounts else "true"

        results = fleet.executor.run([fleet.target(n) for n in nodes], command,
                                     timeout=self.spec.ssh.connect_timeout + (2 if mounts else 0))
        probes = {}
        for node in nodes:
            outcome = results.results[node.name]
            record = records.get(node.name)
            if outcome.ok:
                if record is not None and record.unreachable_since is not None:
                    fleet.state.set_unreachable(node.name, None)
                    fleet.state.add_event("reachable", node.name, "answers SSH again")
                answered = outcome.stdout.strip()
                probes[node.name] = Probe(ssh=True, mounted=answered == "MOUNTED" if node.name in mounts else None)
                continue
            fleet.executor.drop(node.name)
            if record is not None and record.unreachable_since is None:
                fleet.state.set_unreachable(node.name, now)
            probes[node.name] = Probe(ssh=False)
        return probes

    # -- loop -----------------------------------------------------------------------------
    def run(self, *, until: Callable[[], bool] | None = None) -> None:
        """Reconcile every interval until `stop()` or `until()` says so."""
        while not self._stop.is_set() and not (until and until()):
            started = self.clock()
            try:
                self.reconcile_once()
            except Exception as error:  # noqa: BLE001 -- one bad pass must not end the watch
                self.fleet.state.add_event("monitor_error", None, f"{type(error).__name__}: {error}")
            remaining = self.spec.monitor.interval - (self.clock() - started)
            if remaining > 0:
                self._stop.wait(remaining) if self.sleep is time.sleep else self.sleep(remaining)

    def stop(self) -> None:
        """End the loop; a pass in progress gives up its waits (SSH readiness, cloud
        operations, commands) at once when the fleet handle is a session of its own."""
        self._stop.set()
