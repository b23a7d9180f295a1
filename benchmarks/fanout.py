"""fanout: `true` on 32 local nodes (real sshd), our executor next to its peers.

Measured in one run, each figure the median of several rounds (rounds interleave the
contenders so that machine noise hits them alike):
  cold_s      a new `Executor` (new connections) runs `true` on every node
  warm_s      the same Executor runs it again (connections already open)
  asyncssh_s  asyncssh: connect + run on every node with asyncio.gather
  openssh_s   the OpenSSH client, one process per node started in parallel, through the
              fleet's ssh_config (same key, same pinned host keys)
Goals (issue 2): cold <= 1.1x the fastest peer; warm <= 0.5x our cold.
Every node this benchmark starts is destroyed before it exits, also on failure.

    .venv/bin/python benchmarks/fanout.py [--nodes 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fleet.providers.localnode import LocalNode, generate_ed25519_keypair
from fleet.ssh import Executor, HostKeyStore, Target, write_ssh_config


def start_nodes(root: Path, count: int, public_key: str, nodes: list[LocalNode]) -> None:
    def create(index: int) -> LocalNode:
        return LocalNode.create(
            root / "nodes", name=f"fan-n{index:02d}", fleet="fanout", authorized_keys=[public_key]
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(create, index) for index in range(count)]
        errors = []
        for future in futures:
            try:
                nodes.append(future.result())
            except Exception as exc:  # noqa: BLE001 - keep the nodes that did start, to destroy them
                errors.append(exc)
    if errors:
        raise errors[0]


def ours(key: Path, store: HostKeyStore, targets: list[Target], parallelism: int) -> tuple[float, float]:
    started = time.perf_counter()
    executor = Executor(key, store, parallelism=parallelism)
    try:
        cold = executor.run(targets, "true")
        cold_s = time.perf_counter() - started
        assert cold.ok, cold.summary()
        started = time.perf_counter()
        warm = executor.run(targets, "true")
        warm_s = time.perf_counter() - started
        assert warm.ok, warm.summary()
    finally:
        executor.close()
    return cold_s, warm_s


def with_asyncssh(key: Path, nodes: list[LocalNode]) -> float:
    import asyncssh

    async def one(node: LocalNode) -> asyncssh.SSHClientConnection:
        known = ([asyncssh.import_public_key(node.host_key_line)], [], [])
        conn = await asyncssh.connect(
            node.address,
            node.port,
            username=node.user,
            client_keys=[str(key)],
            known_hosts=known,
            agent_path=None,
            config=[],
        )
        result = await conn.run("true", check=True)
        assert result.exit_status == 0
        return conn

    async def main() -> float:
        started = time.perf_counter()
        conns = await asyncio.gather(*(one(node) for node in nodes))
        elapsed = time.perf_counter() - started
        for conn in conns:
            conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn in conns))
        return elapsed

    return asyncio.run(main())


def with_openssh(config: Path, nodes: list[LocalNode]) -> float:
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["ssh", "-F", str(config), "-o", "BatchMode=yes", node.name, "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for node in nodes
    ]
    failures = []
    for node, proc in zip(nodes, procs):
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failures.append(f"{node.name}: {err.decode(errors='replace').strip()}")
    elapsed = time.perf_counter() - started
    assert not failures, failures
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not shutil.which("ssh"):
        sys.exit("the OpenSSH client (ssh) is needed: apt-get install openssh-client")

    # A SIGTERM (e.g. a timeout) still runs the `finally` that destroys the nodes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="fleet-fanout-"))
    nodes: list[LocalNode] = []
    try:
        key = root / "fleet_key"
        public = generate_ed25519_keypair(key, "fanout-bench")
        print(f"starting {args.nodes} local sshd nodes...", flush=True)
        start_nodes(root, args.nodes, public, nodes)
        store = HostKeyStore(root / "known_hosts")
        for node in nodes:
            store.pin(node.name, node.host_key_line)
        targets = [Target(n.name, n.address, n.port, n.user) for n in nodes]
        config = write_ssh_config(root / "ssh_config", "fanout", targets, key, store.path)

        # One untimed pass of each warms the page cache and sshd's first-fork paths.
        ours(key, store, targets, args.nodes)
        with_asyncssh(key, nodes)
        with_openssh(config, nodes)

        figures: dict[str, list[float]] = {"cold": [], "warm": [], "asyncssh": [], "openssh": []}
        contenders = ["ours", "asyncssh", "openssh"]
        for round_index in range(args.rounds):
            order = contenders[round_index % 3 :] + contenders[: round_index % 3]
            for name in order:
                if name == "ours":
                    cold, warm = ours(key, store, targets, args.nodes)
                    figures["cold"].append(cold)
                    figures["warm"].append(warm)
                elif name == "asyncssh":
                    figures["asyncssh"].append(with_asyncssh(key, nodes))
                else:
                    figures["openssh"].append(with_openssh(config, nodes))
                time.sleep(0.3)  # let the previous contender's sshd children exit
            print(
                f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in figures.items()),
                flush=True,
            )
        median = {name: statistics.median(values) for name, values in figures.items()}
        best_peer = min(median["asyncssh"], median["openssh"])
        result = {
            "nodes": args.nodes,
            "rounds": args.rounds,
            "cold_s": round(median["cold"], 4),
            "warm_s": round(median["warm"], 4),
            "asyncssh_s": round(median["asyncssh"], 4),
            "openssh_s": round(median["openssh"], 4),
            "cold_ratio_to_best_peer": round(median["cold"] / best_peer, 3),
            "warm_ratio_to_cold": round(median["warm"] / median["cold"], 3),
        }
    finally:
        for node in nodes:
            node.destroy()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
