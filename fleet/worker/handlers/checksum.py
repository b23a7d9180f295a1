"""The bundled `checksum` handler: sha256 of each input's bytes.

Cheap, deterministic and verifiable: used to test the queue and to measure the worker's
own overhead. Files mode writes `<input>.sha256` (hex digest and a newline); records
mode writes `<chunk>.sha256`, one hex digest per line in row order. A record's bytes are
its UTF-8 text (a JSON value that is not a string: its compact, key-sorted JSON text).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fleet.worker.handlers import Handler


class ChecksumHandler(Handler):
    file_suffix = ".sha256"
    rows_suffix = ".sha256"
    uses_device = False

    def load(self, data: Any) -> bytes:
        if isinstance(data, bytes):
            return data
        if isinstance(data, str):
            return data.encode("utf-8")
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def digest(self, item: bytes) -> bytes:
        return hashlib.sha256(item).digest()

    def infer(self, batch: list[bytes]) -> list[str]:
        sha256 = hashlib.sha256
        return [sha256(item).hexdigest() for item in batch]

    def serialize(self, result: str) -> bytes:
        return (result + "\n").encode()

    def serialize_rows(self, results: list[str]) -> bytes:
        return ("\n".join(results) + "\n").encode() if results else b""
