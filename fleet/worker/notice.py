"""The preemption-notice watcher: runs on a node beside the job's processes.

It turns the provider's notice into SIGTERM for the job's process group, so that the
worker stops claiming and finishes or releases the chunk in hand before the machine
goes away:

- GCP: the metadata server's long poll `instance/preempted?wait_for_change=true`
  (header `Metadata-Flavor: Google`) answers `TRUE` on preemption (~30 s notice).
- AWS: IMDSv2 (`PUT /latest/api/token`, then `GET /latest/meta-data/spot/instance-action`
  every 2 s; 404 = no notice, 200 = an interruption in ~2 minutes).
- local: no watcher is needed: `fleet preempt --notice` sends SIGTERM to the node's
  programs itself, the way a cloud's ACPI soft-off does.

The endpoints honour the standard overrides `GCE_METADATA_HOST` (google-auth) and
`AWS_EC2_METADATA_SERVICE_ENDPOINT` (botocore), which is how the tests point it at the
fake metadata servers of `fleet.testing`. Stdlib only: it starts on a bare node.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

POLL_SECONDS_AWS = 2.0


def gce_base() -> str:
    host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
    return host if host.startswith("http") else f"http://{host}"


def aws_base() -> str:
    return os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")


def wait_gce(stop: Callable[[], bool], *, long_poll_s: int = 60) -> str | None:
    """Block until GCE says the instance is preempted; returns a description.

    The first read returns at once (the notice may have come before the watcher
    started); later reads are long polls from the last ETag, as the metadata server
    documents, so that a change between two polls is never missed."""
    base = f"{gce_base()}/computeMetadata/v1/instance/preempted"
    etag: str | None = None  # None: nothing read yet
    while not stop():
        if etag is None:
            url = base
        else:
            url = f"{base}?wait_for_change=true&timeout_sec={long_poll_s}" + (f"&last_etag={etag}" if etag else "")
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(request, timeout=long_poll_s + 15) as response:
                if response.read().decode().strip().upper() == "TRUE":
                    return "GCE metadata: instance/preempted is TRUE"
                etag = response.headers.get("ETag", "")
        except (urllib.error.URLError, OSError):
            etag = None
            time.sleep(2)
    return None


def _aws_token() -> str:
    request = urllib.request.Request(
        f"{aws_base()}/latest/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def wait_aws(stop: Callable[[], bool], poll: float = POLL_SECONDS_AWS) -> str | None:
    token = ""
    while not stop():
        try:
            if not token:
                token = _aws_token()
            request = urllib.request.Request(
                f"{aws_base()}/latest/meta-data/spot/instance-action",
                headers={"X-aws-ec2-metadata-token": token},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                body = response.read().decode()
                try:
                    action = json.loads(body)
                except ValueError:
                    action = {"action": body}
                return f"EC2 spot interruption notice: {action.get('action')} at {action.get('time', '?')}"
        except urllib.error.HTTPError as error:
            if error.code == 401:
                token = ""
        except (urllib.error.URLError, OSError):
            token = ""
        time.sleep(poll)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.worker.notice")
    parser.add_argument("--provider", choices=["gcp", "aws"], required=True)
    parser.add_argument("--pgid", type=int, required=True, help="process group to SIGTERM on notice")
    args = parser.parse_args(argv)
    stopping = False

    def on_signal(signum, frame) -> None:  # the job ended or the node is going down anyway
        nonlocal stopping
        stopping = True
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def group_gone() -> bool:
        # The group's leader (the launcher, started with setsid) is what we watch: the
        # group itself never empties while this watcher, one of its members, runs.
        try:
            os.kill(args.pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return stopping

    wait = wait_gce if args.provider == "gcp" else wait_aws
    why = wait(group_gone)
    if why is None:
        return 0
    print(f"fleet notice: {why}; stopping the job's processes", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(args.pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
