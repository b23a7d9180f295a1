"""`fleet.connect(spec)`: a program's handle on a running fleet.

A `Connection` owns what the CLI's commands use for one invocation (the `Fleet`: its
spec, local state and SSH executor with pinned host keys), for as long as the program
runs. Clients of what runs on the fleet hang off it: `serving(name)` for the models of
`fleet serve`, `ray` for the fleet's Ray cluster (`fleet.ray.client`). Close it (or use
it as a context manager) to close the SSH connections.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from fleet.fleetops import Fleet
from fleet.serve.errors import ServingError
from fleet.spec.loader import load_fleet_spec

DEFAULT_TIMEOUT_S = 60.0


class Connection:
    """A running fleet, seen from a program on the laptop (thread-safe)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        fleet.executor  # noqa: B018 - built now: the threads that use it later must share one
        self._servings: list[Any] = []
        self._ray: Any = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return self.fleet.spec.name

    def serving(
        self,
        name: str,
        *,
        preprocess: Callable[[Any], Any] | None = None,
        postprocess: Callable[[Any], Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        """The model that `fleet serve` serves under the job name `name`. `preprocess`
        and `postprocess` run in the calling thread, per item; `timeout` is each
        request's deadline in seconds (`batched_run(..., timeout=)` overrides it)."""
        from fleet.jobs import job_from_state
        from fleet.serve.client import Serving

        if self._closed:
            raise ServingError("the connection is closed")
        if self.fleet.state.job(name) is None:
            raise ServingError(f"no serving named {name!r} on fleet {self.name}",
                               hint="`fleet serve JOB.yaml` starts one; `fleet jobs` lists what was started")
        job = job_from_state(self.fleet, name)
        if job.serve is None:
            raise ServingError(f"job {name!r} of fleet {self.name} is a batch job, not a serving",
                               hint="a serving is a job with a `serve:` section, started by `fleet serve`")
        serving = Serving(self, job, preprocess=preprocess, postprocess=postprocess, timeout=timeout)
        with self._lock:
            self._servings.append(serving)
        return serving

    @property
    def ray(self):
        """The fleet's Ray cluster (`ray: {enabled: true}`): `dashboard_url`, `jobs_client()`."""
        from fleet.ray.client import RayHandle

        with self._lock:
            if self._closed:
                raise ServingError("the connection is closed")
            if self._ray is None:
                self._ray = RayHandle(self.fleet)
            return self._ray

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            servings, self._servings = self._servings, []
            ray, self._ray = self._ray, None
        for serving in servings:
            serving.close()
        if ray is not None:
            ray.close()
        self.fleet.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(spec: str | Path = "fleet.yaml") -> Connection:
    """Open the fleet that `spec` (its fleet.yaml) describes; it must be up already."""
    path = Path(spec)
    return Connection(Fleet(load_fleet_spec(path), path))
