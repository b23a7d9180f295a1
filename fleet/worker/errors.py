"""The worker's own fatal error (the worker never imports the control plane's errors).

A `WorkerError` is something the user must fix (a bad job.yaml, inputs that match
nothing, an unknown handler): the CLI prints its message on one line and exits 2.
Per-item problems are never raised this far; they are recorded and skipped.
"""

from __future__ import annotations


class WorkerError(Exception):
    """A fatal, user-facing problem: the worker cannot run this job at all."""

    exit_code = 2


class WorkerFailed(WorkerError):
    """The worker started but could not go on (e.g. the shared mount went away)."""

    exit_code = 1


class DeviceFailed(WorkerFailed):
    """The compute device failed (a CUDA error other than out-of-memory): the CUDA
    context of this process is broken for good. The process releases its chunks and
    exits 3; its parent (`--processes`) or the node's launcher starts a fresh one."""

    exit_code = 3
