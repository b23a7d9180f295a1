"""The binary body of a serving request or answer: a list of values, no JSON floats.

    body   = b"FLW1" count:u32 value*
    value  = tag:u8 length:u64 payload
    tags   0 None   1 str (UTF-8)   2 bytes   3 JSON (UTF-8; small structured values)
           4 array: dtype-len:u8 dtype(ASCII, numpy str) ndim:u8 dim:u64*ndim raw C-order bytes
           5 error (UTF-8 message: this item failed on the server)

Arrays (numpy, and anything with `__array__`, e.g. the vectors of text-embed) travel as
their raw bytes: a 384-float vector is 1.5 KB instead of ~8 KB of JSON text and parses
in microseconds. numpy is imported only when an array is met. Used by both ends:
`fleet.worker.serve` (the node) and `fleet.serve` (the caller).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

MAGIC = b"FLW1"
CONTENT_TYPE = "application/x-fleet-values"
TIMEOUT_HEADER = "X-Fleet-Timeout-Ms"  # a request's time left, in ms, relative (no clock is shared)
NO_WAIT_HEADER = "X-Fleet-No-Wait"  # "1": the sender has no more items now; run without waiting for more
_HEAD = struct.Struct("<BQ")
_COUNT = struct.Struct("<I")
_DIM = struct.Struct("<Q")
NONE, STR, BYTES, JSON, ARRAY, ERROR = range(6)


class WireError(ValueError):
    """A body that is not in this format."""


class ItemError:
    """An item that failed on the server: decoded in place of its result."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"ItemError({self.message!r})"


def _array_parts(value: Any) -> tuple[bytes, bytes]:
    import numpy as np

    array = np.ascontiguousarray(value)
    if array.dtype.hasobject:
        raise WireError("arrays of Python objects cannot be sent; convert them first")
    header = array.dtype.str.encode("ascii")
    dims = b"".join(_DIM.pack(d) for d in array.shape)
    return bytes([len(header)]) + header + bytes([array.ndim]) + dims, array.tobytes()


def encode(values: Sequence[Any]) -> bytes:
    parts = [MAGIC, _COUNT.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(_HEAD.pack(NONE, 0))
        elif isinstance(value, str):
            data = value.encode("utf-8")
            parts += [_HEAD.pack(STR, len(data)), data]
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            parts += [_HEAD.pack(BYTES, len(data)), data]
        elif isinstance(value, ItemError):
            data = value.message.encode("utf-8")
            parts += [_HEAD.pack(ERROR, len(data)), data]
        elif hasattr(value, "__array__") or type(value).__module__ == "numpy":
            header, data = _array_parts(value)
            parts += [_HEAD.pack(ARRAY, len(header) + len(data)), header, data]
        else:
            try:
                data = json.dumps(value, separators=(",", ":")).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise WireError(f"cannot send a {type(value).__name__}: {exc}") from None
            parts += [_HEAD.pack(JSON, len(data)), data]
    return b"".join(parts)


def _decode_array(payload: memoryview) -> Any:
    import numpy as np

    size = payload[0]
    dtype = np.dtype(bytes(payload[1 : 1 + size]).decode("ascii"))
    offset = 1 + size
    ndim = payload[offset]
    offset += 1
    shape = tuple(_DIM.unpack_from(payload, offset + 8 * i)[0] for i in range(ndim))
    offset += 8 * ndim
    return np.frombuffer(payload[offset:], dtype=dtype).reshape(shape).copy()


def decode(body: bytes) -> list[Any]:
    if body[:4] != MAGIC or len(body) < 8:
        raise WireError("not a fleet values body")
    view = memoryview(body)
    (count,) = _COUNT.unpack_from(view, 4)
    offset = 8
    values: list[Any] = []
    try:
        for _ in range(count):
            tag, length = _HEAD.unpack_from(view, offset)
            offset += _HEAD.size
            payload = view[offset : offset + length]
            if len(payload) != length:
                raise WireError("truncated body")
            offset += length
            if tag == NONE:
                values.append(None)
            elif tag == STR:
                values.append(str(payload, "utf-8"))
            elif tag == BYTES:
                values.append(bytes(payload))
            elif tag == JSON:
                values.append(json.loads(bytes(payload)))
            elif tag == ARRAY:
                values.append(_decode_array(payload))
            elif tag == ERROR:
                values.append(ItemError(str(payload, "utf-8")))
            else:
                raise WireError(f"unknown value tag {tag}")
    except struct.error:
        raise WireError("truncated body") from None
    if offset != len(body):
        raise WireError("trailing bytes after the values")
    return values
