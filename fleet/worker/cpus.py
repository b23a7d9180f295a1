"""CPU threads for a node's model processes.

N CPU processes on one machine (`processes_per_node: 2`, `--processes 2` without GPUs)
each get their share of its cores for torch's intra-op pool, not a thread per core
each: oversubscribed OpenMP threads spin at every barrier, and small batches then cost
about twice the CPU per item (measured with `benchmarks/serving.py`). Set in the child
before torch loads; a user's own OMP_NUM_THREADS / MKL_NUM_THREADS is kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share_cpus(processes: int, env: MutableMapping[str, str] | None = None) -> int | None:
    """Give this process 1/`processes` of the cores; returns the thread count it set, or
    None when it left things as they were (one process, or the user chose)."""
    env = os.environ if env is None else env
    if processes <= 1 or any(name in env for name in THREAD_VARIABLES):
        return None
    threads = max(1, usable_cpus() // processes)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and env is os.environ:  # loaded already: its pool is sized, resize it
        torch.set_num_threads(threads)
    return threads
