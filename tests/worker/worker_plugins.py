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
                handle.write(f"{os.getpid()}\n")

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
