"""Ray's Jobs REST API with the standard library only, and the node side of a `ray:` job.

`RayJobs(base_url, token)` speaks the dashboard's Jobs API (`/api/jobs/`, packages in
the GCS, logs, stop) and the state API's node list: the control plane uses it through
the SSH tunnel to the head (`fleet.ray`), so the laptop needs no Ray; the head uses it
on its loopback for `ray:` jobs of `fleet run`:

    python -m fleet.worker.ray_jobs follow     (the job launcher's command, every node)

On the head it submits the job (or finds the run an earlier start submitted), streams
the job's output to stdout (the launcher's `logs/<head>.log`) and exits with the job's
result: 0 when it SUCCEEDED, the driver's exit code (or 1) otherwise. SIGTERM (`fleet
cancel`, a preemption notice) stops the Ray job first. On a worker it only waits, beside
the sampler that the launcher runs, until the head's launcher has finished. The job's
submission (entrypoint, runtime_env) comes from the `FLEET_RAY_JOB` variable of the
job's env.sh, which the control plane writes into the node's own ~/.fleet/jobs/<job>/
(never read from the shared directory); the working directory's zip lies there too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The dashboard is always on a loopback (the head's, or this end of the tunnel): no proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PACKAGE_PREFIX = "gcs://_ray_pkg_"
NODE_RAY_DIR = ".fleet/ray"  # under a node's home: the node's Ray launcher, token, role, log


class RayApiError(Exception):
    """The Jobs API answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def package_uri(data: bytes) -> str:
    """The GCS URI of a working-dir zip, named by its content like Ray's own client does."""
    return f"{PACKAGE_PREFIX}{hashlib.sha1(data).hexdigest()}.zip"


class RayJobs:
    """A client of one Ray head's dashboard (Jobs API, state API)."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", timeout: float | None = None) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method=method,
                                         headers={**self.headers, "Content-Type": content_type})
        try:
            with _OPENER.open(request, timeout=timeout or self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace").strip().splitlines()
            raise RayApiError(f"{method} {path}: HTTP {exc.code}: {text[-1] if text else exc.reason}",
                              exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RayApiError(f"{method} {path}: the Ray dashboard does not answer: {reason}") from None

    def _json(self, method: str, path: str, payload: Any = None) -> Any:
        body = json.dumps(payload).encode() if payload is not None else None
        return json.loads(self._request(method, path, body) or b"null")

    # -- cluster ----------------------------------------------------------------------------
    def version(self, timeout: float | None = None) -> dict[str, Any]:
        return json.loads(self._request("GET", "/api/version", timeout=timeout))

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the GCS knows, alive or dead (the state API)."""
        answer = self._json("GET", "/api/v0/nodes?detail=1&limit=10000")
        return list(answer["data"]["result"]["result"])

    # -- jobs -------------------------------------------------------------------------------
    def upload_package(self, data: bytes) -> str:
        """Put a working-dir zip into the GCS; returns its gcs:// URI."""
        uri = package_uri(data)
        self._request("PUT", f"/api/packages/gcs/{uri.removeprefix('gcs://')}", data,
                      content_type="application/octet-stream", timeout=max(self.timeout, 300))
        return uri

    def submit(self, entrypoint: str, *, runtime_env: dict[str, Any] | None = None,
               submission_id: str | None = None, metadata: dict[str, str] | None = None) -> str:
        payload: dict[str, Any] = {"entrypoint": entrypoint, "runtime_env": runtime_env or {}}
        if submission_id:
            payload["submission_id"] = submission_id
        if metadata:
            payload["metadata"] = metadata
        return str(self._json("POST", "/api/jobs/", payload)["submission_id"])

    def info(self, submission_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/jobs/{submission_id}")

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/api/jobs/"))

    def logs(self, submission_id: str) -> str:
        return str(self._json("GET", f"/api/jobs/{submission_id}/logs").get("logs", ""))

    def stop(self, submission_id: str) -> bool:
        return bool(self._json("POST", f"/api/jobs/{submission_id}/stop").get("stopped", False))

    def follow(self, submission_id: str, on_text: Callable[[str], None], *, poll_s: float = 1.0,
               should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Stream the job's output to `on_text` until it ends; returns its last info."""
        shown = 0
        while True:
            info = self.info(submission_id)
            text = self.logs(submission_id)
            if len(text) > shown:
                on_text(text[shown:])
                shown = len(text)
            if info.get("status") in TERMINAL or should_stop():
                if info.get("status") in TERMINAL:  # the last lines may come after the status
                    text = self.logs(submission_id)
                    if len(text) > shown:
                        on_text(text[shown:])
                return info
            time.sleep(poll_s)


def exit_code(info: dict[str, Any]) -> int:
    """The exit code a job's end maps to: 0 SUCCEEDED, else the driver's code (or 1)."""
    if info.get("status") == "SUCCEEDED":
        return 0
    code = info.get("driver_exit_code")
    return int(code) if isinstance(code, int) and code > 0 else 1


# -- the node side of `ray:` jobs ------------------------------------------------------------
def _node_token() -> str | None:
    path = Path.home() / NODE_RAY_DIR / "token"
    return path.read_text().strip() if path.exists() else None


def _find_or_submit(api: RayJobs, job: str, spec: dict[str, Any], node_dir: Path) -> str | None:
    """The run of this fleet job to follow: one still going, or a new one; None when a run
    already SUCCEEDED (a finished job is not run again)."""
    runs = [j for j in api.jobs() if (j.get("metadata") or {}).get("fleet_job") == job]
    runs.sort(key=lambda j: int((j.get("metadata") or {}).get("fleet_attempt", "0")))
    if runs:
        last = runs[-1]
        if last.get("status") not in TERMINAL:
            return str(last["submission_id"])
        if last.get("status") == "SUCCEEDED":
            return None
    attempt = int((runs[-1].get("metadata") or {}).get("fleet_attempt", "0")) + 1 if runs else 1
    runtime_env = dict(spec.get("runtime_env") or {})
    package = node_dir / "working_dir.zip"
    if spec.get("working_dir") and package.exists():
        runtime_env["working_dir"] = api.upload_package(package.read_bytes())
    return api.submit(spec["entrypoint"], runtime_env=runtime_env, submission_id=f"{job}-{attempt}",
                      metadata={"fleet_job": job, "fleet_attempt": str(attempt)})


def follow_main() -> int:
    spec = json.loads(os.environ["FLEET_RAY_JOB"])
    job = os.environ["FLEET_JOB"]
    node = os.environ.get("FLEET_NODE_NAME", "")
    stopping = {"now": False}

    def on_term(signum: int, frame: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if node != spec["head"]:
        # A worker: the sampler beside this process covers the node until the head is done.
        while not stopping["now"] and not Path(f"status/{spec['head']}.exit").exists() \
                and not Path("cancelled").exists():
            time.sleep(2)
        return 143 if stopping["now"] else 0
    api = RayJobs(f"http://127.0.0.1:{spec['port']}", _node_token())
    deadline = time.monotonic() + 120
    while True:  # the dashboard may still be starting (a head that was just replaced)
        try:
            api.version(timeout=5)
            break
        except RayApiError as exc:
            if time.monotonic() > deadline or stopping["now"]:
                print(f"fleet-ray: {exc}", file=sys.stderr, flush=True)
                return 1
            time.sleep(1)
    submission = _find_or_submit(api, job, spec, Path.home() / ".fleet" / "jobs" / job)
    if submission is None:
        print(f"fleet-ray: job {job} already succeeded", flush=True)
        return 0
    print(f"fleet-ray: following Ray job {submission}", flush=True)
    info = api.follow(submission, lambda text: (sys.stdout.write(text), sys.stdout.flush()),
                      should_stop=lambda: stopping["now"])
    if stopping["now"] and info.get("status") not in TERMINAL:
        api.stop(submission)
        print(f"fleet-ray: stopped Ray job {submission}", flush=True)
        return 143
    print(f"fleet-ray: Ray job {submission} {info.get('status')}: {info.get('message') or ''}", flush=True)
    return exit_code(info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet-ray-job", description="The node side of a `ray:` job.")
    parser.add_argument("action", choices=["follow"])
    parser.parse_args(argv)
    try:
        return follow_main()
    except RayApiError as exc:
        print(f"fleet-ray: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
