"""The `serve:` section of a job.yaml: a model served on the nodes, called item by item.

    serve:
      handler: text-embed          # any handler the worker knows, plug-ins too
      batch_size: 64
      max_wait_ms: 5
      processes_per_node: auto     # one model per GPU (one process on a CPU node)

The job spec (`fleet.spec.job`) embeds `ServeConfig` as its `serve:` field beside
`worker:` and `run:`; the node's server (`fleet.worker.serve`) reads only this section.
No torch here: the control plane imports this.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet.worker.config import DEVICE_PATTERN, HANDLER_PATTERN


class ServeConfig(BaseModel):
    """How the nodes serve a model (the `serve:` section of job.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    handler: str = Field(
        pattern=HANDLER_PATTERN,
        description=(
            "The model to serve: a bundled handler ('text-embed', 'checksum') or "
            "'package.module:factory' (a callable returning a fleet.worker.handlers.Handler). "
            "Its `load` and `infer` are used; outputs are returned, never written."
        ),
    )
    handler_options: dict[str, Any] = Field(
        default_factory=dict, description="Options passed to the handler (as for `worker:`)."
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Largest batch handed to the model.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=60_000,
        description="How long a partial batch waits for more items from any caller before it runs.",
    )
    processes_per_node: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = Field(
        "auto",
        description="Model processes on each node: 'auto' (one per GPU, else 1) or a number; "
        "each process holds one copy of the model (the model pool).",
    )
    device: str = Field(
        "auto", pattern=DEVICE_PATTERN, description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."
    )
    max_pending: int = Field(
        4096, ge=1, le=10_000_000,
        description="Items a process holds at most (queued or running); beyond it callers wait.",
    )
    drain_seconds: float = Field(
        120.0, gt=0, le=86_400,
        description="On SIGTERM or a preemption notice, how long a server finishes what it holds "
        "(it accepts nothing new) before it exits anyway.",
    )
