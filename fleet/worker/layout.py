"""Where everything of a job lives on the shared filesystem, and how it is written.

    <shared root>/                 JOB_DIR/../.. ; relative inputs/outputs resolve here
      jobs/<job>/                  JOB_DIR
        job.yaml                   the job spec; the worker reads only its `worker:` section
        chunks.json                the frozen chunk list (see `fleet.worker.inputs`)
        claims/<chunk>             a worker holds the chunk: exclusive create, body JSON
                                   {"node", "proc", "pid", "token", "t"}, mtime = heartbeat
        claims/.prev.<chunk>.<tok> a released or taken-over claim, kept as a hint that the
                                   chunk has partial outputs (the next holder skips them)
        claims/.take.<chunk>.<tok>.<n>   the lock one taker of a stale claim holds
        done/<chunk>               written after every output of the chunk is in place; body
                                   JSON {"items", "failed", "skipped", "node", "proc", "seconds", "token"}
        failures/<node>.<proc>.jsonl   one line per failed item (one writer per file)
        metrics/<node>.worker<proc>.jsonl   stage timings (format: `fleet.worker.metrics`)
        bulk/                      `io: bulk` packs and the head packer's heartbeat
                                   (protocol in `fleet.worker.bulk`)

Every file another process reads is written under a temporary name (a dot name ending in
`.tmp`, which listings and skip-scans ignore) and renamed into place. Names starting with
a dot are never claims, done markers or outputs.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fleet.worker.config import WorkerConfig
from fleet.worker.errors import WorkerError
from fleet.worker.yamlbound import AliasExpansionError, safe_load_bounded

SectionModel = TypeVar("SectionModel", bound=BaseModel)

TMP_SUFFIX = ".tmp"


def is_hidden(name: str) -> bool:
    """Temporary files, set-aside claims: everything a listing must ignore."""
    return name.startswith(".")


def tmp_name_for(final: Path) -> Path:
    """A unique temporary name next to `final` (same directory, so rename is atomic)."""
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def write_atomic(final: Path, data: bytes) -> None:
    """Write `data` to a temporary name, then rename it onto `final`."""
    tmp = tmp_name_for(final)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_exclusive(final: Path, data: bytes) -> bool:
    """Write `data` to a temporary name, then publish it as `final` only if `final` does
    not exist yet (hard link, atomic). Returns True if ours won. Falls back to rename
    where the filesystem has no hard links (the caller must re-read `final`)."""
    tmp = tmp_name_for(final)
    with open(tmp, "wb") as handle:
        handle.write(data)
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError:
        if final.exists():
            return False
        os.replace(tmp, final)
        return True
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def listdir_visible(path: Path) -> list[str]:
    """Names in `path` that are not hidden; a missing directory lists as empty."""
    try:
        return [name for name in os.listdir(path) if not is_hidden(name)]
    except FileNotFoundError:
        return []


@dataclass(frozen=True)
class JobLayout:
    """The paths of one job directory."""

    job_dir: Path

    @classmethod
    def at(cls, job_dir: str | os.PathLike[str]) -> JobLayout:
        return cls(Path(os.path.abspath(job_dir)))

    @property
    def shared_root(self) -> Path:
        return self.job_dir.parent.parent

    @property
    def job_name(self) -> str:
        return self.job_dir.name

    @property
    def job_yaml(self) -> Path:
        return self.job_dir / "job.yaml"

    @property
    def chunks_json(self) -> Path:
        return self.job_dir / "chunks.json"

    @property
    def claims(self) -> Path:
        return self.job_dir / "claims"

    @property
    def done(self) -> Path:
        return self.job_dir / "done"

    @property
    def failures(self) -> Path:
        return self.job_dir / "failures"

    @property
    def metrics(self) -> Path:
        return self.job_dir / "metrics"

    def resolve(self, path: str) -> Path:
        """A path of the job spec: relative ones live under the shared root."""
        expanded = os.path.expanduser(path)
        return Path(expanded) if os.path.isabs(expanded) else self.shared_root / expanded

    def failures_file(self, node: str, proc: int) -> Path:
        return self.failures / f"{node}.{proc}.jsonl"

    def metrics_file(self, node: str, proc: int) -> Path:
        return self.metrics / f"{node}.worker{proc}.jsonl"

    def make_dirs(self) -> None:
        for path in (self.claims, self.done, self.failures, self.metrics):
            path.mkdir(parents=True, exist_ok=True)


def load_worker_config(layout: JobLayout) -> WorkerConfig:
    """The `worker:` section of JOB_DIR/job.yaml; every other key is ignored."""
    return load_job_section(layout, "worker", WorkerConfig, "this job does not use the bundled worker")


def load_job_section(layout: JobLayout, section: str, model: type[SectionModel], absent: str) -> SectionModel:
    """One section of JOB_DIR/job.yaml (aliases bounded), validated by `model`; `absent`
    says what a job without that section is."""
    path = layout.job_yaml
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkerError(f"{path}: no such file (is {layout.job_dir} a job directory?)") from None
    except OSError as exc:
        raise WorkerError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data: Any = safe_load_bounded(text)
    except AliasExpansionError as exc:
        raise WorkerError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise WorkerError(f"{where}: {problem}") from None
    if not isinstance(data, dict) or data.get(section) is None:
        raise WorkerError(f"{path}: no `{section}:` section ({absent})")
    try:
        return model.model_validate(data[section])
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in (section, *first["loc"]))
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise WorkerError(f"{path}: {field}: {first['msg']}{more}") from None


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
