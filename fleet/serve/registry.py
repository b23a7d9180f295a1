"""Reading the servers' registry of a serving from the head.

Each model process of `fleet.worker.serve` publishes `jobs/<name>/servers/<node>.<proc>.json`
once its model is loaded (`state` "ready", then "draining" on SIGTERM) and removes it when
it ends. One SSH command on the head reads them all; a node that died without removing
its files is filtered out by the caller against the provider's list of running nodes.
"""

from __future__ import annotations

import json
from typing import Any

from fleet.errors import JobError
from fleet.jobs import JobRunner
from fleet.model import Node


def read_registry(runner: JobRunner, head: Node) -> list[dict[str, Any]]:
    """Every record the head's shared dir holds for the serving (unparsable ones skipped)."""
    fleet = runner.fleet
    script = (f"cd {runner.job_dir_for(head)}/servers 2>/dev/null || exit 0; "
              "for f in *.json; do [ -f \"$f\" ] && cat \"$f\" && echo; done; true")
    result = fleet.exec([head], script, timeout=max(5.0, fleet.spec.ssh.connect_timeout)).results[head.name]
    if not result.ok:
        raise JobError(f"cannot read the servers' registry on the head: {result.describe()}")
    records = []
    for line in result.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a file being replaced
        if isinstance(record, dict):
            records.append(record)
    return records


def ready_nodes(records: list[dict[str, Any]]) -> set[str]:
    """Nodes whose every model process (`of` of them) is loaded and not draining."""
    procs: dict[str, set[int]] = {}
    wanted: dict[str, int] = {}
    for record in records:
        try:
            node, proc, of = str(record["node"]), int(record["proc"]), int(record.get("of", 1))
        except (KeyError, TypeError, ValueError):
            continue
        if record.get("state") == "ready":
            procs.setdefault(node, set()).add(proc)
            wanted[node] = of
    return {node for node, seen in procs.items() if len(seen) >= wanted[node]}
