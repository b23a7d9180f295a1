"""`python -m fleet.worker.serve JOB_DIR --node NAME`: serve a job's model on this node.

Started by the job launcher (`fleet serve`) for a job with a `serve:` section
(`fleet.worker.serve_config`). Each process loads one copy of the model (the handler's
`open`), then answers `POST /infer` on the node's loopback only (127.0.0.1, a free
port); callers reach it through SSH direct-tcpip channels, never through an open port.
Items of every request go into one `DynamicBatcher`, so items from all callers are
batched together (`batch_size`, `max_wait_ms`; a request marked `X-Fleet-No-Wait: 1`,
whose client sent all it had, does not wait for more). Bodies are `fleet.worker.wire`
values.

    JOB_DIR/servers/<node>.<proc>.json   {"node", "proc", "port", "pid", "state": "ready"|
                                          "draining", "handler", "device", "t"}: written when
                                          the model is loaded, removed when the process ends
    JOB_DIR/metrics/<node>.worker<proc>.jsonl   batch lines as the batch worker writes them

SIGTERM/SIGINT (cancel, a preemption notice) drains: the registry says "draining", new
requests get 503 (the caller sends them elsewhere), what was accepted is finished, then
the process exits 0 (at the latest after `drain_seconds`). `processes_per_node: auto`
runs one process per visible GPU (spawned, each with its own CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fleet.worker import wire
from fleet.worker.batcher import DynamicBatcher
from fleet.worker.cpus import share_cpus
from fleet.worker.errors import WorkerError
from fleet.worker.handlers import Handler, HandlerContext, load_handler, resolve_device
from fleet.worker.layout import JobLayout, load_job_section, write_atomic
from fleet.worker.metrics import JsonLinesLog, WorkerMetrics
from fleet.worker.serve_config import ServeConfig

PROG = "fleet-serve"
LOOPBACK = "127.0.0.1"
MAX_BODY = 1 << 30


def _budget_s(value: str | None) -> float | None:
    """The seconds a request may take (its header), None without a usable one."""
    try:
        budget = float(value) / 1000.0 if value is not None else None
    except ValueError:
        return None
    return budget if budget is not None and math.isfinite(budget) and budget >= 0 else None


def _loop_time(deadline: float | None) -> float | None:
    """A time.monotonic() deadline on the running loop's clock (None: no deadline)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + deadline - time.monotonic()


def load_serve_config(layout: JobLayout) -> ServeConfig:
    """The `serve:` section of JOB_DIR/job.yaml."""
    return load_job_section(layout, "serve", ServeConfig, "this job serves no model")


def servers_dir(layout: JobLayout) -> Path:
    return layout.job_dir / "servers"


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class ModelServer:
    """One process's model behind an aiohttp app on the loopback."""

    def __init__(self, handler: Handler, config: ServeConfig, *, layout: JobLayout, node: str, proc: int,
                 of: int, device: str, metrics: WorkerMetrics) -> None:
        self.handler = handler
        self.config = config
        self.layout = layout
        self.node = node
        self.proc = proc
        self.of = of
        self.device = device
        self.metrics = metrics
        self.registry = servers_dir(layout) / f"{node}.{proc}.json"
        self.batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            self._run_batch, max_batch_size=config.batch_size, max_wait_ms=config.max_wait_ms,
            name=f"serve-{proc}",
        )
        self.held = 0  # items accepted and not answered yet
        self.requests = 0
        self.expired = 0  # items dropped because their caller's deadline passed
        self.draining = False
        self.port = 0
        self._room: asyncio.Condition | None = None
        self._stopped: asyncio.Event | None = None

    # -- the model side (batch thread) -----------------------------------------------------
    def _run_batch(self, raw: list[Any]) -> list[Any]:
        started = time.monotonic()
        loaded: list[Any] = []
        results: list[Any] = [None] * len(raw)
        good: list[int] = []
        for i, value in enumerate(raw):
            try:
                loaded.append(self.handler.load(value))
                good.append(i)
            except Exception as exc:  # noqa: BLE001 - this item's error, sent to its caller
                results[i] = wire.ItemError(f"load: {type(exc).__name__}: {exc}")
        load_s = time.monotonic() - started
        if loaded:
            for i, result in zip(good, self._infer(loaded)):
                results[i] = result
        self.metrics.batch(items=len(raw), read_s=load_s, wait_s=0.0,
                           compute_s=time.monotonic() - started - load_s, write_s=0.0)
        return results

    def _infer(self, items: list[Any]) -> list[Any]:
        try:
            results = list(self.handler.infer(items))
            if len(results) != len(items):
                raise ValueError(f"infer returned {len(results)} results for {len(items)} items")
            return results
        except Exception as exc:  # noqa: BLE001 - isolate the failing items, one by one
            if len(items) == 1:
                return [wire.ItemError(f"infer: {type(exc).__name__}: {exc}")]
            return [self._infer([item])[0] for item in items]

    # -- HTTP ------------------------------------------------------------------------------
    async def infer(self, request: Any) -> Any:
        from aiohttp import web

        if self.draining:
            return web.Response(status=503, text="draining", headers={"X-Fleet-Draining": "1"})
        budget = _budget_s(request.headers.get(wire.TIMEOUT_HEADER))
        deadline = None if budget is None else time.monotonic() + budget
        body = await request.read()
        try:
            items = wire.decode(body)
        except wire.WireError as exc:
            return web.Response(status=400, text=f"bad request body: {exc}")
        assert self._room is not None and self._stopped is not None
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                async with self._room:
                    await self._room.wait_for(
                        lambda: self.held == 0 or self.held + len(items) <= self.config.max_pending)
                    self.held += len(items)
        except TimeoutError:
            return self._expired(len(items))
        self.requests += 1
        try:
            # A client that coalesced its callers' items sent all it had: the batch does not
            # wait max_wait_ms for more from it (what other callers send meanwhile joins).
            futures = self.batcher.submit_many(items, ripe=request.headers.get(wire.NO_WAIT_HEADER) == "1")
            gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
            try:
                # Past the caller's deadline the items not started yet are dropped (their
                # futures cancelled: the batcher skips them); the caller has given up.
                async with asyncio.timeout_at(_loop_time(deadline)):
                    results = await gathered
            except TimeoutError:
                return self._expired(len(items))
        finally:
            async with self._room:
                self.held -= len(items)
                self._room.notify_all()
        answers = [wire.ItemError(f"{type(r).__name__}: {r}") if isinstance(r, BaseException) else r
                   for r in results]
        return web.Response(body=wire.encode(answers), content_type=wire.CONTENT_TYPE,
                            headers={"X-Fleet-Node": self.node, "X-Fleet-Proc": str(self.proc)})

    def _expired(self, items: int) -> Any:
        from aiohttp import web

        self.expired += items
        return web.Response(status=504, text="the caller's deadline passed before its items were computed")

    async def health(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self._record() | {"held": self.held, "requests": self.requests,
                                                   "expired": self.expired,
                                                   "batches": self.batcher.batches, "items": self.batcher.items})

    def _record(self) -> dict[str, Any]:
        return {"node": self.node, "proc": self.proc, "of": self.of, "port": self.port, "pid": os.getpid(),
                "state": "draining" if self.draining else "ready", "handler": self.config.handler,
                "device": self.device, "t": round(time.time(), 3)}

    def _publish(self) -> None:
        self.registry.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.registry, json.dumps(self._record()).encode())

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        _log(f"{self.node} proc {self.proc}: draining: accepting nothing new, finishing {self.held} item(s)")
        with contextlib.suppress(OSError):
            self._publish()
        assert self._stopped is not None
        self._stopped.set()

    async def run(self) -> None:
        from aiohttp import web

        self._room = asyncio.Condition()
        self._stopped = asyncio.Event()
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/infer", self.infer)
        app.router.add_get("/health", self.health)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted sockets: no Nagle stalls behind delayed ACKs on small answers.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((LOOPBACK, 0))
        self.port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
        await site.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_drain)
        self._publish()
        _log(f"{self.node} proc {self.proc}: serving {self.config.handler} on {LOOPBACK}:{self.port} ({self.device})")
        await self._stopped.wait()
        deadline = time.monotonic() + self.config.drain_seconds
        async with self._room:
            while self.held and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), timeout=max(0.01, deadline - time.monotonic()))
        left = self.held
        await asyncio.sleep(0.05)  # let the last answers leave before the sockets close
        await runner.cleanup()
        _log(f"{self.node} proc {self.proc}: drained after {self.requests} request(s)"
             + (f"; {left} item(s) were still held after {self.config.drain_seconds:g} s" if left else ""))


def serve_process(job_dir: str, node: str, proc: int, of: int, gpu: str | None) -> int:
    """One model process: load the model, serve until SIGTERM, drain. Returns an exit code."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    else:
        share_cpus(of)
    layout = JobLayout.at(job_dir)
    config = load_serve_config(layout)
    handler = load_handler(config.handler, config.handler_options)
    requested = "cuda" if gpu is not None and config.device == "auto" else config.device
    device = resolve_device(requested, getattr(handler, "uses_device", True))
    handler.open(HandlerContext(device=device, shared_root=layout.shared_root, node=node))
    layout.metrics.mkdir(parents=True, exist_ok=True)
    metrics = WorkerMetrics(JsonLinesLog(layout.metrics_file(node, proc)), node=node, proc=proc, device=device)
    metrics.start(handler=config.handler, mode="serve", batch_size=config.batch_size, job=layout.job_name)
    server = ModelServer(handler, config, layout=layout, node=node, proc=proc, of=of,
                         device=device, metrics=metrics)
    try:
        asyncio.run(server.run())
    finally:
        server.batcher.close()
        metrics.stop("signal" if server.draining else "error")
        with contextlib.suppress(OSError):
            server.registry.unlink()
        handler.close()
    return 0


def _child(job_dir: str, node: str, proc: int, of: int, gpu: str | None) -> None:
    try:
        code = serve_process(job_dir, node, proc, of, gpu)
    except WorkerError as exc:
        _log(f"proc {proc}: error: {exc}")
        code = exc.exit_code
    sys.exit(code)


def _run_processes(job_dir: str, node: str, count: int, gpus: list[str]) -> int:
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_child, args=(job_dir, node, i, count, gpus[i] if gpus else None),
                                name=f"fleet-serve-{i}") for i in range(count)]

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for child in children:
        child.start()
    for child in children:
        child.join()
    codes = [abs(child.exitcode or 0) for child in children]
    return max(codes) if any(codes) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve a job's model on this node's loopback.")
    parser.add_argument("job_dir", metavar="JOB_DIR")
    parser.add_argument("--node", help="this node's name (default: $FLEET_NODE_NAME, else the hostname)")
    args = parser.parse_args(argv)
    try:
        from fleet.worker.__main__ import _process_plan
        from fleet.worker.runner import node_name

        layout = JobLayout.at(args.job_dir)
        config = load_serve_config(layout)
        node = node_name(args.node)
        registry = servers_dir(layout)
        registry.mkdir(parents=True, exist_ok=True)
        for stale in registry.glob(f"{node}.*.json"):  # an earlier start on this node
            with contextlib.suppress(OSError):
                stale.unlink()
        uses_device = getattr(load_handler(config.handler, config.handler_options), "uses_device", True)
        count, gpus = _process_plan(str(config.processes_per_node), config.device, uses_device)
        if count == 1:
            return serve_process(str(layout.job_dir), node, 0, 1, gpus[0] if gpus else None)
        return _run_processes(str(layout.job_dir), node, count, gpus)
    except WorkerError as exc:
        _log(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
