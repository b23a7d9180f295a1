"""`fleet ray status | submit | stop | dashboard`: the fleet's Ray cluster from the laptop.

Everything goes through an SSH tunnel to the head's loopback dashboard (nothing of Ray
is exposed to the internet) and speaks Ray's Jobs/state REST API with the standard
library (`fleet.worker.ray_jobs`): the laptop needs no Ray. `submit` uploads the working
directory as a GCS package, submits, streams the job's output and exits with its result
(0 when it SUCCEEDED, else the driver's exit code or 1); `--no-wait` prints the id.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import uuid
from pathlib import Path

from rich.table import Table

from fleet.cli_base import err, out
from fleet.cli_base import open_fleet as _open_fleet
from fleet.errors import UsageError
from fleet.textsafe import plain


def register(add) -> None:
    parent = add("ray", _no_subcommand, "the fleet's Ray cluster: status, submit, stop, dashboard")
    commands = parent.add_subparsers(dest="ray_command", required=True, parser_class=type(parent))

    def sub(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("-f", "--file", default=argparse.SUPPRESS, help="the fleet spec (default ./fleet.yaml)")
        parser.set_defaults(handler=handler)
        return parser

    status = sub("status", cmd_ray_status, "Ray's nodes, alive or dead, as fleet nodes, with their resources")
    status.add_argument("--json", action="store_true")
    submit = sub("submit", cmd_ray_submit, "submit a Ray job through the tunnel, stream its output, exit with its result")
    submit.add_argument("--working-dir", default=None, help="uploaded and made the job's working directory")
    submit.add_argument("--no-wait", action="store_true", help="print the job's id and return at once")
    submit.add_argument("--runtime-env-json", default=None, help="Ray's runtime_env as JSON")
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- python prog.py ARGS")
    stop = sub("stop", cmd_ray_stop, "stop a Ray job")
    stop.add_argument("submission_id")
    dashboard = sub("dashboard", cmd_ray_dashboard, "forward a local port to the head's Ray dashboard")
    dashboard.add_argument("--port", type=int, default=0, help="the local port (default: a free one)")


def _no_subcommand(args: argparse.Namespace) -> int:
    raise UsageError("fleet ray needs a command", hint="fleet ray status | submit | stop | dashboard")


def cmd_ray_status(args: argparse.Namespace) -> int:
    from fleet.ray.cluster import RayCluster

    with _open_fleet(args, quiet=True) as fleet:
        cluster = RayCluster(fleet)
        head = cluster.head()
        with cluster.api(head) as api:
            ray_nodes = cluster.nodes(api)
        alive_fleet = {n.name: n for n in fleet.alive()}
        joined = {n.fleet_node for n in ray_nodes if n.alive}
        missing = sorted(set(alive_fleet) - joined)
        if args.json:
            print(json.dumps({"fleet": fleet.spec.name, "nodes": [n.to_dict() for n in ray_nodes],
                              "not_joined": missing,
                              "alive": len([n for n in ray_nodes if n.alive]),
                              "dead": len([n for n in ray_nodes if not n.alive])}))
            return 0
        table = Table(title=f"Ray on fleet {fleet.spec.name}")
        for column in ("node", "role", "state", "ip", "CPU", "GPU", "memory GB", "node id"):
            table.add_column(column)
        for n in sorted(ray_nodes, key=lambda n: (not n.alive, not n.is_head, n.fleet_node or "")):
            row = n.to_dict()
            table.add_row(plain(n.fleet_node or "?"), "head" if n.is_head else "worker", n.state, n.ip,
                          f"{row['cpus']:g}", f"{row['gpus']:g}", f"{row['memory_gb']:g}", n.node_id[:12])
        out.print(table)
        if missing:
            err.print(f"not in Ray: {', '.join(missing)}", style="yellow", markup=False)
        return 0


def _entrypoint(words: list[str]) -> str:
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise UsageError("nothing to run", hint="fleet ray submit -- python prog.py ARGS")
    return shlex.join(words)


def cmd_ray_submit(args: argparse.Namespace) -> int:
    from fleet.ray.cluster import RayCluster
    from fleet.ray.package import zip_working_dir
    from fleet.worker.ray_jobs import exit_code

    entrypoint = _entrypoint(list(args.command))
    runtime_env = {}
    if args.runtime_env_json:
        try:
            runtime_env = json.loads(args.runtime_env_json)
        except ValueError as exc:
            raise UsageError(f"--runtime-env-json: not JSON: {exc}") from None
        if not isinstance(runtime_env, dict):
            raise UsageError("--runtime-env-json: expected a JSON object")
    package = zip_working_dir(Path(args.working_dir)) if args.working_dir else None
    with _open_fleet(args, quiet=True) as fleet:
        cluster = RayCluster(fleet)
        with cluster.api() as api:
            if package is not None:
                runtime_env["working_dir"] = api.upload_package(package)
            submission = api.submit(entrypoint, runtime_env=runtime_env,
                                    submission_id=f"fleet-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
            fleet.state.add_event("ray_job_submitted", None, f"{submission}: {entrypoint}")
            if args.no_wait:
                print(submission)
                return 0
            err.print(f"Ray job {submission} submitted; following its output (Ctrl-C stops following, "
                      f"`fleet ray stop {submission}` stops the job)", markup=False)

            def show(text: str) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            try:
                info = api.follow(submission, show)
            except KeyboardInterrupt:
                err.print(f"stopped following; Ray job {submission} goes on", markup=False)
                return 130
        code = exit_code(info)
        err.print(f"Ray job {submission} {info.get('status')}" + (f": {info.get('message')}" if code else ""),
                  style=None if code == 0 else "red", markup=False)
        return code


def cmd_ray_stop(args: argparse.Namespace) -> int:
    from fleet.ray.cluster import RayCluster

    with _open_fleet(args, quiet=True) as fleet, RayCluster(fleet).api() as api:
        stopped = api.stop(args.submission_id)
    out.print(f"Ray job {args.submission_id}: " + ("stopped" if stopped else "was not running"), markup=False)
    return 0


def cmd_ray_dashboard(args: argparse.Namespace) -> int:
    from fleet.ray.cluster import RayCluster

    with _open_fleet(args, quiet=True) as fleet:
        cluster = RayCluster(fleet)
        with cluster.api(local_port=args.port) as api:
            api.version(timeout=15)  # the head answers: the URL works
            out.print(f"Ray dashboard of fleet {fleet.spec.name}: {api.base_url}", markup=False)
            if cluster.token() is not None:
                out.print(f"its token (Ray asks for it): {cluster.token_path}", markup=False)
            err.print("forwarding through SSH until Ctrl-C", markup=False)
            sys.stdout.flush()
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
