"""The bundled batch worker: runs ON the nodes, never imports the control plane.

`python -m fleet.worker JOB_DIR` (or `fleet-worker JOB_DIR`) processes the job whose
directory is JOB_DIR on the shared filesystem until no work is left. Modules:

- `config`   the `worker:` section of a job.yaml (pydantic, no torch)
- `layout`   paths and file formats under JOB_DIR (chunks, claims, done, failures, metrics)
- `inputs`   freezing the input set into a stable chunk list; reading items
- `claims`   the work queue: claims with leases, takeover of stale claims, done
             markers, skip-if-done from directory listings, `--status`
- `batcher`  the reusable thread-safe `DynamicBatcher`
- `handlers` the handler plugin interface and the bundled `text-embed` / `checksum`
- `pipeline` reader threads -> batcher -> model -> writer threads, chunks flowing together
- `bulk`     `io: bulk`: a chunk's inputs and outputs cross the mount as one pack each
- `packer`   the head's side of bulk I/O (`python -P -m fleet.worker.packer JOB_DIR`)
- `metrics`  the JSON-lines metrics and failure logs (format in its docstring)
- `runner`   one worker process: claim, process, mark done, repeat; graceful stop
- `errors`   WorkerError (fatal, exit 2) and WorkerFailed (exit 1)
- `__main__` the CLI, with one process per GPU

torch is imported lazily, only by the handlers that need it.
"""

from typing import Any

__all__ = ["WorkerConfig"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m fleet.worker.sampler` and `.notice` start without pydantic.
    if name == "WorkerConfig":
        from fleet.worker.config import WorkerConfig

        return WorkerConfig
    raise AttributeError(name)
