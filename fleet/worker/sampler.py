"""The node sampler: one JSON line per tick of what this node's CPU, memory, disks,
network and GPUs did, appended to `JOB_DIR/metrics/<node>.jsonl`.

    python -m fleet.worker.sampler --out JOB_DIR/metrics/NODE.jsonl [--interval 1]
                                   [--node NAME] [--pid PID]

It runs until SIGTERM/SIGINT (then it flushes and exits 0) or until the process `--pid`
exits. It must cost well under 1% of one core at 1 Hz, so each tick reads /proc once
through psutil (no subprocesses), keeps the output open and appends one line, and it
imports only psutil, the stdlib and (lazily, optionally) NVML through nvidia-ml-py.

Lines (one JSON object each; the report reads them, see docs/report.md):

- `{"kind": "info", "t", "node", "gpu": bool, "reason"?, "gpus": [...], "ncpu",
  "mem_total_mb", "disks": [...], "nics": [...], "interval", "pid"}`: written once at
  every start, before any sample.
- `{"kind": "sample", "t", "node", "cpu": {"user", "system", "iowait", "idle", "steal",
  "ncpu"}, "mem": {"used_pct", "used_mb"}, "disks": {name: {"read_bps", "write_bps",
  "busy_pct"}}, "net": {"rx_bps", "tx_bps", "lo_rx_bps", "lo_tx_bps"}, "gpus": [{"index",
  "util", "mem_util", "mem_used_mb", "power_w", "sm_active"?, "tensor_active"?}], "proc"?: {"pid", "n", "cpu_pct",
  "rss_mb", "read_bps", "write_bps", "runq_pct"}}`. CPU figures are percent of all
  cores (user includes nice, system includes irq and softirq); `proc` is the watched process and its descendants (cpu_pct in percent
  of ONE core, so 250 means two and a half cores busy; runq_pct, likewise, the time its
  threads were runnable but waited for a CPU; read/write_bps count every byte read or
  written through system calls, files on sshfs and pipes included).

GPUs are listed in NVML's (PCI bus) order, with their UUID (`info`: "uuid", "mig": the
MIG slices' UUIDs, "gpm": whether GPM metrics are read). `util` is NVML's "a kernel
was running" share, read once per tick; `sm_active` (share of SMs busy) and
`tensor_active` (share of time the tensor cores worked), percent, come from NVML's GPM
counters on GPUs that have them (Hopper and later) and say how busy the GPU really is.

Disks are whole physical devices only: loop, ram, zram, optical and floppy devices,
partitions and stacked devices (device-mapper, md) are left out so that no byte is
counted twice. Network rates leave out the loopback interface (kept apart as `lo_*`:
a local test fleet's sshfs traffic goes there) and virtual bridge/veth interfaces.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import psutil

MIB = 1024 * 1024
# Walking /proc for descendants is the costly part (~3 ms per 100 processes): done at
# start, 1, 2, 4 and 8 s later (when a job spawns its processes), then every 10 s, and
# whenever a known member exits.
CHILDREN_REFRESH_S = (0.0, 1.0, 2.0, 4.0, 8.0)
CHILDREN_REFRESH_EVERY_S = 10.0
_SKIP_DISK = re.compile(r"^(loop|ram|zram|sr|fd|dm-|md|nbd)\d*")
_PARTITION = re.compile(r"^((sd|vd|xvd|hd)[a-z]+\d+|(nvme\d+n\d+|mmcblk\d+)p\d+)$")
_VIRTUAL_NIC = re.compile(r"^(lo|veth|docker|br-|virbr|cni|flannel|cali|tunl|ifb|dummy)")


def is_whole_physical_disk(name: str, sys_block: Path = Path("/sys/block")) -> bool:
    """True for a disk whose counters are not already part of another one's."""
    if _SKIP_DISK.match(name):
        return False
    entry = sys_block / name.replace("/", "!")
    if sys_block.is_dir():
        # /sys/block lists whole disks only (no partitions); physical ones have `device`.
        return entry.exists() and (entry / "device").exists()
    return not _PARTITION.match(name)


class GpmCounters:
    """NVML's GPU performance monitoring (Hopper and later) for one GPU: SM activity and
    tensor-core activity between two ticks, which say how busy the GPU really is (NVML's
    classic utilisation only says a kernel was running). None where unsupported."""

    METRICS = (("sm_active", "NVML_GPM_METRIC_SM_UTIL"), ("tensor_active", "NVML_GPM_METRIC_ANY_TENSOR_UTIL"))

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml = nvml
        self.handle = handle
        self._samples = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
        self._have_previous = False
        self.read()  # the first sample: rates need two

    @classmethod
    def open(cls, nvml: Any, handle: Any) -> GpmCounters | None:
        try:
            if not nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                return None
            return cls(nvml, handle)
        except Exception:  # noqa: BLE001 - an old driver or GPU, a MIG slice: no GPM
            return None

    def read(self) -> dict[str, float | None]:
        nvml = self.nvml
        previous, current = self._samples
        nvml.nvmlGpmSampleGet(self.handle, current)
        self._samples = [current, previous]
        if not self._have_previous:
            self._have_previous = True
            return {}
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(self.METRICS)
        request.sample1 = previous
        request.sample2 = current
        for slot, (_name, metric) in enumerate(self.METRICS):
            request.metrics[slot].metricId = getattr(nvml, metric)
        nvml.nvmlGpmMetricsGet(request)
        values: dict[str, float | None] = {}
        for slot, (name, _metric) in enumerate(self.METRICS):
            entry = request.metrics[slot]
            ok = getattr(entry, "nvmlReturn", 0) == 0
            values[name] = round(float(entry.value), 1) if ok else None
        return values

    def close(self) -> None:
        for sample in self._samples:
            try:
                self.nvml.nvmlGpmSampleFree(sample)
            except Exception:  # noqa: BLE001, S110 - exiting anyway
                pass


class GpuProbe:
    """NVML, when this node has it; otherwise records why not. Never raises. Each tick
    reads utilisation once (one NVML query gives the GPU and memory figures), memory,
    power and, where the GPU has them, the GPM metrics."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.names: list[str] = []
        self.uuids: list[str] = []
        self.mig: list[list[str]] = []  # MIG slice UUIDs per GPU ([] when MIG is off)
        self.mem_total_mb: list[float] = []
        self.gpm: list[GpmCounters | None] = []
        self.reason: str | None = None
        self._nvml: Any = None
        try:
            import pynvml  # nvidia-ml-py; optional on CPU-only nodes
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            self.reason = f"NVML unavailable: {exc}"
            return
        self._nvml = pynvml
        try:
            from fleet.worker.gpus import nvml_gpus

            for gpu in nvml_gpus(pynvml):
                handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
                name = pynvml.nvmlDeviceGetName(handle)
                self.handles.append(handle)
                self.names.append(name.decode() if isinstance(name, bytes) else str(name))
                self.uuids.append(gpu.uuid)
                self.mig.append(gpu.slices)
                self.mem_total_mb.append(pynvml.nvmlDeviceGetMemoryInfo(handle).total / MIB)
        except Exception as exc:  # noqa: BLE001 - any NVML failure: record it, sample the rest
            self.reason = f"NVML error while listing GPUs: {exc}"
            self.handles = []
        if not self.handles and self.reason is None:
            self.reason = "NVML reports no GPU"
        self.gpm = [GpmCounters.open(pynvml, handle) for handle in self.handles]

    def read(self) -> list[dict[str, Any]]:
        nvml = self._nvml
        gpus: list[dict[str, Any]] = []
        for index, handle in enumerate(self.handles):
            rates = self._call(lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h))
            gpu = {
                "index": index,
                "util": getattr(rates, "gpu", None),
                "mem_util": getattr(rates, "memory", None),
                "mem_used_mb": self._call(
                    lambda h=handle: round(nvml.nvmlDeviceGetMemoryInfo(h).used / MIB, 1)
                ),
                "power_w": self._call(lambda h=handle: round(nvml.nvmlDeviceGetPowerUsage(h) / 1000.0, 1)),
            }
            counters = self.gpm[index] if index < len(self.gpm) else None
            if counters is not None:
                gpu.update(self._call(counters.read) or {})
            gpus.append(gpu)
        return gpus

    @staticmethod
    def _call(read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception:  # noqa: BLE001 - NVMLError_NotSupported (power on some boards), a GPU fallen off
            return None

    def close(self) -> None:
        for counters in self.gpm:
            if counters is not None:
                counters.close()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001, S110 - exiting anyway; nothing to tell anyone
                pass


def _run_queue_wait_ns(pid: int) -> int:
    """Nanoseconds the threads of `pid` spent runnable but waiting for a CPU
    (/proc/PID/task/TID/schedstat, second field; 0 where the kernel lacks it). CPU time
    plus this wait is what the process wanted: a process that is always runnable wants
    a whole core even when other tenants leave it less."""
    total = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as handle:
                fields = handle.read().split()
            total += int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    return total


class ProcessTree:
    """CPU and memory of a watched process and its descendants, by per-pid deltas (a
    child that exits between two ticks drops out instead of making the sum negative)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.root = psutil.Process(pid)
        self._members: list[psutil.Process] = [self.root]
        self._last: dict[int, tuple[float, int, int, int]] = {}
        self._started: float | None = None
        self._next_refresh = 0.0
        self._refreshes = 0
        self._refreshed_at = 0.0

    def alive(self) -> bool:
        try:
            return self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _refresh_members(self, now: float) -> None:
        try:
            # The sampler itself may be in the tree (a launcher that starts it beside the
            # job and is watched): its own cost is not the job's.
            children = [p for p in self.root.children(recursive=True) if p.pid != os.getpid()]
            self._members = [self.root, *children]
        except psutil.Error:
            self._members = [self.root]
        self._refreshes += 1
        self._refreshed_at = now
        assert self._started is not None
        if self._refreshes < len(CHILDREN_REFRESH_S):
            self._next_refresh = self._started + CHILDREN_REFRESH_S[self._refreshes]
        else:
            self._next_refresh = now + CHILDREN_REFRESH_EVERY_S

    def read(self, now: float, elapsed: float) -> dict[str, Any]:
        if self._started is None:
            self._started = now
        if now >= self._next_refresh:
            self._refresh_members(now)
        cpu_seconds = read_chars = write_chars = runq_ns = 0.0
        rss = 0
        current: dict[int, tuple[float, int, int, int]] = {}
        for proc in self._members:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss += proc.memory_info().rss
                    try:
                        io = proc.io_counters()
                        chars = (
                            getattr(io, "read_chars", io.read_bytes),
                            getattr(io, "write_chars", io.write_bytes),
                        )
                    except (psutil.AccessDenied, AttributeError):
                        chars = (0, 0)
            except psutil.Error:
                continue
            waited = _run_queue_wait_ns(proc.pid)
            current[proc.pid] = (times.user + times.system, chars[0], chars[1], waited)
            if proc.pid in self._last:
                cpu0, read0, write0, waited0 = self._last[proc.pid]
                cpu_seconds += max(0.0, current[proc.pid][0] - cpu0)
                read_chars += max(0, chars[0] - read0)
                write_chars += max(0, chars[1] - write0)
                runq_ns += max(0, waited - waited0)
        if len(current) < len(self._members):  # a member exited: look again soon (not every tick)
            self._next_refresh = min(self._next_refresh, self._refreshed_at + 2.0)
        self._last = current
        per_second = 1.0 / elapsed if elapsed > 0 else 0.0
        return {
            "pid": self.pid,
            "n": len(current),
            "cpu_pct": round(100.0 * cpu_seconds * per_second, 1),
            "runq_pct": round(100.0 * runq_ns / 1e9 * per_second, 1),
            "rss_mb": round(rss / MIB, 1),
            "read_bps": round(read_chars * per_second, 1),
            "write_bps": round(write_chars * per_second, 1),
        }


class AppendLog:
    """The output file, kept open, one line per write (line buffered).

    Over sshfs a reconnect makes files opened before it fail until reopened: a failed
    write drops that line, closes the file and reopens it at the next line (starting
    with a newline, so that a partly written line stays a line of its own, which
    readers skip). The sampler never dies of a failed write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed_writes = 0
        self._handle: IO[str] | None = None
        self._broken = False

    def open(self) -> None:
        """Open now, so that an unusable --out is reported at start."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - kept open

    def write(self, line: str) -> None:
        try:
            if self._handle is None:
                self._handle = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
                if self._broken:
                    self._handle.write("\n")
            self._handle.write(line)
            self._broken = False
        except OSError as exc:
            self.failed_writes += 1
            if not self._broken:
                print(f"sampler: cannot write {self.path}: {exc}; will reopen it", file=sys.stderr)
            self._broken = True
            self.close()

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass


def _rate(now: float, before: float, elapsed: float) -> float:
    return round(max(0.0, now - before) / elapsed, 1) if elapsed > 0 else 0.0


class Sampler:
    """Reads counters, turns their differences into rates, writes one line per tick."""

    def __init__(self, out: AppendLog | IO[str], node: str, interval: float, pid: int | None = None) -> None:
        self.out = out
        self.node = node
        self.interval = interval
        self.tree = ProcessTree(pid) if pid is not None else None
        self.gpu = GpuProbe()
        self.ncpu = psutil.cpu_count() or 1
        self._disk_kept: dict[str, bool] = {}
        self._last: tuple[float, Any, Any, Any] | None = None

    def write_info(self) -> None:
        info: dict[str, Any] = {
            "t": round(time.time(), 3),
            "kind": "info",
            "node": self.node,
            "gpu": bool(self.gpu.handles),
            "gpus": [
                {
                    "index": i,
                    "name": name,
                    "uuid": self.gpu.uuids[i],
                    "mem_total_mb": round(total, 1),
                    "gpm": self.gpu.gpm[i] is not None,
                    **({"mig": self.gpu.mig[i]} if self.gpu.mig[i] else {}),
                }
                for i, (name, total) in enumerate(zip(self.gpu.names, self.gpu.mem_total_mb))
            ],
            "ncpu": self.ncpu,
            "mem_total_mb": round(psutil.virtual_memory().total / MIB, 1),
            "disks": sorted(self._disks(psutil.disk_io_counters(perdisk=True) or {})),
            "nics": sorted(
                n for n in (psutil.net_io_counters(pernic=True) or {}) if not _VIRTUAL_NIC.match(n)
            ),
            "interval": self.interval,
            "pid": self.tree.pid if self.tree else None,
        }
        if self.gpu.reason and not self.gpu.handles:
            info["reason"] = self.gpu.reason
        self._emit(info)

    def _disks(self, counters: dict[str, Any]) -> dict[str, Any]:
        kept = {}
        for name, counter in counters.items():
            if name not in self._disk_kept:  # classified once per name: /sys is read rarely
                self._disk_kept[name] = is_whole_physical_disk(name)
            if self._disk_kept[name]:
                kept[name] = counter
        return kept

    def _read_counters(self) -> tuple[float, Any, Any, Any]:
        return (
            time.monotonic(),
            psutil.cpu_times(),
            self._disks(psutil.disk_io_counters(perdisk=True) or {}),
            psutil.net_io_counters(pernic=True) or {},
        )

    def prime(self) -> None:
        """Take the first counters; rates need two readings."""
        self._last = self._read_counters()
        if self.tree:
            self.tree.read(self._last[0], 0.0)

    def tick(self) -> None:
        current = self._read_counters()
        if self._last is None:
            self._last = current
            return
        mono, cpu, disks, nics = current
        mono0, cpu0, disks0, nics0 = self._last
        self._last = current
        elapsed = mono - mono0
        sample: dict[str, Any] = {
            "t": round(time.time(), 3),
            "kind": "sample",
            "node": self.node,
            "cpu": self._cpu(cpu0, cpu),
            "mem": self._mem(),
            "disks": {},
            "net": {},
            "gpus": self.gpu.read(),
        }
        for name, counter in disks.items():
            before = disks0.get(name)
            if before is None:
                continue
            busy_ms = getattr(counter, "busy_time", 0) - getattr(before, "busy_time", 0)
            sample["disks"][name] = {
                "read_bps": _rate(counter.read_bytes, before.read_bytes, elapsed),
                "write_bps": _rate(counter.write_bytes, before.write_bytes, elapsed),
                "busy_pct": round(min(100.0, max(0.0, busy_ms / 10.0 / elapsed)), 1) if elapsed else 0.0,
            }
        rx = tx = lo_rx = lo_tx = 0.0
        for name, counter in nics.items():
            before = nics0.get(name)
            if before is None:
                continue
            d_rx = max(0, counter.bytes_recv - before.bytes_recv)
            d_tx = max(0, counter.bytes_sent - before.bytes_sent)
            if name == "lo":
                lo_rx, lo_tx = d_rx, d_tx
            elif not _VIRTUAL_NIC.match(name):
                rx += d_rx
                tx += d_tx
        sample["net"] = {
            "rx_bps": round(rx / elapsed, 1) if elapsed else 0.0,
            "tx_bps": round(tx / elapsed, 1) if elapsed else 0.0,
            "lo_rx_bps": round(lo_rx / elapsed, 1) if elapsed else 0.0,
            "lo_tx_bps": round(lo_tx / elapsed, 1) if elapsed else 0.0,
        }
        if self.tree:
            sample["proc"] = self.tree.read(mono, elapsed)
        self._emit(sample)

    def _cpu(self, before: Any, now: Any) -> dict[str, Any]:
        def delta(field: str) -> float:
            return max(0.0, getattr(now, field, 0.0) - getattr(before, field, 0.0))

        # guest time is already counted in user on Linux: leave guest/guest_nice out.
        user = delta("user") + delta("nice")
        system = delta("system") + delta("irq") + delta("softirq")
        iowait, idle, steal = delta("iowait"), delta("idle"), delta("steal")
        total = user + system + iowait + idle + steal
        if total <= 0:
            return {"user": 0.0, "system": 0.0, "iowait": 0.0, "idle": 100.0, "steal": 0.0, "ncpu": self.ncpu}
        pct = 100.0 / total
        return {
            "user": round(user * pct, 1),
            "system": round(system * pct, 1),
            "iowait": round(iowait * pct, 1),
            "idle": round(idle * pct, 1),
            "steal": round(steal * pct, 1),
            "ncpu": self.ncpu,
        }

    @staticmethod
    def _mem() -> dict[str, float]:
        memory = psutil.virtual_memory()
        return {"used_pct": memory.percent, "used_mb": round((memory.total - memory.available) / MIB, 1)}

    def _emit(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def watched_alive(self) -> bool:
        return self.tree is None or self.tree.alive()

    def close(self) -> None:
        self.gpu.close()


def run(out_path: Path, node: str, interval: float, pid: int | None, stop: threading.Event) -> None:
    """Sample until `stop` is set or the watched process is gone. Ticks are scheduled on
    a fixed grid of the monotonic clock, so the rate does not drift with the work done."""
    # Appends by this node only: safe over sshfs (one writer per file).
    out = AppendLog(out_path)
    out.open()
    try:
        sampler = Sampler(out, node, interval, pid)
        try:
            sampler.write_info()
            sampler.prime()
            next_tick = time.monotonic() + interval
            while not stop.is_set():
                if stop.wait(max(0.0, next_tick - time.monotonic())):
                    break
                sampler.tick()
                if not sampler.watched_alive():
                    break
                next_tick += interval
                if next_tick < time.monotonic():  # we were suspended: skip missed ticks
                    next_tick = time.monotonic() + interval
        finally:
            sampler.close()
    finally:
        out.close()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.worker.sampler",
        description="Append this node's CPU, memory, disk, network and GPU use to a JSON-lines file.",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="file to append to: JOB_DIR/metrics/NODE.jsonl"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    parser.add_argument("--node", default=None, help="node name written in every line (default: hostname)")
    parser.add_argument(
        "--pid", type=int, default=None, help="stop when this process exits; also sample its tree"
    )
    args = parser.parse_args(argv)
    if not 0.05 <= args.interval <= 3600:
        parser.error(f"--interval must be between 0.05 and 3600 seconds, not {args.interval}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    node = args.node or os.environ.get("FLEET_NODE_NAME") or socket.gethostname()
    if args.pid is not None and not psutil.pid_exists(args.pid):
        print(f"sampler: process {args.pid} has already exited; nothing to sample", file=sys.stderr)
        return 0
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        run(args.out, node, args.interval, args.pid, stop)
    except psutil.NoSuchProcess:
        print(f"sampler: process {args.pid} has already exited; nothing to sample", file=sys.stderr)
    except OSError as exc:
        print(f"sampler: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
