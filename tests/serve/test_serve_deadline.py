"""The model server drops the items of a request whose caller's deadline passed, and
runs a request marked no-wait (a coalescing client sent all it had) without waiting
`max_wait_ms` for more.

The real `ModelServer` (aiohttp on the loopback, its dynamic batcher) in this process,
called over HTTP; the handler holds its first batch until the test lets it go, so what
is queued behind it, and when, is known without timing guesses.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fleet.worker import wire
from fleet.worker.handlers.checksum import ChecksumHandler
from fleet.worker.layout import JobLayout
from fleet.worker.metrics import JsonLinesLog, WorkerMetrics
from fleet.worker.serve import ModelServer
from fleet.worker.serve_config import ServeConfig


class HeldChecksum(ChecksumHandler):
    """checksum whose batches wait for `release`; notes what it computed."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.computed: list[bytes] = []

    def infer(self, batch: list[bytes]) -> list[str]:
        self.started.set()
        assert self.release.wait(30)
        self.computed.extend(batch)
        return super().infer(batch)


def post(port: int, items: list[Any], timeout_ms: int | None, *, no_wait: bool = False) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": wire.CONTENT_TYPE}
    if no_wait:
        headers[wire.NO_WAIT_HEADER] = "1"
    if timeout_ms is not None:
        headers[wire.TIMEOUT_HEADER] = str(timeout_ms)
    try:
        connection.request("POST", "/infer", body=wire.encode(items), headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def model_server(tmp_path: Path, handler: ChecksumHandler, config: ServeConfig) -> ModelServer:
    job = tmp_path / "shared" / "jobs" / "served"
    job.mkdir(parents=True)
    metrics = WorkerMetrics(JsonLinesLog(tmp_path / "metrics.jsonl"), node="n0", proc=0, device="cpu")
    return ModelServer(handler, config, layout=JobLayout.at(job), node="n0", proc=0, of=1, device="cpu",
                       metrics=metrics)


def serve_during(server: ModelServer, scenario: Callable[[int], Awaitable[None]],
                 on_exit: Callable[[], None] = lambda: None) -> None:
    """Run the server, then `scenario(port)` once it listens; then `on_exit()`, a drain
    and the batcher's close, also when the scenario failed."""

    async def main() -> None:
        serving = asyncio.create_task(server.run())
        try:
            while not server.port:
                await asyncio.sleep(0.01)
            await scenario(server.port)
        finally:
            on_exit()
            server.begin_drain()
            await serving

    try:
        asyncio.run(main())
    finally:
        server.batcher.close()


def test_the_server_drops_the_items_of_a_caller_that_gave_up(tmp_path: Path) -> None:
    handler = HeldChecksum()
    server = model_server(tmp_path, handler, ServeConfig(handler="checksum", batch_size=1, max_wait_ms=0))
    answers: dict[str, tuple[int, bytes]] = {}

    async def scenario(port: int) -> None:
        first = asyncio.create_task(asyncio.to_thread(post, port, ["first"], None))
        assert await asyncio.to_thread(handler.started.wait, 30)  # the model holds "first"
        # Queued behind it with 200 ms to live: dropped when they pass, never computed.
        answers["late"] = await asyncio.to_thread(post, port, ["a", "b", "c"], 200)
        handler.release.set()
        answers["first"] = await first
        answers["after"] = await asyncio.to_thread(post, port, ["after"], 30_000)

    serve_during(server, scenario, on_exit=handler.release.set)
    assert answers["late"][0] == 504, answers["late"]
    reference = ChecksumHandler()
    assert answers["first"][0] == 200
    assert wire.decode(answers["first"][1]) == reference.infer([b"first"])
    assert answers["after"][0] == 200 and wire.decode(answers["after"][1]) == reference.infer([b"after"])
    assert handler.computed == [b"first", b"after"]  # a, b, c were dropped, not computed
    assert server.expired == 3


def test_a_no_wait_request_does_not_wait_max_wait_for_company(tmp_path: Path) -> None:
    server = model_server(tmp_path, ChecksumHandler(), ServeConfig(handler="checksum", batch_size=64,
                                                                   max_wait_ms=1500))
    took: dict[str, float] = {}

    async def scenario(port: int) -> None:
        for name, no_wait in (("no_wait", True), ("plain", False)):
            started = time.monotonic()
            status, body = await asyncio.to_thread(post, port, [name.encode()], 30_000, no_wait=no_wait)
            took[name] = time.monotonic() - started
            assert status == 200 and wire.decode(body) == ChecksumHandler().infer([name.encode()])

    serve_during(server, scenario)
    assert took["plain"] >= 1.4  # a partial batch waits max_wait_ms for more callers
    assert took["no_wait"] < 1.0, took
