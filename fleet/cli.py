"""The `fleet` command line: argument parsing, output, exit codes.

Exit codes: 0 success, 1 an operation failed, 2 invalid spec or usage. A `FleetError`
becomes a one-line message (no traceback); anything else is a bug and keeps its
traceback. Every command takes `-f/--file SPEC` (default ./fleet.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from rich.table import Table

from fleet import cli_jobs, cli_ray, cli_serve
from fleet.cli_base import err, out  # the consoles, shared with the command modules
from fleet.cli_base import open_fleet as _open_fleet
from fleet.cli_base import spec_path as _spec_path
from fleet.errors import FleetError, UsageError
from fleet.spec.loader import load_fleet_spec
from fleet.textsafe import labelled, plain


# -- commands ------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_fleet_spec(_spec_path(args))
    out.print(f"{args.file}: valid ({spec.provider} fleet {spec.name!r}, {spec.workers.count} worker(s))")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from fleet.spec.schema import fleet_json_schema, job_json_schema

    schema = job_json_schema() if args.job else fleet_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    with _open_fleet(args, quiet=args.json) as fleet:
        if args.dry_run:
            return _dry_run(fleet, args)
        started = time.monotonic()
        result = fleet.up()
        elapsed = time.monotonic() - started
        if args.json:
            print(json.dumps({"nodes": [n.name for n in result.nodes], "created": result.created,
                              "deleted": result.deleted, "failures": result.failures, "seconds": round(elapsed, 3)}))
        else:
            _print_nodes(fleet, result.nodes)
            for name, message in result.failures.items():
                err.print(labelled(name, message, label_style="red", separator=": "))
            err.print(f"up: {len(result.nodes)} node(s) ready, {len(result.created)} created, "
                      f"{len(result.failures)} failed, in {elapsed:.1f} s; ssh config: {fleet.paths.ssh_config}")
        return 0 if result.ok else 1


def _dry_run(fleet, args: argparse.Namespace) -> int:
    creates, removes = fleet.plan_requests(fleet.observe())
    plan = fleet.provider.plan(creates)
    total = sum(p.price_per_hour or 0.0 for p in plan)
    runtime = fleet.runtime.describe()
    if args.json:
        print(json.dumps({"create": [p.__dict__ for p in plan], "delete": [n.name for n in removes],
                          "price_per_hour": round(total, 4), "runtime": runtime}))
        return 0
    table = Table(title=f"fleet up --dry-run: {fleet.spec.name} ({fleet.spec.provider})")
    for column in ("node", "role", "zone", "machine", "accelerators", "spot", "$/hour", "price source"):
        table.add_column(column)
    for p in plan:
        table.add_row(p.name, p.role, p.zone or "-", p.machine or "-", p.accelerators or "-", "yes" if p.spot else "no",
                      f"{p.price_per_hour:.4f}" if p.price_per_hour is not None else "?", p.price_source or "-")
    out.print(table)
    if removes:
        out.print("would delete: " + ", ".join(n.name for n in removes))
    out.print(f"node runtime: {runtime}", markup=False)
    out.print(f"estimated cost: ${total:.4f}/hour (nothing was created)")
    return 0


def _print_nodes(fleet, nodes) -> None:
    mode = fleet.provider.isolation
    table = Table(title=f"fleet {fleet.spec.name} ({fleet.spec.provider}{', ' + mode + ' isolation' if mode else ''})")
    for column in ("node", "role", "state", "address", "zone", "spot", "gen"):
        table.add_column(column)
    for n in nodes:
        table.add_row(n.name, n.role.value, n.state.value, f"{n.address}:{n.port}" if n.address else "-",
                      n.zone or "-", "yes" if n.spot else "no", str(n.generation))
    out.print(table)


def cmd_status(args: argparse.Namespace) -> int:
    from fleet.model import NodeState

    with _open_fleet(args, quiet=True) as fleet:
        nodes = fleet.observe()
        running = [n for n in nodes if n.state == NodeState.RUNNING]
        if running and not args.no_probe:
            probe = fleet.executor.run([fleet.target(n) for n in running], "true", timeout=fleet.spec.ssh.connect_timeout)
            nodes = [
                n if n.state != NodeState.RUNNING or probe.results[n.name].ok
                else _with_state(n, NodeState.UNREACHABLE)
                for n in nodes
            ]
        if args.json:
            print(json.dumps({
                "name": fleet.spec.name, "provider": fleet.spec.provider, "isolation": fleet.provider.isolation,
                "nodes": [{"name": n.name, "role": n.role.value, "state": n.state.value, "address": n.address,
                           "port": n.port, "zone": n.zone, "spot": n.spot, "generation": n.generation} for n in nodes],
            }))
        else:
            _print_nodes(fleet, nodes)
        return 0


def _with_state(node, state):
    from dataclasses import replace

    return replace(node, state=state)


def cmd_exec(args: argparse.Namespace) -> int:
    command = " ".join(args.command)
    if not command.strip():
        raise UsageError("nothing to run", hint="fleet exec -- CMD")
    with _open_fleet(args, quiet=True, stream=not args.json) as fleet:
        nodes = fleet.select(fleet.observe(), args.nodes)
        if not nodes:
            raise UsageError(f"no running node matches --nodes {args.nodes}")
        results = fleet.exec(nodes, command, timeout=args.timeout, stream=not args.json)
        if args.json:
            print(json.dumps({"results": [
                {"node": r.node, "exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
                 "error": str(r.error) if r.error else None, "seconds": round(r.duration, 3)}
                for r in results.results.values()]}))
        else:
            for r in results.results.values():
                if not r.ok:
                    err.print(labelled(r.node, r.describe(), label_style="red", separator=": "))
            err.print(results.summary())
        return 0 if results.ok else 1


def cmd_ssh(args: argparse.Namespace) -> int:
    from fleet.ssh import interactive_ssh_argv

    with _open_fleet(args, quiet=True) as fleet:
        node = fleet.select(fleet.observe(), args.node)[0]
        command = list(args.command)
        if command and command[0] == "--":  # `fleet ssh NODE -- CMD`: the separator is ours
            command = command[1:]
        # Like ssh itself, the words of CMD are joined and run by the node's shell.
        argv = interactive_ssh_argv(
            fleet.target(node),
            fleet.paths.key,
            fleet.paths.known_hosts,
            [" ".join(command)] if command else (),
        )
    os.execvp(argv[0], argv)
    return 1  # not reached


def cmd_preempt(args: argparse.Namespace) -> int:
    with _open_fleet(args) as fleet:
        fleet.preempt(args.node, notice_s=args.notice)
        err.print(f"preempted {args.node}" + (f" after a {args.notice:g} s notice" if args.notice else ""))
        return 0


def cmd_down(args: argparse.Namespace) -> int:
    spec = load_fleet_spec(_spec_path(args))
    if not args.yes and sys.stdin.isatty():
        answer = input(f"delete every node of fleet {spec.name!r} ({spec.provider})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            err.print("nothing deleted")
            return 1
    with _open_fleet(args) as fleet:
        report = fleet.down(keep_data=args.keep_data)
        for item in report.deleted:
            out.print(f"deleted {item}")
        for item in report.kept:
            out.print(f"kept {item}")
        if report.kept:
            out.print("the next `fleet up` attaches it to the new head; `fleet down` without --keep-data deletes it"
                      + (f" (or by hand: {report.kept_hint})" if report.kept_hint else ""))
        for item in report.errors:
            err.print(labelled("error", item, label_style="red", separator=": "))
        left = ", nothing left" if not report.errors and not report.kept else ""
        out.print(f"down: {len(report.deleted)} resource(s) deleted" + left)
        return 0 if not report.errors else 1


def cmd_events(args: argparse.Namespace) -> int:
    with _open_fleet(args, quiet=True) as fleet:
        events = fleet.state.events(node=args.node)
        if args.json:
            print(json.dumps([e.to_dict() for e in events]))
            return 0
        table = Table(title=f"events of fleet {fleet.spec.name}")
        for column in ("time", "node", "event", "why"):
            table.add_column(column)
        for e in events:
            table.add_row(time.strftime("%H:%M:%S", time.localtime(e.t)), plain(e.node or "-"), plain(e.kind),
                          plain(e.detail))
        out.print(table)
        return 0


# -- parser --------------------------------------------------------------------------------
Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with a one-line message, like our other usage errors
        self.print_usage(sys.stderr)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fleet", description="Run batch jobs on fleets of preemptible/spot machines.")
    parser.add_argument("--version", action="version", version="fleet 0.1.0")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-f", "--file", default="fleet.yaml", help="the fleet spec (default ./fleet.yaml)")
        sub.set_defaults(handler=handler)
        return sub

    add("validate", cmd_validate, "check a fleet spec")
    sub = add("schema", cmd_schema, "print the JSON Schema of fleet.yaml (or of job.yaml with --job)")
    sub.add_argument("--job", action="store_true")
    sub = add("up", cmd_up, "create the missing nodes, set them up, mount the shared directory")
    sub.add_argument("--dry-run", action="store_true", help="show the plan and its cost; create nothing")
    sub.add_argument("--json", action="store_true")
    sub = add("status", cmd_status, "show the fleet's nodes")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--no-probe", action="store_true", help="do not check SSH reachability")
    sub = add("exec", cmd_exec, "run a command on nodes in parallel")
    sub.add_argument("--nodes", default="all", help="all, head, workers, or NAME,NAME...")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--timeout", type=float, default=None)
    sub.add_argument("command", nargs=argparse.REMAINDER)
    sub = add("ssh", cmd_ssh, "open a shell on a node")
    sub.add_argument("node")
    sub.add_argument("command", nargs=argparse.REMAINDER)
    sub = add("preempt", cmd_preempt, "simulate a preemption of a node")
    sub.add_argument("node")
    sub.add_argument("--notice", type=float, default=0.0, nargs="?", const=5.0,
                     help="send the preemption notice this many seconds before the kill (default 5)")
    sub = add("down", cmd_down, "delete everything the fleet owns")
    sub.add_argument("--yes", "-y", action="store_true")
    sub.add_argument("--keep-data", action="store_true",
                     help="keep the head's data disk (the shared directory) for a later `fleet up`")
    sub = add("events", cmd_events, "what the fleet did and why")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--node", default=None)
    _add_job_commands(add)
    return parser


def _add_job_commands(add: Callable[[str, Handler, str], argparse.ArgumentParser]) -> None:
    cli_jobs.register(add)
    cli_serve.register(add)
    cli_ray.register(add)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "exec" and "--" in argv:
        # Everything after `--` is the remote command, verbatim.
        split = argv.index("--")
        argv = argv[:split] + argv[split + 1:]
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except FleetError as error:
        err.print(plain(f"error: {error}", style="red"), soft_wrap=True)
        return error.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except BrokenPipeError:  # `fleet ... | head`: the reader left, nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
