"""Handlers used by the tests through the real plugin interface (`worker_plugins:NAME`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from fleet.worker.handlers import HandlerContext
from fleet.worker.handlers.checksum import ChecksumHandler

CALLS: dict[str, list[Any]] = {"infer": [], "open": []}


class SlowChecksum(ChecksumHandler):
    """checksum that takes `delay_s` per batch, and notes each open() in a file."""

    def __init__(self, delay_s: float = 0.0, open_log: str | None = None) -> None:
        self.delay_s = delay_s
        self.open_log = open_log

    def open(self, context: HandlerContext) -> None:
        CALLS["open"].append(context.device)
        if self.open_log:
            with open(self.open_log, "a") as handle:
                handle.write(f"{os.getpid()} {os.environ.get('OMP_NUM_THREADS', '-')}\n")

    def infer(self, batch: list[bytes]) -> list[str]:
        CALLS["infer"].append(len(batch))
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().infer(batch)


def slow_checksum(**options: Any) -> SlowChecksum:
    return SlowChecksum(**options)


class PoisonChecksum(ChecksumHandler):
    """infer fails for the whole batch when any item contains b'POISON'."""

    def infer(self, batch: list[bytes]) -> list[str]:
        CALLS["infer"].append(len(batch))
        if any(b"POISON" in item for item in batch):
            raise ValueError("poisoned batch")
        return super().infer(batch)


class OomChecksum(ChecksumHandler):
    """Raises torch's real CUDA out-of-memory error for batches larger than `limit`."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self.freed = 0

    def infer(self, batch: list[bytes]) -> list[str]:
        import torch

        CALLS["infer"].append(len(batch))
        if len(batch) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().infer(batch)

    def on_out_of_memory(self) -> None:
        self.freed += 1


def write_marker(path: str) -> None:
    Path(path).write_text("x")


class NotAHandler:
    def infer(self, batch: list[Any]) -> list[Any]:
        return batch


class TokenOomChecksum(ChecksumHandler):
    """Sized checksum (size = bytes) that raises torch's real CUDA out-of-memory error for
    a batch costing more than `limit` (count x longest); notes every batch's cost and
    whether on_out_of_memory ran outside an except block."""

    def __init__(self, limit: int = 400) -> None:
        self.limit = limit

    def size(self, item: bytes) -> int:
        return len(item)

    def infer(self, batch: list[bytes]) -> list[str]:
        import torch

        cost = len(batch) * max(len(item) for item in batch)
        CALLS.setdefault("costs", []).append(cost)
        if cost > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().infer(batch)

    def on_out_of_memory(self) -> None:
        import sys

        CALLS.setdefault("freed_outside_except", []).append(sys.exc_info()[0] is None)


class BrokenGpuChecksum(ChecksumHandler):
    """A GPU whose CUDA context broke: every batch raises torch's real AcceleratorError
    (what torch raises after an illegal memory access or a device-side assert)."""

    def infer(self, batch: list[bytes]) -> list[str]:
        import torch

        CALLS["infer"].append(len(batch))
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


class FailOnceChecksum(ChecksumHandler):
    """The first process to compute a batch finds its GPU broken (the RuntimeError form
    of a CUDA error) and dies of it; `marker` (created exclusively) says it happened.
    With `always`, every process fails."""

    def __init__(self, marker: str, always: bool = False) -> None:
        self.marker = marker
        self.always = always

    def infer(self, batch: list[bytes]) -> list[str]:
        if self.always:
            with open(self.marker, "a") as handle:
                handle.write(f"{os.getpid()}\n")
            raise RuntimeError("CUDA error: device-side assert triggered")
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return super().infer(batch)
        raise RuntimeError("CUDA error: device-side assert triggered")


class PreparingChecksum(ChecksumHandler):
    """checksum of a prepare()d form (upper-cased, in the reader threads); prepare fails
    for an item holding b'POISON'; notes which threads prepared."""

    def prepare(self, items: list[bytes]) -> list[bytes]:
        import threading

        CALLS.setdefault("prepare_threads", []).append(threading.current_thread().name)
        if any(b"POISON" in item for item in items):
            raise ValueError("cannot prepare a poisoned item")
        return [item.upper() for item in items]


class CountingChecksum(SlowChecksum):
    """slow_checksum that notes every input it computes (CALLS["computed"]), in this process."""

    def infer(self, batch: list[bytes]) -> list[str]:
        CALLS.setdefault("computed", []).extend(batch)
        return super().infer(batch)


class LedgerChecksum(ChecksumHandler):
    """Sized checksum (size = bytes, so batches are bucketed by length) that appends every
    input it computes to `ledger` (one line each, O_APPEND: the lines survive a SIGKILL of
    the process), and on node `node` only: takes `delay_s` per batch, and hangs, as a
    device that stopped answering, before the batch that would go past `hang_after` items."""

    def __init__(self, ledger: str, node: str = "", delay_s: float = 0.0, hang_after: int | None = None) -> None:
        self.ledger = ledger
        self.node = node
        self.delay_s = delay_s
        self.hang_after = hang_after
        self.slow = False
        self.computed = 0

    def open(self, context: HandlerContext) -> None:
        self.slow = context.node == self.node

    def size(self, item: bytes) -> int:
        return len(item)

    def infer(self, batch: list[bytes]) -> list[str]:
        if self.slow and self.hang_after is not None and self.computed + len(batch) > self.hang_after:
            import threading

            threading.Event().wait()  # never answers; the test SIGKILLs the process
        if self.slow and self.delay_s:
            time.sleep(self.delay_s)
        fd = os.open(self.ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, b"".join(item.rstrip(b"\n") + b"\n" for item in batch))
        finally:
            os.close(fd)
        self.computed += len(batch)
        return super().infer(batch)
