"""Writes the recorded metric files of tests/report/data/ (GPU cases: there is no GPU
on the machines that run the tests). Deterministic (seeded); rerun it to regenerate:

    .venv/bin/python tests/report/make_data.py

Each scenario directory is a job directory (metrics/, done/, chunks.json) plus
events.json (the fleet's events) and prices.json (USD/hour per node). The figures are
shaped like what the sampler and the worker write on real nodes: an A100 node running
text-embed at batch 256 sits at 90-97% GPU utilisation, a node reading over one sshfs
connection waits for input with ~80 MB/s coming in, and so on.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
T0 = 1_760_000_000.0  # 2025-10-09, a fixed clock for every scenario


def _clip(value: float, low: float = 0.0, high: float = 100.0) -> float:
    return round(min(high, max(low, value)), 1)


class NodeSim:
    """Writes one node's sampler lines and one worker file per process."""

    def __init__(
        self,
        job: Path,
        name: str,
        rng: random.Random,
        ngpu: int,
        ncpu: int = 16,
        gpu_mem_total_mb: float = 40960.0,
    ) -> None:
        self.job = job
        self.name = name
        self.rng = rng
        self.ngpu = ngpu
        self.ncpu = ncpu
        self.gpu_mem_total_mb = gpu_mem_total_mb
        (job / "metrics").mkdir(parents=True, exist_ok=True)
        self.samples: list[dict[str, Any]] = []
        self.workers: dict[int, list[dict[str, Any]]] = {}

    def info(self, t: float) -> None:
        record: dict[str, Any] = {
            "t": t,
            "kind": "info",
            "node": self.name,
            "gpu": self.ngpu > 0,
            "gpus": [
                {"index": i, "name": "NVIDIA A100-SXM4-40GB", "mem_total_mb": self.gpu_mem_total_mb}
                for i in range(self.ngpu)
            ],
            "ncpu": self.ncpu,
            "mem_total_mb": 85000.0,
            "disks": ["nvme0n1"],
            "nics": ["ens4"],
            "interval": 1.0,
            "pid": 4242,
        }
        if not self.ngpu:
            record["reason"] = "NVML unavailable: NVML Shared Library Not Found"
        self.samples.append(record)

    def sample(
        self,
        t: float,
        cpu: float,
        iowait: float,
        disk_busy: float,
        disk_read_mb: float,
        net_rx_mb: float,
        gpu_util: list[float],
        gpu_mem_pct: list[float],
    ) -> None:
        r = self.rng
        cpu_now = _clip(cpu + r.gauss(0, 3))
        user = _clip(cpu_now * 0.8)
        system = _clip(cpu_now - user)
        io = _clip(iowait + r.gauss(0, 1))
        self.samples.append(
            {
                "t": round(t, 3),
                "kind": "sample",
                "node": self.name,
                "cpu": {
                    "user": user,
                    "system": system,
                    "iowait": io,
                    "idle": _clip(100 - user - system - io),
                    "steal": 0.0,
                    "ncpu": self.ncpu,
                },
                "mem": {"used_pct": 31.5, "used_mb": 26000.0},
                "disks": {
                    "nvme0n1": {
                        "read_bps": max(0.0, round(disk_read_mb * 1e6 * (1 + r.gauss(0, 0.05)), 1)),
                        "write_bps": 2.0e5,
                        "busy_pct": _clip(disk_busy + r.gauss(0, 2)),
                    }
                },
                "net": {
                    "rx_bps": max(0.0, round(net_rx_mb * 1e6 * (1 + r.gauss(0, 0.05)), 1)),
                    "tx_bps": round(net_rx_mb * 2e4, 1),
                    "lo_rx_bps": 0.0,
                    "lo_tx_bps": 0.0,
                },
                "gpus": [
                    {
                        "index": i,
                        "util": _clip(u + r.gauss(0, 2)) if u > 0 else 0.0,
                        "mem_util": _clip(u * 0.6),
                        "mem_used_mb": round(self.gpu_mem_total_mb * m / 100.0, 1),
                        "power_w": round(60 + 3.3 * u, 1),
                    }
                    for i, (u, m) in enumerate(zip(gpu_util, gpu_mem_pct))
                ],
            }
        )

    def worker(
        self,
        proc: int,
        t_start: float,
        t_end: float,
        batch_items: int,
        wait_s: float,
        compute_s: float,
        device: str,
        read_s: float | None = None,
        write_s: float = 0.01,
        stop: bool = True,
    ) -> int:
        r = self.rng
        lines: list[dict[str, Any]] = [
            {
                "t": t_start,
                "kind": "start",
                "node": self.name,
                "proc": proc,
                "device": device,
                "pid": 5000 + proc,
            }
        ]
        t = t_start + 2.0  # model load
        items = 0
        while True:
            wait = max(0.0, wait_s * (1 + r.gauss(0, 0.1)))
            compute = max(0.001, compute_s * (1 + r.gauss(0, 0.05)))
            if t + wait + compute > t_end:
                break
            t += wait + compute
            items += batch_items
            lines.append(
                {
                    "t": round(t, 3),
                    "kind": "batch",
                    "node": self.name,
                    "proc": proc,
                    "device": device,
                    "items": batch_items,
                    "read_s": round(read_s if read_s is not None else wait + 0.01, 4),
                    "wait_s": round(wait, 4),
                    "compute_s": round(compute, 4),
                    "write_s": write_s,
                }
            )
        if stop:
            lines.append(
                {
                    "t": round(t_end, 3),
                    "kind": "stop",
                    "node": self.name,
                    "proc": proc,
                    "items": items,
                    "items_s": round(items / (t_end - t_start), 2),
                    "failed": 0,
                }
            )
        self.workers[proc] = lines
        return items

    def write(self, truncate_tail: bool = False) -> None:
        path = self.job / "metrics" / f"{self.name}.jsonl"
        text = "".join(json.dumps(s, separators=(",", ":")) + "\n" for s in self.samples)
        if truncate_tail:
            text = text + json.dumps(self.samples[-1], separators=(",", ":"))[:57]
        path.write_text(text)
        for proc, lines in self.workers.items():
            (self.job / "metrics" / f"{self.name}.worker{proc}.jsonl").write_text(
                "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
            )


def _done(job: Path, chunks: list[tuple[str, int, str]]) -> None:
    (job / "done").mkdir(parents=True, exist_ok=True)
    for chunk, items, node in chunks:
        (job / "done" / chunk).write_text(
            json.dumps({"items": items, "failed": 0, "node": node, "seconds": 20.0})
        )


def _chunks(job: Path, count: int, size: int) -> list[str]:
    ids = [f"c{i:05d}" for i in range(count)]
    (job / "chunks.json").write_text(
        json.dumps({"chunk_size": size, "chunks": [{"id": c, "items": size} for c in ids]})
    )
    return ids


def _events(base: Path, events: list[tuple[float, str, str, str]], prices: dict[str, float]) -> None:
    (base / "events.json").write_text(
        json.dumps(
            [{"t": T0 + t, "node": node, "kind": kind, "detail": detail} for t, node, kind, detail in events],
            indent=0,
        )
    )
    (base / "prices.json").write_text(json.dumps(prices))


def _boot(name: str, at: float = -140.0) -> list[tuple[float, str, str, str]]:
    return [
        (at, name, "requested", "spot"),
        (at + 35, name, "running", ""),
        (at + 70, name, "ssh_ready", ""),
        (at + 110, name, "setup_done", ""),
        (at + 118, name, "mounted", ""),
        (at + 120, name, "working", ""),
    ]


def gpu_bound() -> None:
    """One A100 node: 94% GPU, 75% GPU memory, input wait ~2% of step time."""
    job = DATA / "gpu_bound"
    rng = random.Random(1)
    node = NodeSim(job, "emb-w1-g1", rng, ngpu=1)
    node.info(T0 - 1)
    for i in range(120):
        node.sample(
            T0 + i,
            cpu=22,
            iowait=0.5,
            disk_busy=4,
            disk_read_mb=3,
            net_rx_mb=0.2,
            gpu_util=[94],
            gpu_mem_pct=[75],
        )
    items = node.worker(0, T0, T0 + 119, batch_items=1024, wait_s=0.016, compute_s=0.84, device="cuda:0")
    node.write()
    ids = _chunks(job, items // 10240, 10240)
    _done(job, [(c, 10240, node.name) for c in ids])
    _events(job, _boot(node.name), {node.name: 1.10})


def multi_gpu() -> None:
    """A 4-GPU node running ONE worker process (GPUs 2 and 3 idle) next to an 8-GPU node
    running one process per GPU: both gpu-bound, the first with the advice to use them all."""
    job = DATA / "multi_gpu"
    rng = random.Random(2)
    half = NodeSim(job, "mg-w1-g1", rng, ngpu=4)
    full = NodeSim(job, "mg-w2-g1", rng, ngpu=8)
    half.info(T0 - 1)
    full.info(T0 - 1)
    for i in range(90):
        half.sample(
            T0 + i,
            cpu=30,
            iowait=0.3,
            disk_busy=6,
            disk_read_mb=4,
            net_rx_mb=0.3,
            gpu_util=[93, 91, 0, 0],
            gpu_mem_pct=[70, 70, 1, 1],
        )
        full.sample(
            T0 + i,
            cpu=55,
            iowait=0.5,
            disk_busy=12,
            disk_read_mb=14,
            net_rx_mb=0.3,
            gpu_util=[90, 92, 88, 91, 89, 93, 90, 87],
            gpu_mem_pct=[72] * 8,
        )
    half_items = half.worker(0, T0, T0 + 89, batch_items=2048, wait_s=0.012, compute_s=0.8, device="cuda:0")
    full_items = sum(
        full.worker(proc, T0, T0 + 89, batch_items=1024, wait_s=0.016, compute_s=0.8, device=f"cuda:{proc}")
        for proc in range(8)
    )
    half.write()
    full.write()
    ids = _chunks(job, half_items // 32768 + full_items // 32768, 32768)
    _done(job, [(c, 32768, half.name if i < half_items // 32768 else full.name) for i, c in enumerate(ids)])
    _events(job, _boot(half.name) + _boot(full.name), {half.name: 4.4, full.name: 8.8})


def mixed_fleet() -> None:
    """Five nodes with five different bottlenecks, one preempted mid-run (its samples
    stop, its worker has no stop line, its last chunk was redone elsewhere)."""
    job = DATA / "mixed"
    rng = random.Random(3)
    duration = 150
    gpu = NodeSim(job, "mix-w1-g1", rng, ngpu=1)
    net = NodeSim(job, "mix-w2-g1", rng, ngpu=1)
    disk = NodeSim(job, "mix-w3-g1", rng, ngpu=1)
    cpu = NodeSim(job, "mix-w4-g1", rng, ngpu=1, ncpu=4)
    lost = NodeSim(job, "mix-w5-g1", rng, ngpu=1)
    idle = NodeSim(job, "mix-w6-g1", rng, ngpu=1)
    for node in (gpu, net, disk, cpu, lost, idle):
        node.info(T0 - 1)
    preempt_at = 80
    for i in range(duration):
        t = T0 + i
        gpu.sample(
            t, cpu=20, iowait=0.4, disk_busy=5, disk_read_mb=3, net_rx_mb=2, gpu_util=[95], gpu_mem_pct=[80]
        )
        net.sample(
            t,
            cpu=14,
            iowait=0.2,
            disk_busy=3,
            disk_read_mb=0.2,
            net_rx_mb=82,
            gpu_util=[41],
            gpu_mem_pct=[78],
        )
        disk.sample(
            t,
            cpu=12,
            iowait=16,
            disk_busy=97,
            disk_read_mb=160,
            net_rx_mb=0.2,
            gpu_util=[52],
            gpu_mem_pct=[78],
        )
        cpu.sample(
            t, cpu=96, iowait=0.2, disk_busy=5, disk_read_mb=3, net_rx_mb=1.5, gpu_util=[31], gpu_mem_pct=[60]
        )
        idle.sample(
            t,
            cpu=1,
            iowait=0.0,
            disk_busy=0.3,
            disk_read_mb=0.0,
            net_rx_mb=0.01,
            gpu_util=[0],
            gpu_mem_pct=[1],
        )
        if i < preempt_at:
            lost.sample(
                t,
                cpu=21,
                iowait=0.4,
                disk_busy=5,
                disk_read_mb=3,
                net_rx_mb=2,
                gpu_util=[93],
                gpu_mem_pct=[80],
            )
    end = T0 + duration - 1
    done: list[tuple[str, int, str]] = []
    counter = 0

    def credit(node: NodeSim, items: int) -> None:
        nonlocal counter
        for _ in range(items // 10240):
            done.append((f"c{counter:05d}", 10240, node.name))
            counter += 1

    credit(gpu, gpu.worker(0, T0, end, 1024, wait_s=0.02, compute_s=0.8, device="cuda:0"))
    credit(net, net.worker(0, T0, end, 1024, wait_s=1.24, compute_s=0.8, device="cuda:0", read_s=4.8))
    credit(disk, disk.worker(0, T0, end, 1024, wait_s=0.72, compute_s=0.8, device="cuda:0", read_s=3.6))
    credit(cpu, cpu.worker(0, T0, end, 1024, wait_s=0.04, compute_s=2.0, device="cuda:0"))
    lost_items = lost.worker(
        0, T0, T0 + preempt_at - 0.5, 1024, wait_s=0.02, compute_s=0.8, device="cuda:0", stop=False
    )
    credit(lost, lost_items)  # the chunk in hand when preempted (the remainder) was redone
    for node in (gpu, net, disk, cpu, idle):
        node.write()
    lost.write(truncate_tail=True)
    total_chunks = counter + 1
    _chunks(job, total_chunks, 10240)
    _done(job, done + [(f"c{counter:05d}", 10240, gpu.name)])  # the redone chunk, finished by w1
    events = []
    for node in (gpu, net, disk, cpu, lost, idle):
        events += _boot(node.name)
    events += [
        (preempt_at, lost.name, "preempted", "GCE preempted the instance"),
        (preempt_at + 20, "mix-w5-g2", "requested", "replacement for mix-w5-g1"),
        (preempt_at + 21, lost.name, "replaced", "by mix-w5-g2"),
        (preempt_at + 22, lost.name, "deleted", ""),
        (-150, "mix-head", "requested", "on-demand"),
        (-110, "mix-head", "ssh_ready", ""),
        (-100, "mix-head", "setup_done", ""),
    ]
    prices = {n.name: 1.1 for n in (gpu, net, disk, cpu, lost, idle)}
    prices["mix-head"] = 0.2
    _events(job, events, prices)


def running() -> None:
    """A job still running: 2 nodes sampling, 3 of 10 chunks done, no stop lines."""
    job = DATA / "running"
    rng = random.Random(4)
    nodes = [NodeSim(job, f"run-w{i}-g1", rng, ngpu=1) for i in (1, 2)]
    for node in nodes:
        node.info(T0 - 1)
        for i in range(60):
            node.sample(
                T0 + i,
                cpu=25,
                iowait=0.3,
                disk_busy=6,
                disk_read_mb=3,
                net_rx_mb=1,
                gpu_util=[88],
                gpu_mem_pct=[60],
            )
        node.worker(0, T0, T0 + 59.5, 1024, wait_s=0.024, compute_s=0.8, device="cuda:0", stop=False)
        node.write()
    ids = _chunks(job, 10, 1000)
    _done(job, [(c, 1000, nodes[i % 2].name) for i, c in enumerate(ids[:3])])
    _events(job, _boot(nodes[0].name) + _boot(nodes[1].name), {})


def main() -> None:
    if DATA.exists():
        shutil.rmtree(DATA)
    for scenario in (gpu_bound, multi_gpu, mixed_fleet, running):
        scenario()
    print(f"wrote {sorted(p.name for p in DATA.iterdir())}")


if __name__ == "__main__":
    main()
