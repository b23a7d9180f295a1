"""The handler plugin interface: load an item, infer a batch, save an output.

A job chooses its handler by a bundled name (`text-embed`, `checksum`) or by
`package.module:factory`, a callable that takes the job's `handler_options` as keyword
arguments and returns a `Handler`. The pipeline calls, in this order:

- `open(context)` once, in the worker process, before the first batch (load the model
  here: a job that is already finished never loads it);
- `load(data)` in reader threads, per item: `data` is the file's bytes (files mode) or
  the record's value (records mode: a str, or the JSON value of the `field`). Raise to
  fail this item only;
- `prepare(items)` in reader threads too, on a group of loaded items (one file, or a
  records segment's worth): the CPU work that feeds the model, e.g. tokenising, done
  ahead of the compute thread. Several reader threads call it at once: keep per-thread
  state (a tokenizer per thread) in a `threading.local`. Default: the items unchanged.
  If it raises, it is called again item by item to isolate the failing ones;
- `size(item)` (of a prepared item) is its length for bucketing and the unit of the
  token budget `max_batch_tokens` (a batch costs count x longest); 0: no bucketing;
- `infer_async(batch)` in the compute thread: starts the batch and returns a `Pending`
  whose `result()` gives one result per item, same order. The compute thread starts the
  next batch before it waits on this one's result, so copies back and the CPU's next
  collate overlap the device's work. The default runs `infer(batch)` at once.
  `Pending.device_s` is the model's time on the device (CUDA events), when known. If a
  batch raises, it is split to isolate the failing items; CUDA out-of-memory also
  lowers the batch's token budget (`on_out_of_memory()` is called first, outside the
  except block, so that the failed pass's activations can be freed). A CUDA error that
  is not out-of-memory (`is_device_failure`) is fatal for the process: its chunks are
  released and it exits with `DeviceFailed.exit_code` (3), to be restarted fresh;
- `serialize(result)` (files mode: one output per input, named `<input>` +
  `file_suffix`) or `serialize_rows(results)` (records mode: one output per chunk,
  `<chunk>` + `rows_suffix`) in writer threads, returning the bytes to write.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fleet.worker.errors import WorkerError


@dataclass(frozen=True)
class HandlerContext:
    device: str  # resolved: "cpu", "cuda", "cuda:1"
    shared_root: Path
    node: str
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (see resolve_dtype)


class Pending:
    """A batch started on the device; `result()` waits for it. `device_s`: the model's
    device time for the batch once `result()` returned (None where not measured)."""

    device_s: float | None = None

    def __init__(self, results: Sequence[Any], device_s: float | None = None) -> None:
        self._results = results
        self.device_s = device_s

    def result(self) -> Sequence[Any]:
        return self._results


class Handler(ABC):
    """Base class of handlers (see the module docstring for the call order)."""

    file_suffix: ClassVar[str] = ".npy"
    rows_suffix: ClassVar[str] = ".npy"
    uses_device: ClassVar[bool] = True  # False: never import torch to pick a device

    def open(self, context: HandlerContext) -> None:
        """Load the model (once per worker process)."""

    def load(self, data: Any) -> Any:
        return data

    def prepare(self, items: list[Any]) -> list[Any]:
        """CPU work ahead of the model (tokenising), in reader threads: one prepared
        item per item, same order."""
        return items

    def size(self, item: Any) -> int:
        return 0

    def digest(self, item: Any) -> bytes:
        """Content hash for memoization."""
        if isinstance(item, (bytes, bytearray, memoryview)):
            return hashlib.sha256(item).digest()
        if isinstance(item, str):
            return hashlib.sha256(item.encode()).digest()
        return hashlib.sha256(pickle.dumps(item)).digest()

    @abstractmethod
    def infer(self, batch: list[Any]) -> Sequence[Any]:
        """One result per (prepared) item of the batch, in order."""

    def infer_async(self, batch: list[Any]) -> Pending:
        """Start the batch; the default computes it at once (timed on the wall clock)."""
        started = time.perf_counter()
        results = self.infer(batch)
        return Pending(results, time.perf_counter() - started)

    @abstractmethod
    def serialize(self, result: Any) -> bytes:
        """Bytes of one output file (files mode)."""

    @abstractmethod
    def serialize_rows(self, results: list[Any]) -> bytes:
        """Bytes of a chunk's output file, one row per result (records mode)."""

    def on_out_of_memory(self) -> None:
        """Free what can be freed after an out-of-memory error."""

    def close(self) -> None:
        """Release the model."""


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or the older RuntimeError form), without importing torch."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


_DEVICE_FAILURE = re.compile(
    r"CUDA error|device-side assert|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|NCCL error|"
    r"illegal memory access|unspecified launch failure|uncorrectable ECC|GPU has fallen off|"
    r"CUDA driver error|an illegal instruction"
)


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error that is not out-of-memory: the process's CUDA context is broken
    (illegal address, device-side assert, ECC, Xid), so every later batch would fail
    too. torch raises `torch.AcceleratorError` (a RuntimeError) for these; older
    releases a plain RuntimeError whose message starts "CUDA error". No torch import."""
    if is_out_of_memory(exc):
        return False
    if type(exc).__name__ == "AcceleratorError":
        return True
    return isinstance(exc, RuntimeError) and bool(_DEVICE_FAILURE.search(str(exc)))


def load_handler(name: str, options: dict[str, Any]) -> Handler:
    """Build the handler a job names. Raises WorkerError on any problem."""
    if name == "text-embed":
        from fleet.worker.handlers.text_embed import TextEmbedHandler as factory
    elif name == "checksum":
        from fleet.worker.handlers.checksum import ChecksumHandler as factory  # type: ignore[assignment]
    else:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise WorkerError(f"handler {name!r}: cannot import {module_name}: {exc}") from None
        factory = getattr(module, attr, None)  # type: ignore[assignment]
        if not callable(factory):
            raise WorkerError(f"handler {name!r}: {module_name} has no callable {attr!r}")
    try:
        handler = factory(**options)
    except TypeError as exc:
        raise WorkerError(f"handler {name!r}: bad handler_options: {exc}") from None
    except WorkerError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user plugin's constructor
        raise WorkerError(f"handler {name!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(handler, Handler):
        raise WorkerError(
            f"handler {name!r}: the factory returned a {type(handler).__name__}, "
            "not a fleet.worker.handlers.Handler (subclass it)"
        )
    return handler


def resolve_device(requested: str, uses_device: bool) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'. Imports torch only if needed."""
    if not uses_device:
        return "cpu"
    if requested == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        if requested == "auto":
            return "cpu"
        raise WorkerError(f"device {requested!r} needs torch, which is not installed") from None
    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise WorkerError(f"device {requested!r} requested but CUDA is not available on this node")
    if ":" in requested and int(requested.split(":")[1]) >= torch.cuda.device_count():
        raise WorkerError(f"device {requested!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    """The compute dtype for a resolved device: `auto` is bfloat16 on a CUDA GPU that
    supports it (Ampere and later), else float32 (CPU, older GPUs: float16 must be asked
    for). float16/bfloat16 on the CPU run, slowly and only if asked for."""
    if requested != "auto":
        return requested
    if not device.startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
