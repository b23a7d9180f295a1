"""`fleet.connect("fleet.yaml").ray`: the fleet's Ray cluster, seen from a program.

    with fleet.connect("fleet.yaml") as f:
        print(f.ray.dashboard_url)                 # http://127.0.0.1:<port>, through SSH
        client = f.ray.jobs_client()               # ray.job_submission.JobSubmissionClient
        job = client.submit_job(entrypoint="python prog.py", runtime_env={"working_dir": "."})
        f.ray.jobs.logs(job)                       # or fleet's own HTTP client (no Ray needed)

One tunnel (a local port forwarded to the head's loopback dashboard) is opened on first
use and closed with the connection. `jobs_client()` imports `ray` (install `fleet[ray]`);
nothing else here does. With `auth: token` every request carries the fleet's token.
"""

from __future__ import annotations

import threading
from typing import Any

from fleet.errors import UsageError
from fleet.ray.cluster import RayCluster, RayNode
from fleet.ray.tunnel import LocalForward
from fleet.worker.ray_jobs import RayJobs


class RayHandle:
    """The Ray cluster of a connected fleet (thread-safe; closed with the connection)."""

    def __init__(self, fleet: Any) -> None:
        self.cluster = RayCluster(fleet)
        self._tunnel: LocalForward | None = None
        self._lock = threading.Lock()

    def _forward(self) -> LocalForward:
        with self._lock:
            if self._tunnel is None:
                head = self.cluster.head()
                self._tunnel = LocalForward(self.cluster.fleet.executor, self.cluster.fleet.target(head),
                                            self.cluster.spec.dashboard_port)
            return self._tunnel

    @property
    def dashboard_url(self) -> str:
        """The head's dashboard (and Jobs API) as this machine reaches it."""
        return self._forward().url

    @property
    def headers(self) -> dict[str, str]:
        token = self.cluster.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def jobs(self) -> RayJobs:
        """fleet's Jobs API client (standard library only)."""
        return RayJobs(self.dashboard_url, self.cluster.token())

    def jobs_client(self) -> Any:
        """Ray's own `JobSubmissionClient`, through the tunnel, with the fleet's token."""
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise UsageError("Ray's JobSubmissionClient needs ray on this machine",
                             hint="pip install 'fleet-batch[ray]' (or use .jobs, which needs no ray)") from None
        return JobSubmissionClient(self.dashboard_url, headers=self.headers)

    def nodes(self) -> list[RayNode]:
        return self.cluster.nodes(self.jobs)

    def close(self) -> None:
        with self._lock:
            tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.close()
