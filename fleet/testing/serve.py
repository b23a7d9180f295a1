"""Running a fake cloud API from the command line (`python -m fleet.testing.fake_gce`,
`... fake_ec2`): the options they share and serving until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import signal
import threading
from pathlib import Path
from typing import Any, Protocol


class Fake(Protocol):
    endpoint: str

    def start(self) -> object: ...

    def stop(self) -> None: ...


def parser_for(module: str, description: str, *, address_base: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--port", type=int, required=True, help="HTTP port of the fake API (0: any)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to serve on")
    parser.add_argument("--nodes-root", type=Path, help="where backing nodes live (default: a temp dir)")
    parser.add_argument("--ssh-port", type=int, default=22, help="SSH port of every backing node")
    parser.add_argument("--address-base", default=address_base, help="first loopback address of the nodes")
    parser.add_argument("--no-backing", action="store_true", help="no sshd behind the instances")
    parser.add_argument("--isolation", choices=("loopback", "namespaces", "auto"), default="loopback",
                        help="backing nodes on loopback, or isolated nodes with the firewall enforced (root)")
    parser.add_argument("--caller-address", default="127.0.0.1",
                        help="the public address the fake pretends the caller has (isolated backing)")
    return parser


def parse_loopback_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if not (ipaddress.ip_address(args.host).is_loopback and ipaddress.ip_address(args.address_base).is_loopback):
        parser.error("the fake serves on loopback addresses only")
    return args


def backing_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fake's constructor arguments that `parser_for` options give."""
    return {
        "nodes_root": args.nodes_root,
        "ssh_port": args.ssh_port,
        "address_base": args.address_base,
        "backing": not args.no_backing,
        "isolation": args.isolation,
        "caller_address": args.caller_address,
        "host": args.host,
        "port": args.port,
    }


def serve_until_signalled(fake: Fake, label: str) -> int:
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    fake.start()
    print(f"{label} serving on {fake.endpoint}", flush=True)
    try:
        stopping.wait()
    finally:
        with contextlib.suppress(Exception):
            fake.stop()
    return 0
