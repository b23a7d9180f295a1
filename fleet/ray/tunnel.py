"""A local port forwarded to a port on a node's loopback, through the fleet's SSH connection.

`LocalForward(executor, target, remote_port)` listens on 127.0.0.1 of this machine (a
free port unless one is given) and carries every accepted connection over its own
direct-tcpip channel of the node's cached paramiko transport (`Executor.forward`: the
pinned host key, nothing opened on the node's side), like `ssh -L`. The Ray dashboard
and Jobs API are reached this way: they listen on the head's loopback only.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Self

import paramiko

from fleet.errors import FleetError
from fleet.ssh import Executor, Target

_CHUNK = 1 << 16


class LocalForward:
    """127.0.0.1:<port> here -> 127.0.0.1:<remote_port> on `target` (thread-safe)."""

    def __init__(self, executor: Executor, target: Target, remote_port: int, *, local_port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.executor = executor
        self.target = target
        self.remote_port = remote_port
        self.host = host
        self._server = socket.create_server(("127.0.0.1", local_port))
        self._server.settimeout(0.5)
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept_loop, name=f"fleet-forward-{self.port}", daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._carry, args=(client,), daemon=True,
                                      name=f"fleet-forward-{self.port}-conn")
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _carry(self, client: socket.socket) -> None:
        try:
            channel = self.executor.forward(self.target, self.remote_port, host=self.host)
        except FleetError:
            client.close()
            return
        try:
            _pump(client, channel, self._stop)
        finally:
            channel.close()
            client.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.close()
        self._accepter.join(timeout=5)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pump(client: socket.socket, channel: paramiko.Channel, stop: threading.Event) -> None:
    """Copy both ways until either side closes (a paramiko channel is selectable)."""
    while not stop.is_set():
        readable, _, _ = select.select([client, channel], [], [], 0.5)
        for source, sink in ((client, channel), (channel, client)):
            if source not in readable:
                continue
            try:
                data = source.recv(_CHUNK)
            except OSError:
                return
            if not data:
                return
            try:
                sink.sendall(data)
            except OSError:
                return
