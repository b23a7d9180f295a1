"""The bottleneck rules: from a node's figures to a verdict, its evidence and advice.

Pure functions over `NodeSignals`; docs/report.md states the same rules in words with
the same thresholds (keep them in step). A verdict is one of `VERDICTS`; the first
rule that matches wins, in the order of `classify_node`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

VERDICTS = ("gpu-bound", "cpu-bound", "disk-bound", "network-bound", "starved", "idle")


@dataclass(frozen=True)
class Thresholds:
    """Every number the rules use. The first three are the published ones (TensorFlow's
    profiler: input >= 20% of step time is input-bound, 5-20% moderately; PyTorch's
    kineto: GPU utilization < 50% is low)."""

    input_bound_pct: float = 20.0  # input wait, % of step time (wait + compute)
    input_moderate_pct: float = 5.0
    gpu_low_pct: float = 50.0
    gpu_busy_pct: float = 80.0  # at or above: the GPU is (nearly) saturated
    gpu_mem_low_pct: float = 50.0  # below: room for a larger batch
    cpu_busy_pct: float = 85.0  # user + system, % of all cores
    one_core_pct: float = 90.0  # a process tree wanting >= 0.9 of a core on a 1-thread job
    runq_wait_pct: float = 20.0  # job threads waiting for a CPU, % of the CPU they wanted
    runq_min_demand_pct: float = 50.0  # ... when they wanted at least half a core
    disk_busy_pct: float = 70.0  # busiest disk's busy time, % of wall time
    iowait_pct: float = 10.0  # % of all cores
    net_input_mb_s: float = 1.0  # input arriving over the network at least this fast
    net_saturated_mb_s: float = 100.0  # ~1 Gbit/s: network-bound without worker timings
    idle_pct: float = 10.0  # cpu, gpu, disk below this ...
    idle_net_mb_s: float = 1.0  # ... and network below this: idle
    worker_busy_pct: float = 50.0  # worker time inside batches; below: waiting for chunks
    model_busy_low_pct: float = 80.0  # model device time below this share of the worker's: said
    starved_no_items_s: float = 10.0  # a worker alive this long with no item: starved
    io_share_pct: float = 50.0  # read + write, % of stage time: the shared filesystem is the limit


@dataclass(frozen=True)
class NodeSignals:
    """Means over the node's working window (see docs/report.md)."""

    cpu_busy: float = 0.0
    iowait: float = 0.0
    disk_busy: float = 0.0
    disk_read_mb_s: float = 0.0
    net_rx_mb_s: float = 0.0
    net_mb_s: float = 0.0
    ncpu: int | None = None
    gpu_count: int = 0
    gpu_util: float | None = None  # mean over GPUs
    gpu_util_each: tuple[float, ...] = ()
    gpu_mem: float | None = None  # memory used, % of capacity
    gpu_sm_active: float | None = None  # GPM: % of SMs busy, mean over GPUs that report it
    gpu_sm_each: tuple[float | None, ...] = ()
    gpu_tensor_active: float | None = None
    model_busy_pct: float | None = None  # model device time, % of the worker's wall time
    cpu_steal: float = 0.0
    job_cpu_pct_one_core: float | None = None  # watched process tree (sampler --pid)
    job_runq_pct_one_core: float | None = None  # its threads runnable, waiting for a CPU
    job_io_mb_s: float | None = None  # bytes read + written by that tree (files, sshfs, pipes)
    has_samples: bool = False
    has_worker: bool = False
    worker_seconds: float = 0.0  # summed over worker processes
    items: int = 0
    device: str | None = None
    input_wait_pct: float | None = None  # wait / (wait + compute)
    worker_busy_pct: float | None = None  # (wait + compute) / worker wall time
    read_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    mode: str | None = None  # the worker's "files" or "records"


@dataclass(frozen=True)
class Verdict:
    kind: str
    evidence: tuple[str, ...]
    recommendation: str
    notes: tuple[str, ...] = field(default_factory=tuple)


def job_cpu_demand(s: NodeSignals) -> float | None:
    """The CPU the watched job wanted, in % of one core: what it got plus the time its
    threads waited in the run queue (what other tenants kept from it)."""
    if s.job_cpu_pct_one_core is None:
        return None
    return s.job_cpu_pct_one_core + (s.job_runq_pct_one_core or 0.0)


def cpu_saturated(s: NodeSignals, th: Thresholds) -> tuple[bool, str | None]:
    """Is the CPU what holds the job back? Yes when the node's CPU is full and the job
    is the one using it, or when the job's threads (sampler --pid) spend >= 20% of the
    CPU time they want waiting for a CPU (wanting at least half a core). When the CPU
    is full of something else and the job does not wait for it, that is said, and the
    CPU is not blamed on the job."""
    load = s.cpu_busy + s.cpu_steal
    demand = job_cpu_demand(s)
    if demand is not None and demand >= th.runq_min_demand_pct:
        waited = 100.0 * (s.job_runq_pct_one_core or 0.0) / demand
        if waited >= th.runq_wait_pct:
            note = None
            share = (s.job_cpu_pct_one_core or 0.0) / (s.ncpu or 1)
            if load >= th.cpu_busy_pct and share < 0.5 * s.cpu_busy:
                note = (
                    f"the job's threads wait for a CPU {waited:.0f}% of the time they want one: "
                    f"other processes on the node take the CPU ({load:.0f}% busy)"
                )
            return True, note
    if load < th.cpu_busy_pct:
        return False, None
    if s.job_cpu_pct_one_core is not None and s.ncpu:
        share = s.job_cpu_pct_one_core / s.ncpu
        if share < 0.5 * s.cpu_busy:
            return False, (
                f"CPU {load:.0f}% busy but the job's processes use only {share:.0f}% of it: "
                f"something else on the node competes for the CPU"
            )
    return True, None


def job_reads(s: NodeSignals) -> bool:
    """False only when the sampler saw the job's processes do (almost) no I/O at all:
    then a busy disk is somebody else's."""
    return s.job_io_mb_s is None or s.job_io_mb_s >= 0.05


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def _input_bound(s: NodeSignals, th: Thresholds) -> Verdict:
    """The worker waits for input: find which resource the input is stuck on."""
    waits = f"input wait {_pct(s.input_wait_pct)} of step time (>= {th.input_bound_pct:.0f}%: input-bound)"
    saturated, cpu_note = cpu_saturated(s, th)
    notes = (cpu_note,) if cpu_note else ()
    if (s.disk_busy >= th.disk_busy_pct or s.iowait >= th.iowait_pct) and job_reads(s):
        return Verdict(
            "disk-bound",
            (
                waits,
                f"busiest disk {s.disk_busy:.0f}% busy",
                f"iowait {s.iowait:.0f}% of all cores",
                f"disk {s.disk_read_mb_s:.1f} MB/s read",
            ),
            "The local disk cannot feed the model: copy inputs to a faster local disk (local SSD), "
            "use larger files (records mode), or read them once into memory.",
            notes,
        )
    if saturated:
        return Verdict(
            "cpu-bound",
            (waits, f"CPU {s.cpu_busy + s.cpu_steal:.0f}% busy (>= {th.cpu_busy_pct:.0f}%)"),
            "Loading and decoding inputs uses every core: choose a machine with more cores, or move "
            "the decoding out of the loader (pre-process once), or run fewer processes per node.",
        )
    if s.net_rx_mb_s >= th.net_input_mb_s and s.net_rx_mb_s >= s.disk_read_mb_s:
        return Verdict(
            "network-bound",
            (
                waits,
                (
                    f"network in {s.net_rx_mb_s:.1f} MB/s (more than local disk reads, "
                    f"{s.disk_read_mb_s:.1f} MB/s)"
                ),
                f"busiest local disk {s.disk_busy:.0f}% busy",
            ),
            "Inputs arrive over the network (sshfs) too slowly: raise sshfs max_conns (e.g. max_conns=4), "
            "copy the inputs to local disk in setup, use fewer nodes per head disk, or more reader threads.",
            notes,
        )
    return Verdict(
        "starved",
        (
            waits,
            (
                f"no local resource saturated: CPU {s.cpu_busy:.0f}%, disk {s.disk_busy:.0f}% busy, "
                f"network {s.net_mb_s:.1f} MB/s"
            ),
        ),
        "The model waits for input that is slow to arrive (storage latency, a busy head disk, "
        "few reader threads): raise reader_threads and prefetch, use fewer nodes per head disk, "
        "or copy the inputs to local disk.",
        notes,
    )


def _compute_bound(s: NodeSignals, th: Thresholds) -> Verdict:
    """The worker is mostly computing: the compute device is the bottleneck."""
    uses_gpu = s.gpu_count > 0 and (s.device is None or s.device.startswith("cuda") or s.device == "unknown")
    moderate = s.input_wait_pct is not None and s.input_wait_pct >= th.input_moderate_pct
    notes = []
    if moderate:
        notes.append(
            f"input wait {_pct(s.input_wait_pct)} of step time is moderate "
            f"({th.input_moderate_pct:.0f}-{th.input_bound_pct:.0f}%): a little more prefetch would help"
        )
    if uses_gpu and s.gpu_util is not None:
        idle_gpus = [i for i, u in enumerate(s.gpu_util_each) if u < th.idle_pct]
        if idle_gpus and len(idle_gpus) < s.gpu_count:
            notes.append(f"GPU(s) {', '.join(map(str, idle_gpus))} idle while others work")
        working = [u for u in s.gpu_util_each if u >= th.idle_pct] or [s.gpu_util]
        util = sum(working) / len(working)  # idle GPUs of a multi-GPU node get their own advice
        nvml_util = util
        if s.gpu_sm_active is not None:
            # GPM's SM activity is the stronger evidence: NVML's util is "a kernel ran".
            active = [a for a, u in zip(s.gpu_sm_each, s.gpu_util_each) if a is not None and u >= th.idle_pct]
            util = sum(active) / len(active) if active else s.gpu_sm_active
            if nvml_util >= th.gpu_busy_pct and util < th.gpu_low_pct:
                notes.append(
                    f"NVML util {nvml_util:.0f}% but only {util:.0f}% of the SMs busy (GPM): the kernels "
                    "are too small for this GPU (raise batch_size / max_batch_tokens)"
                )
        if s.model_busy_pct is not None and s.model_busy_pct < th.model_busy_low_pct:
            notes.append(
                f"the model computed only {s.model_busy_pct:.0f}% of the worker's time (device time): "
                "the rest went to the CPU side of the compute thread (collating, Python) or to waits"
            )
        saturated, cpu_note = cpu_saturated(s, th)
        if cpu_note:
            notes.append(cpu_note)
        if util < th.gpu_low_pct and saturated:
            return Verdict(
                "cpu-bound",
                (
                    f"GPU {_activity_name(s)} {util:.0f}% (< {th.gpu_low_pct:.0f}%: low)",
                    f"CPU {s.cpu_busy:.0f}% busy (>= {th.cpu_busy_pct:.0f}%)",
                ),
                "The CPU cannot keep the GPU busy (tokenising, decoding, Python overhead): choose a machine "
                "with more cores per GPU, or move pre-processing out of the loop.",
                tuple(notes),
            )
        evidence = [
            f"GPU util {s.gpu_util:.0f}% over {s.gpu_count} GPU(s)",
            f"input wait {_pct(s.input_wait_pct)} of step time",
        ]
        if len(working) < s.gpu_count:
            evidence.append(f"{util:.0f}% over the {len(working)} working GPU(s)")
        if s.gpu_sm_active is not None:
            evidence.append(
                f"SM activity {util:.0f}% (GPM)"
                + (f", tensor cores {s.gpu_tensor_active:.0f}%" if s.gpu_tensor_active is not None else "")
            )
        if s.model_busy_pct is not None:
            evidence.append(f"model busy {s.model_busy_pct:.0f}% of the worker's time (device time)")
        if s.gpu_mem is not None:
            evidence.append(f"GPU memory {s.gpu_mem:.0f}% used")
        if idle_gpus and len(idle_gpus) < s.gpu_count:
            advice = (
                f"Only some GPUs work: run one worker process per GPU (processes_per_node: auto) "
                f"so that GPU(s) {', '.join(map(str, idle_gpus))} get work too."
            )
        elif util < th.gpu_low_pct:
            advice = (
                "The GPU computes but stays under-used (< 50%): raise batch_size so that each "
                "kernel does more work, or run two worker processes per GPU."
            )
        elif s.gpu_mem is not None and s.gpu_mem < th.gpu_mem_low_pct and util < th.gpu_busy_pct:
            advice = f"GPU memory is only {s.gpu_mem:.0f}% used: raise batch_size to fill the GPU better."
        else:
            advice = (
                "The GPU is the bottleneck, which is where a GPU job should be: to finish sooner, add "
                "nodes or use faster GPUs; use mixed precision (fp16/bf16) if the model allows."
            )
        return Verdict("gpu-bound", tuple(evidence), advice, tuple(notes))
    cores = s.ncpu or 1
    load = s.cpu_busy + s.cpu_steal
    evidence = [
        f"compute {_pct(100 - (s.input_wait_pct or 0))} of step time on {s.device or 'the CPU'}",
        f"CPU {load:.0f}% busy of {cores} core(s)",
    ]
    if s.gpu_count > 0:
        advice = (
            f"The model runs on {s.device} although this node has {s.gpu_count} GPU(s): set "
            f"device: auto (or cuda) in the job."
        )
    elif load < th.cpu_busy_pct and cores > 1:
        advice = (
            f"Computing on the CPU with cores to spare ({load:.0f}% busy): run more worker "
            f"processes per node, or use GPU nodes for this model."
        )
    else:
        advice = "Computing on the CPU with every core busy: use GPU nodes, or more nodes."
    return Verdict("cpu-bound", tuple(evidence), advice, tuple(notes))


def _activity_name(s: NodeSignals) -> str:
    return "SM activity" if s.gpu_sm_active is not None else "util"


def _without_worker(s: NodeSignals, th: Thresholds) -> Verdict:
    """No worker timings (a `run:` job): judge from the sampler's figures alone."""
    job_cpu = s.job_cpu_pct_one_core
    if s.gpu_util is not None and s.gpu_util >= th.gpu_low_pct:
        return Verdict(
            "gpu-bound",
            (f"GPU util {s.gpu_util:.0f}%",),
            "The GPU is the bottleneck: add nodes or faster GPUs; raise the batch size if GPU memory allows.",
        )
    saturated, cpu_note = cpu_saturated(s, th)
    notes = (cpu_note,) if cpu_note else ()
    if saturated:
        evidence = [f"CPU {s.cpu_busy + s.cpu_steal:.0f}% busy of {s.ncpu or '?'} core(s)"]
        if job_cpu is not None:
            evidence.append(f"the job's processes use {job_cpu / 100:.1f} core(s)")
        if s.job_runq_pct_one_core:
            evidence.append(f"and wait for {s.job_runq_pct_one_core / 100:.1f} more in the run queue")
        advice = (
            "Other processes take the CPU the job wants: run the job on nodes of its own, or stop what "
            "else runs there."
            if cpu_note
            else "Every core is busy: choose machines with more cores, or GPU nodes if the work can use them."
        )
        return Verdict("cpu-bound", tuple(evidence), advice, notes)
    if (s.disk_busy >= th.disk_busy_pct or s.iowait >= th.iowait_pct) and job_reads(s):
        return Verdict(
            "disk-bound",
            (f"busiest disk {s.disk_busy:.0f}% busy", f"iowait {s.iowait:.0f}%"),
            "The local disk is saturated: faster local disk (local SSD), larger files, fewer reads.",
            notes,
        )
    if s.net_mb_s >= th.net_saturated_mb_s:
        return Verdict(
            "network-bound",
            (f"network {s.net_mb_s:.0f} MB/s",),
            "The network carries a lot: raise sshfs max_conns, copy inputs locally, fewer nodes per head.",
            notes,
        )
    demand = job_cpu_demand(s)
    if demand is not None and demand >= th.one_core_pct and (s.ncpu or 1) > 1:
        return Verdict(
            "cpu-bound",
            (f"the job's processes want {demand / 100:.1f} core(s) of {s.ncpu}", "one core saturated"),
            "The job keeps one core busy and leaves the others idle: it is single-threaded; run several "
            "processes per node (or threads) to use every core.",
            notes,
        )
    quiet_cpu = (job_cpu / (s.ncpu or 1)) if job_cpu is not None else s.cpu_busy
    quiet_io = s.job_io_mb_s is not None and s.job_io_mb_s < th.idle_net_mb_s
    if (
        quiet_cpu < th.idle_pct
        and (s.gpu_util or 0.0) < th.idle_pct
        and (quiet_io or (s.disk_busy < th.idle_pct and s.net_mb_s < th.idle_net_mb_s))
    ):
        who = "the job's processes use" if job_cpu is not None else "the node uses"
        return Verdict(
            "idle",
            (
                f"{who} {quiet_cpu:.0f}% of the CPU",
                f"GPU {_pct(s.gpu_util)}",
                f"disk {s.disk_busy:.0f}% busy",
                f"network {s.net_mb_s:.1f} MB/s",
            ),
            "The node does next to nothing: give it work or remove it (fewer nodes); "
            "check logs/<node>.log for a job that never started.",
            notes,
        )
    return Verdict(
        "starved",
        (
            (
                f"no resource saturated: CPU {s.cpu_busy:.0f}%, GPU {_pct(s.gpu_util)}, disk {s.disk_busy:.0f}%, "
                f"network {s.net_mb_s:.1f} MB/s"
            ),
        ),
        "The job is waiting on something outside this node (remote storage, a lock, a service): "
        "look at what it reads; more parallel reads or local copies of its inputs usually help.",
        notes,
    )


def io_share(s: NodeSignals) -> float | None:
    """read + write in % of the worker's stage time (read + wait + compute + write)."""
    total = s.read_s + s.wait_s + s.compute_s + s.write_s
    return 100.0 * (s.read_s + s.write_s) / total if total > 0 else None


def _shared_filesystem(s: NodeSignals, th: Thresholds, cpu_verdict: Verdict) -> Verdict | None:
    """A worker that spends most of its stage time reading and writing is held back by
    the shared filesystem, whatever the CPU counters say (on a small node sshfs, ssh and
    the kernel's FUSE work fill the CPU: more cores or a GPU would not help)."""
    share = io_share(s)
    if share is None or share < th.io_share_pct or s.items <= 0:
        return None
    ms = 1000.0 * (s.read_s + s.write_s) / s.items
    evidence = [
        f"read + write {share:.0f}% of stage time (>= {th.io_share_pct:.0f}%): the shared filesystem is the limit",
        f"{ms:.2f} ms of reads and writes per item",
    ]
    if s.worker_seconds > 0:
        rate = s.items / s.worker_seconds
        if s.mode == "files":
            evidence.append(f"{2 * rate:.0f} files/s through the mount (one read and one write per item)")
        else:
            evidence.append(f"{rate:.0f} items/s per worker process")
    cpu_figures = "; ".join(cpu_verdict.evidence)
    note = (
        f"the CPU counters alone say cpu-bound ({cpu_figures}): that CPU goes to moving files "
        "(sshfs, ssh, the kernel's FUSE work), not to the model"
    )
    return Verdict(
        "network-bound",
        tuple(evidence),
        f"The shared filesystem is the limit, not the model: every item costs {ms:.2f} ms of reads and writes "
        "through the mount. Move the data in bulk: io: bulk (files mode: the head packs each chunk into one "
        "file, each way), or records mode (many items per file), or fewer, larger files. Raising sshfs "
        "max_conns helps large files more than many small ones.",
        (note,),
    )


def classify_node(s: NodeSignals, th: Thresholds = Thresholds()) -> Verdict:
    """The rules of docs/report.md, first match wins; a cpu-bound worker whose stage time
    goes mostly to reads and writes is held back by the shared filesystem instead."""
    verdict = _classify_node(s, th)
    if verdict.kind == "cpu-bound" and s.has_worker:
        return _shared_filesystem(s, th, verdict) or verdict
    return verdict


def _classify_node(s: NodeSignals, th: Thresholds) -> Verdict:
    if not s.has_samples and not s.has_worker:
        return Verdict(
            "idle",
            ("no samples and no worker timings",),
            "Nothing was recorded for this node: check that the sampler and worker started "
            "(logs/<node>.log).",
        )
    if s.has_worker and s.items == 0:
        if s.worker_seconds >= th.starved_no_items_s:
            return Verdict(
                "starved",
                (f"worker ran {s.worker_seconds:.0f} s and processed no item",),
                "The worker found nothing to claim: there are fewer chunks than worker processes, or "
                "the other nodes hold them: lower chunk_size so that work spreads, or use fewer nodes.",
            )
        return _without_worker(s, th)
    if s.has_worker:
        if s.input_wait_pct is not None and s.input_wait_pct >= th.input_bound_pct:
            return _input_bound(s, th)
        if s.worker_busy_pct is not None and s.worker_busy_pct < th.worker_busy_pct:
            return Verdict(
                "starved",
                (
                    (
                        f"worker in batches only {s.worker_busy_pct:.0f}% of its time "
                        f"(< {th.worker_busy_pct:.0f}%)"
                    ),
                    f"input wait {_pct(s.input_wait_pct)} of step time",
                ),
                "The worker spends most of its time between batches: claiming chunks, listing directories, "
                "or waiting for chunks held by others. Raise chunk_size if claims are slow over sshfs; "
                "lower it (or use fewer nodes) if the workers run out of chunks.",
            )
        return _compute_bound(s, th)
    return _without_worker(s, th)


def classify_fleet(node_verdicts: Sequence[tuple[str, Verdict, float]], head_shared: bool = True) -> Verdict:
    """The fleet's verdict: the one that holds the most working node-seconds, idle
    nodes aside unless every node is idle. `node_verdicts`: (node, verdict, weight)."""
    if not node_verdicts:
        return Verdict("idle", ("no node recorded anything",), "Run a job first, or check that it started.")
    weights: Counter[str] = Counter()
    for _, verdict, weight in node_verdicts:
        weights[verdict.kind] += max(weight, 1e-9)
    working = {k: w for k, w in weights.items() if k != "idle"}
    kind = max(working, key=lambda k: working[k]) if working else "idle"
    nodes_with = [name for name, verdict, _ in node_verdicts if verdict.kind == kind]
    idle_nodes = [name for name, verdict, _ in node_verdicts if verdict.kind == "idle"]
    evidence = [f"{len(nodes_with)} of {len(node_verdicts)} node(s) {kind}"]
    if kind != "idle" and idle_nodes:
        evidence.append(f"idle: {', '.join(idle_nodes)}")
    advice = {
        "gpu-bound": "The GPUs are the limit: more nodes or faster GPUs finish sooner; check batch_size advice per node.",
        "cpu-bound": "The CPUs are the limit: more cores per node, more processes per node, or GPU nodes.",
        "disk-bound": "Local disks are the limit: faster local disks or larger input files.",
        "network-bound": (
            "The shared disk's network path is the limit: raise sshfs max_conns, copy inputs to local disks "
            "in setup, or use fewer nodes per head disk (several heads, or a bucket)."
        ),
        "starved": (
            "The workers wait for input or for work: more reader threads and prefetch; if many nodes read one "
            "head disk, fewer nodes per head disk; if they run out of chunks, a smaller chunk_size."
        ),
        "idle": "No node did useful work: check that the job started (fleet logs JOB).",
    }[kind]
    if kind != "idle" and idle_nodes:
        advice += f" {len(idle_nodes)} node(s) sat idle: remove them or give them work."
    return Verdict(kind, tuple(evidence), advice)
