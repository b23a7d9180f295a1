"""Handlers with a known bottleneck, loaded by the real worker through its plugin
interface (`report_handlers:NAME`; tests/report is on the worker's PYTHONPATH)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from fleet.worker.handlers.checksum import ChecksumHandler


class BusyChecksum(ChecksumHandler):
    """checksum plus `busy_ms` of pure computation per item: a CPU-bound model."""

    def __init__(self, busy_ms: float = 20.0) -> None:
        self.busy_s = busy_ms / 1000.0

    def infer(self, batch: list[bytes]) -> list[str]:
        end = time.perf_counter() + self.busy_s * len(batch)
        block = b"x" * 4096
        while time.perf_counter() < end:
            block = hashlib.sha256(block).digest() * 128
        return super().infer(batch)


class ThrottledChecksum(ChecksumHandler):
    """checksum whose every read takes `read_ms` (throttled, slow storage)."""

    def __init__(self, read_ms: float = 30.0) -> None:
        self.read_s = read_ms / 1000.0

    def load(self, data: Any) -> bytes:
        time.sleep(self.read_s)
        return super().load(data)


def busy(**options: Any) -> BusyChecksum:
    return BusyChecksum(**options)


def throttled(**options: Any) -> ThrottledChecksum:
    return ThrottledChecksum(**options)
