"""Fake instance metadata servers on loopback, for the preemption-notice watchers.

One HTTP server answers both clouds' paths, the way they answer them on a VM:

- GCE: `GET /computeMetadata/v1/instance/preempted` (header `Metadata-Flavor: Google`
  required, 403 without) answers `FALSE` or `TRUE`; with `?wait_for_change=true` it
  long-polls until the value changes (or `timeout_sec`), like the real server;
  `instance/maintenance-event` likewise (`NONE` / `TERMINATE_ON_HOST_MAINTENANCE`).
- EC2 IMDSv2: `PUT /latest/api/token` (header `X-aws-ec2-metadata-token-ttl-seconds`)
  returns a token; `GET /latest/meta-data/spot/instance-action` with header
  `X-aws-ec2-metadata-token` answers 404 until an interruption is announced, then
  `{"action": "terminate", "time": "...Z"}`; 401 without a valid token.
  `/latest/meta-data/events/recommendations/rebalance` likewise.

Trigger a notice in-process (`preempt()`, `interrupt_spot()`, `rebalance()`) or over
HTTP (`POST /_fake/preempt`, `/_fake/spot-interrupt` with `{"action", "in_s"}`,
`/_fake/rebalance`, `/_fake/reset`). Watchers find it the standard way: google-auth's
`GCE_METADATA_HOST=127.0.0.1:PORT`, botocore's
`AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:PORT/`.
Run as `python -m fleet.testing.fake_metadata --port PORT`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

_GCE = "/computeMetadata/v1/instance/"


class FakeMetadata:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._changed = threading.Condition()
        self.values = {"preempted": "FALSE", "maintenance-event": "NONE"}
        self.versions = {"preempted": 0, "maintenance-event": 0}
        self.spot_action: dict[str, str] | None = None
        self.rebalance_at: str | None = None
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}/"

    def start(self) -> FakeMetadata:
        threading.Thread(target=self._server.serve_forever, name="fake-metadata", daemon=True).start()
        return self

    def stop(self) -> None:
        with self._changed:
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- triggers ----------------------------------------------------------------------
    def _set(self, key: str, value: str) -> None:
        with self._changed:
            if self.values[key] != value:
                self.values[key] = value
                self.versions[key] += 1
                self._changed.notify_all()

    def preempt(self) -> None:
        """GCE: the preemption notice (`preempted` becomes TRUE)."""
        self._set("preempted", "TRUE")

    def maintenance(self, event: str = "TERMINATE_ON_HOST_MAINTENANCE") -> None:
        self._set("maintenance-event", event)

    def interrupt_spot(self, action: str = "terminate", in_s: float = 120.0) -> None:
        """EC2: announce a spot interruption `in_s` seconds from now."""
        when = datetime.now(UTC) + timedelta(seconds=in_s)
        with self._changed:
            self.spot_action = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def rebalance(self) -> None:
        with self._changed:
            self.rebalance_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def reset(self) -> None:
        with self._changed:
            self.spot_action = self.rebalance_at = None
        self._set("preempted", "FALSE")
        self._set("maintenance-event", "NONE")

    # -- reads -------------------------------------------------------------------------
    def wait_value(self, key: str, last: str | None, timeout: float) -> str:
        """The value once it differs from `last` (the caller's), or after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            current = self.values[key]
            while last is not None and current == last:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 1.0))
                current = self.values[key]
            return current

    def token_valid(self, token: str | None) -> bool:
        return token is not None and self.tokens.get(token, 0.0) > time.monotonic()


def _handler_for(fake: FakeMetadata) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
            data = text.encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            fake.requests.append(("GET", url.path))
            if url.path.startswith(_GCE):
                self._gce(url.path.removeprefix(_GCE), query)
            elif url.path.startswith("/latest/meta-data/"):
                self._ec2(url.path.removeprefix("/latest/meta-data/"))
            else:
                self._reply(404, "not found")

        def _gce(self, key: str, query: dict[str, str]) -> None:
            if self.headers.get("Metadata-Flavor") != "Google":
                self._reply(403, "Missing Metadata-Flavor:Google header.")
                return
            if key not in fake.values:
                self._reply(404, "not found")
                return
            value = fake.values[key]
            if query.get("wait_for_change", "").lower() == "true":
                last = query.get("last_etag")
                # Without last_etag (or with the current one) wait for the next change.
                if last is None or last == _etag(key, value):
                    value = fake.wait_value(key, value, float(query.get("timeout_sec", 3600)))
            self._reply(200, value, {"Metadata-Flavor": "Google", "ETag": _etag(key, value),
                                     "Content-Type": "application/text"})

        def _ec2(self, key: str) -> None:
            if not fake.token_valid(self.headers.get("X-aws-ec2-metadata-token")):
                self._reply(401, "")
                return
            if key == "spot/instance-action" and fake.spot_action is not None:
                self._reply(200, json.dumps(fake.spot_action), {"Content-Type": "text/plain"})
            elif key == "events/recommendations/rebalance" and fake.rebalance_at is not None:
                self._reply(200, json.dumps({"noticeTime": fake.rebalance_at}), {"Content-Type": "text/plain"})
            else:
                self._reply(404, "")

        def do_PUT(self) -> None:
            url = urlsplit(self.path)
            fake.requests.append(("PUT", url.path))
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            if url.path != "/latest/api/token" or not ttl or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                self._reply(400, "")
                return
            token = secrets.token_urlsafe(32)
            fake.tokens[token] = time.monotonic() + int(ttl)
            self._reply(200, token, {"X-aws-ec2-metadata-token-ttl-seconds": ttl})

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            actions = {
                "/_fake/preempt": fake.preempt,
                "/_fake/maintenance": fake.maintenance,
                "/_fake/spot-interrupt": lambda: fake.interrupt_spot(body.get("action", "terminate"),
                                                                     float(body.get("in_s", 120))),
                "/_fake/rebalance": fake.rebalance,
                "/_fake/reset": fake.reset,
            }
            if path not in actions:
                self._reply(404, "unknown control action")
                return
            actions[path]()
            self._reply(200, '{"ok": true}', {"Content-Type": "application/json"})

    return Handler


def _etag(key: str, value: str) -> str:
    return f"{abs(hash((key, value))) % 10**16:016x}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.testing.fake_metadata", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error("the fake serves on loopback addresses only")
    fake = FakeMetadata(host=args.host, port=args.port).start()
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"fake metadata serving on {fake.endpoint}", flush=True)
    stopping.wait()
    fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
