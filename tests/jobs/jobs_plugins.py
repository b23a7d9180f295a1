"""Handlers the job tests load on the nodes through the real plugin interface
(`handler: jobs_plugins:NAME`, with this directory on the job's PYTHONPATH)."""

from __future__ import annotations

import os
import time
from typing import Any

from fleet.worker.handlers.checksum import ChecksumHandler


class SlowChecksum(ChecksumHandler):
    """The bundled checksum handler, `delay_s` slower per item: a job that takes long
    enough for preemptions to land in the middle of it, with outputs that stay
    verifiable. With `count_dir`, every computed item adds a line to
    `<count_dir>/<node>.<pid>.count`, written straight to the file (no buffer), so the
    count survives a SIGKILL of the node: the exact number of items computed twice."""

    def __init__(self, delay_s: float = 0.02, count_dir: str | None = None) -> None:
        self.delay_s = delay_s
        self.count_dir = count_dir
        self._fd: int | None = None

    def infer(self, batch: list[bytes]) -> list[str]:
        time.sleep(self.delay_s * len(batch))
        digests = super().infer(batch)
        if self.count_dir:
            if self._fd is None:
                node = os.environ.get("FLEET_NODE_NAME", "node")
                os.makedirs(self.count_dir, exist_ok=True)
                path = os.path.join(self.count_dir, f"{node}.{os.getpid()}.count")
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(self._fd, "".join(d[:12] + "\n" for d in digests).encode())
        return digests


def slow_checksum(**options: Any) -> SlowChecksum:
    return SlowChecksum(**options)
