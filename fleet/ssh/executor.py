"""The SSH executor: run commands and move files on many nodes at once.

One `Executor` holds a bounded thread pool (`parallelism`) and one authenticated
paramiko transport per node, opened on first use and reused by every later call (setup,
mounts, job start, health checks); a transport that died is re-opened transparently.
Every call returns a `GroupResult` with one `CommandResult` per node; a node's failure
(unreachable, refused key, changed host key, timeout) is its result's `error`, never an
exception that hides the other nodes. Deadlines: `connect_timeout` covers TCP connect,
banner, key exchange and auth; `timeout` (per call, default `command_timeout`) covers
one command, after which its channel is closed; the exec request and an SFTP session's
start get `connect_timeout`. A dead peer (black-holed, frozen, its kernel gone) is found
by a keepalive that needs an answer: each connection is pinged every `keepalive_s`, and
one that does not answer within `dead_after_s` is closed, which fails every call on it
within seconds instead of the TCP retransmission time. `cancel` (an event) ends every
wait of the executor when set: connection retries, `wait_ready`, running commands.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Self, TypeVar

import paramiko

from fleet.errors import CommandTimeout, FleetError, HostKeyError, SSHError, UsageError
from fleet.ssh.connection import NodeUnreachable, load_private_key, open_transport
from fleet.ssh.hostkeys import HostKeyStore, validate_alias
from fleet.ssh.quote import with_env
from fleet.ssh.results import CommandResult, GroupResult, Target

LineCallback = Callable[[str, str, str], None]
CommandSpec = str | Callable[[Target], str]
EnvSpec = Mapping[str, str] | Callable[[Target], Mapping[str, str] | None] | None

_READ_CHUNK = 65536
_SFTP_CHUNK = 32768
C = TypeVar("C")
SESSIONS_PER_NODE = 8  # below OpenSSH's default MaxSessions (10) channels per connection
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 5.0
KEEPALIVE_S = 5.0  # a ping (that needs an answer) per connection this often
DEAD_AFTER_S = 15.0  # a ping unanswered this long: the peer is dead, its connection closed (a loaded
# sshd still answers a global request well within it)
_CANCEL_POLL_S = 1.0


@dataclass
class _Connection:
    key: tuple[str, int, str]
    transport: paramiko.Transport
    ping_since: float | None = None  # monotonic start of the ping waiting for its answer


class Cancelled(SSHError):
    """The executor's cancel token was set while this call waited."""


@contextlib.contextmanager
def _bounded(channel: paramiko.Channel, seconds: float) -> Iterator[None]:
    """Close `channel` if the block is still waiting after `seconds` (paramiko waits for
    the answer to a channel request with no timeout): the wait ends with an error."""
    timer = threading.Timer(seconds, channel.close)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _send_stdin(channel: paramiko.Channel, data: Iterable[bytes]) -> None:
    """Sends each part as it comes (a part may wait for something the caller learns
    meanwhile), then EOF: also when the parts fail, so that the command is not left
    waiting for more (what it makes of a short input is its result)."""
    with contextlib.suppress(Exception):  # a closed channel, or a source that broke
        try:
            for part in data:
                channel.sendall(part)
        finally:
            channel.shutdown_write()


class _Output:
    """One stream of one command: keeps the last `limit` bytes, emits whole lines."""

    def __init__(self, node: str, stream: str, limit: int, on_line: LineCallback | None) -> None:
        self.node, self.stream, self.limit, self.on_line = node, stream, limit, on_line
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False
        self._partial = b""

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > 2 * self.limit:
            joined = b"".join(self.chunks)[-self.limit :]
            self.chunks, self.size, self.truncated = [joined], len(joined), True
        if self.on_line is not None:
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            for line in lines:
                self._emit(line)

    def _emit(self, line: bytes) -> None:
        try:
            self.on_line(self.node, self.stream, line.decode(errors="replace").rstrip("\r"))  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a broken printer must not break the command
            self.on_line = None

    def text(self) -> str:
        if self.on_line is not None and self._partial:
            self._emit(self._partial)
            self._partial = b""
        data = b"".join(self.chunks)
        if len(data) > self.limit:
            data, self.truncated = data[-self.limit :], True
        return data.decode(errors="replace")


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter (half fixed, half random)."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_START_S * (2**attempt))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Executor:
    """Runs commands and transfers files on many nodes over SSH, in parallel."""

    def __init__(
        self,
        key_path: Path,
        known_hosts: HostKeyStore,
        *,
        parallelism: int = 32,
        connect_timeout: float = 10,
        command_timeout: float = 600,
        on_line: LineCallback | None = None,
        max_output: int = 1 << 20,
        cancel: threading.Event | None = None,
        keepalive_s: float = KEEPALIVE_S,
        dead_after_s: float = DEAD_AFTER_S,
    ) -> None:
        if parallelism < 1:
            raise UsageError(f"ssh parallelism must be at least 1, not {parallelism}")
        self.key_path = Path(key_path)
        self.known_hosts = known_hosts
        self.parallelism = parallelism
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.on_line = on_line
        self.max_output = max_output
        self._pkey = load_private_key(self.key_path)
        self._pool = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="fleet-ssh")
        self._connections: dict[str, _Connection] = {}
        self._node_locks: dict[str, threading.Lock] = {}
        self._node_slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.cancel = cancel or threading.Event()
        self.keepalive_s = keepalive_s
        self.dead_after_s = dead_after_s
        self._dead: dict[str, str] = {}  # node -> why the watchdog closed its connection
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection and the thread pool."""
        with self._lock:
            self._closed = True
            connections = list(self._connections.values())
            self._connections.clear()
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        # paramiko's close joins the transport thread (up to 0.1 s each): do it in parallel.
        closers = [threading.Thread(target=c.transport.close, daemon=True) for c in connections]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join(timeout=5)

    def drop(self, name: str) -> None:
        """Close and forget a node's cached connection (the node was preempted or deleted)."""
        with self._lock:
            connection = self._connections.pop(name, None)
        if connection is not None:
            connection.transport.close()

    def transport(
        self, target: Target, *, retries: int = 0, timeout: float | None = None
    ) -> paramiko.Transport:
        """The node's open transport (opened now if there is none or it died)."""
        with self._lock:
            if self._closed:
                raise SSHError("the executor is closed", node=target.name)
            node_lock = self._node_locks.setdefault(target.name, threading.Lock())
        key = (target.address, target.port, target.user)
        with node_lock:
            with self._lock:
                cached = self._connections.get(target.name)
            if cached is not None:
                if cached.key == key and cached.transport.is_active():
                    return cached.transport
                cached.transport.close()
            transport = self._connect(target, retries, timeout)
            connection = _Connection(key, transport)
            with self._lock:
                self._connections[target.name] = connection
                self._dead.pop(target.name, None)
            self._watch(target.name, connection)
            return transport

    # -- liveness --------------------------------------------------------------------
    def _watch(self, name: str, connection: _Connection) -> None:
        """Ping the connection (a global request OpenSSH must answer) every `keepalive_s`;
        the watchdog closes it when an answer is `dead_after_s` late."""
        if self.keepalive_s <= 0:
            return

        def pinger() -> None:
            transport = connection.transport
            while not self._stopping.wait(self.keepalive_s) and transport.is_active():
                connection.ping_since = time.monotonic()
                try:
                    transport.global_request("keepalive@openssh.com", wait=True)
                except Exception:  # noqa: BLE001 - a failed send: the transport is closing anyway
                    return
                finally:
                    connection.ping_since = None

        threading.Thread(target=pinger, name=f"fleet-ssh-ping-{name}", daemon=True).start()
        with self._lock:
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watchdog_loop, name="fleet-ssh-watchdog", daemon=True)
                self._watchdog.start()

    def _watchdog_loop(self) -> None:
        while not self._stopping.wait(1.0):
            now = time.monotonic()
            with self._lock:
                late = [(name, c) for name, c in self._connections.items()
                        if c.ping_since is not None and now - c.ping_since > self.dead_after_s]
                for name, _ in late:
                    self._connections.pop(name, None)
                    self._dead[name] = f"{name} stopped answering (no keepalive answer within {self.dead_after_s:g}s)"
            for _, connection in late:
                connection.transport.close()

    def _why_dead(self, name: str) -> str | None:
        with self._lock:
            return self._dead.get(name)

    def _check_cancel(self, name: str) -> None:
        if self.cancel.is_set():
            raise Cancelled(f"{name}: cancelled (the fleet is stopping)", node=name)

    def _connect(self, target: Target, retries: int, timeout: float | None = None) -> paramiko.Transport:
        attempt = 0
        while True:
            self._check_cancel(target.name)
            try:
                return open_transport(
                    target,
                    self._pkey,
                    self.key_path,
                    self.known_hosts,
                    timeout=timeout or self.connect_timeout,
                )
            except NodeUnreachable:
                if attempt >= retries:
                    raise
                self.cancel.wait(_backoff(attempt))
                attempt += 1

    # -- fan-out ---------------------------------------------------------------------
    def _fan_out(self, targets: Sequence[Target], work: Callable[[Target], CommandResult]) -> GroupResult:
        names = [target.name for target in targets]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise UsageError(f"the same node is targeted twice: {', '.join(duplicates)}")
        for name in names:
            validate_alias(name)
        futures = {target.name: self._pool.submit(self._guarded, target, work) for target in targets}
        return GroupResult({name: future.result() for name, future in futures.items()})

    @staticmethod
    def _guarded(target: Target, work: Callable[[Target], CommandResult]) -> CommandResult:
        started = time.monotonic()
        try:
            return work(target)
        except FleetError as exc:
            return CommandResult(target.name, "", None, "", "", time.monotonic() - started, exc)
        except Exception as exc:  # noqa: BLE001 - a paramiko/socket surprise stays this node's problem
            error = SSHError(f"{target.name}: {type(exc).__name__}: {exc}", node=target.name)
            return CommandResult(target.name, "", None, "", "", time.monotonic() - started, error)

    @contextlib.contextmanager
    def _slot(self, name: str) -> Iterator[None]:
        """Hold one of the node's channel slots (sshd's MaxSessions is 10 by default)."""
        with self._lock:
            slots = self._node_slots.setdefault(name, threading.BoundedSemaphore(SESSIONS_PER_NODE))
        with slots:
            yield

    def _open(self, target: Target, retries: int, opener: Callable[[paramiko.Transport], C]) -> C:
        """Open a channel with `opener`; a cached transport that turns out dead is replaced once."""
        for attempt in (1, 2):
            transport = self.transport(target, retries=retries)
            try:
                return opener(transport)
            except paramiko.ChannelException as exc:  # the server said no; the transport is fine
                raise SSHError(f"{target.name} refused a new channel: {exc}", node=target.name) from None
            except (paramiko.SSHException, EOFError, OSError) as exc:
                self.drop(target.name)
                if attempt == 2:
                    raise NodeUnreachable(
                        f"cannot open a channel on {target.name}: {exc}", node=target.name
                    ) from None
        raise AssertionError("unreachable")

    def forward(self, target: Target, port: int, *, host: str = "127.0.0.1",
                timeout: float | None = None) -> paramiko.Channel:
        """A direct-tcpip channel to `host:port` as the node sees it, over the node's
        cached connection (pinned host key; no port is opened anywhere)."""
        wait = timeout or self.connect_timeout
        return self._open(target, 0, lambda t: t.open_channel(
            "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=wait))

    def _session(self, target: Target, retries: int) -> paramiko.Channel:
        return self._open(target, retries, lambda t: t.open_session(timeout=self.connect_timeout))

    def _start_sftp(self, transport: paramiko.Transport) -> paramiko.SFTPClient:
        """`SFTPClient.from_transport` with deadlines: the channel open, the subsystem
        request and the version exchange each end within `connect_timeout`."""
        channel = transport.open_session(timeout=self.connect_timeout)
        channel.settimeout(self.connect_timeout)
        with _bounded(channel, self.connect_timeout):
            channel.invoke_subsystem("sftp")
            sftp = paramiko.SFTPClient(channel)
        if channel.closed:
            raise paramiko.SSHException("the sftp subsystem did not start in time")
        return sftp

    # -- commands --------------------------------------------------------------------
    def run(
        self,
        targets: Sequence[Target],
        command: CommandSpec,
        *,
        env: EnvSpec = None,
        timeout: float | None = None,
        stream: bool = False,
        retries_connect: int = 0,
        stdin: bytes | Callable[[Target], Iterable[bytes]] | None = None,
        on_line: LineCallback | None = None,
    ) -> GroupResult:
        """Run a command (or one per target) on every target, at most `parallelism` at once.

        `env` (a mapping, or a function of the target) is exported in front of the
        command, every value quoted. `stream=True` sends each output line to `on_line`
        as it arrives. `retries_connect` retries a node that does not answer (booting).
        `stdin` is sent to every command's standard input (then EOF); without it the
        command reads EOF at once. A function of the target gives each its own parts,
        sent as the iterable yields them. `on_line` gets this call's output lines as they
        arrive (instead of the executor's own, which `stream=True` asks for).
        """
        limit = self.command_timeout if timeout is None else timeout
        on_line = on_line or (self.on_line if stream else None)
        # Build every command first: a bad env name fails the call before any node runs.
        commands = {target.name: self._command_for(target, command, env) for target in targets}

        def work(target: Target) -> CommandResult:
            data = stdin(target) if callable(stdin) else (stdin,) if stdin else None
            return self._run_one(target, commands[target.name], limit, on_line, retries_connect, data)

        return self._fan_out(targets, work)

    @staticmethod
    def _command_for(target: Target, command: CommandSpec, env: EnvSpec) -> str:
        text = command(target) if callable(command) else command
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"empty command for node {target.name}")
        values = env(target) if callable(env) else env
        return with_env(text, values)

    def _run_one(
        self, target: Target, command: str, timeout: float, on_line: LineCallback | None, retries: int,
        stdin: Iterable[bytes] | None = None,
    ) -> CommandResult:
        started = time.monotonic()
        with self._slot(target.name):
            return self._run_in_slot(target, command, timeout, on_line, retries, started, stdin)

    def _run_in_slot(
        self,
        target: Target,
        command: str,
        timeout: float,
        on_line: LineCallback | None,
        retries: int,
        started: float,
        stdin: Iterable[bytes] | None = None,
    ) -> CommandResult:
        try:
            channel = self._session(target, retries)
        except FleetError as exc:
            return CommandResult(target.name, command, None, "", "", time.monotonic() - started, exc)
        deadline = time.monotonic() + timeout  # the command's own time, not the connect's
        out = _Output(target.name, "stdout", self.max_output, on_line)
        err = _Output(target.name, "stderr", self.max_output, on_line)
        error: FleetError | None = None
        exit_code: int | None = None
        try:
            exit_code, error = self._exec(channel, target.name, command, deadline, timeout, out, err,
                                          self.connect_timeout, self.cancel, stdin)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            error = SSHError(
                f"{target.name}: the connection failed during the command: {exc}", node=target.name
            )
            self.drop(target.name)
        finally:
            channel.close()
        dead = self._why_dead(target.name) if exit_code is None else None
        if dead is not None:
            error = NodeUnreachable(f"{dead}; the command was cut off", node=target.name,
                                    hint="the node may be frozen, preempted or cut off the network")
        return CommandResult(
            target.name,
            command,
            exit_code,
            out.text(),
            err.text(),
            time.monotonic() - started,
            error,
            out.truncated or err.truncated,
        )

    @staticmethod
    def _exec(
        channel: paramiko.Channel,
        node: str,
        command: str,
        deadline: float,
        timeout: float,
        out: _Output,
        err: _Output,
        request_timeout: float,
        cancel: threading.Event,
        stdin: Iterable[bytes] | None = None,
    ) -> tuple[int | None, FleetError | None]:
        with _bounded(channel, request_timeout):
            channel.exec_command(command)
        if stdin:
            # From a thread of its own: a command that writes before it reads must not
            # wait on us. Closing the channel (deadline, cancel) ends a blocked send.
            threading.Thread(target=_send_stdin, args=(channel, stdin), daemon=True,
                             name=f"stdin-{node}").start()
        else:
            channel.shutdown_write()  # no stdin: a command that reads it sees EOF, not a hang
        wakeup = channel.fileno()
        while True:
            if channel.recv_ready():
                out.feed(channel.recv(_READ_CHUNK))
                continue
            if channel.recv_stderr_ready():
                err.feed(channel.recv_stderr(_READ_CHUNK))
                continue
            finished = channel.closed or (channel.eof_received and channel.exit_status_ready())
            if finished:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, CommandTimeout(
                    f"{node}: command still running after {timeout:g}s; its channel was closed",
                    node=node,
                )
            if cancel.is_set():
                return None, Cancelled(f"{node}: cancelled (the fleet is stopping); its channel was closed",
                                       node=node)
            slice_s = min(remaining, _CANCEL_POLL_S)
            if channel.eof_received:
                channel.status_event.wait(slice_s)  # output done, exit status on its way
            else:
                select.select([wakeup], [], [], slice_s)
        if not channel.exit_status_ready() or channel.exit_status < 0:
            return None, SSHError(
                f"{node}: the command ended without an exit status (killed by a signal, or the node went away)",
                node=node,
            )
        return channel.exit_status, None

    def wait_ready(
        self, targets: Sequence[Target], *, timeout: float, retry_auth_failures: bool = False
    ) -> GroupResult:
        """Connect to each node (retrying with backoff and jitter while it does not
        answer) until it runs `true`, or `timeout` passes. Auth and host key failures
        are final unless `retry_auth_failures` (a cloud node may install the key late)."""
        deadline = time.monotonic() + timeout

        def work(target: Target) -> CommandResult:
            started = time.monotonic()
            attempt = 0
            last: FleetError | None = None
            while True:
                remaining = deadline - time.monotonic()
                if self.cancel.is_set():
                    return CommandResult(target.name, "true", None, "", "", time.monotonic() - started,
                                         Cancelled(f"{target.name}: stopped waiting for SSH (the fleet is stopping)",
                                                   node=target.name))
                if remaining <= 0:
                    message = f"{target.name} did not become ready within {timeout:g}s"
                    if last is not None:
                        message += f"; last error: {last.message}"
                    error = (
                        type(last)(message, node=target.name, hint=last.hint)
                        if last
                        else SSHError(message, node=target.name)
                    )
                    return CommandResult(target.name, "true", None, "", "", time.monotonic() - started, error)
                try:
                    self.transport(target, timeout=min(self.connect_timeout, remaining))
                except NodeUnreachable as exc:
                    last = exc
                except SSHError as exc:
                    if isinstance(exc, HostKeyError) or not retry_auth_failures:
                        return CommandResult(
                            target.name, "true", None, "", "", time.monotonic() - started, exc
                        )
                    last = exc
                else:
                    result = self._run_one(
                        target, "true", max(1.0, min(self.command_timeout, remaining)), None, 0
                    )
                    if result.ok:
                        return result
                    last = result.error or SSHError(
                        f"`true` exited with {result.exit_code}", node=target.name
                    )
                self.cancel.wait(min(_backoff(attempt), max(0.0, deadline - time.monotonic())))
                attempt += 1

        return self._fan_out(targets, work)

    # -- files -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _sftp(self, target: Target) -> Iterator[paramiko.SFTPClient]:
        with self._slot(target.name):
            sftp = self._open(target, 0, self._start_sftp)
            if sftp is None:
                raise SSHError(f"{target.name}: could not start sftp", node=target.name)
            try:
                sftp.get_channel().settimeout(self.command_timeout)
                yield sftp
            finally:
                sftp.close()

    def put(
        self, targets: Sequence[Target], data: bytes | Path, remote_path: str, *, mode: int = 0o644,
        dir_mode: int | None = None,
    ) -> GroupResult:
        """Upload bytes or a local file to `remote_path` on every target: parents are
        created (with `dir_mode`, when given, also set on the file's own directory), the
        file is written beside it and renamed over it (atomic), then has `mode`. Relative
        paths are relative to the login directory."""
        if not remote_path or remote_path.endswith("/"):
            raise UsageError(f"upload needs a file path, not {remote_path!r}")
        if isinstance(data, Path) and not data.is_file():
            raise UsageError(f"cannot upload {data}: not a file")

        def work(target: Target) -> CommandResult:
            started = time.monotonic()
            label = f"put {remote_path}"
            try:
                with self._sftp(target) as sftp:
                    _sftp_put(sftp, data, remote_path, mode, dir_mode)
            except FleetError as exc:
                return CommandResult(target.name, label, None, "", "", time.monotonic() - started, exc)
            except (OSError, paramiko.SSHException, EOFError) as exc:
                error = SSHError(f"{target.name}: upload to {remote_path} failed: {exc}", node=target.name)
                return CommandResult(target.name, label, None, "", "", time.monotonic() - started, error)
            return CommandResult(target.name, label, 0, "", "", time.monotonic() - started)

        return self._fan_out(targets, work)

    def get(self, target: Target, remote_path: str, local_path: Path) -> None:
        """Download one file (written beside `local_path`, then renamed over it)."""
        with self._sftp(target) as sftp:
            _sftp_get(sftp, target.name, remote_path, Path(local_path))

    def get_tree(
        self, target: Target, remote_dir: str, local_dir: Path, *, limits: TreeLimits | None = None
    ) -> list[Path]:
        """Copy a remote directory tree (regular files and directories; symlinks and
        special files are skipped, also when one is swapped in between the listing and
        the download). More than `limits` allow (bytes, files, depth) is an SSHError.
        Returns the local files written."""
        written: list[Path] = []
        with self._sftp(target) as sftp:
            walk = _TreeWalk(sftp, target.name, limits or TreeLimits(), written)
            walk.copy_dir(remote_dir, Path(local_dir), 0)
        return written

    def run_on(self, target: Target, command: str, **kwargs: object) -> CommandResult:
        """`run` on one node, returning its result."""
        return self.run([target], command, **kwargs)[target.name]  # type: ignore[arg-type]


# -- sftp helpers ------------------------------------------------------------------------
def _sftp_mkdir_p(sftp: paramiko.SFTPClient, directory: str, mode: int = 0o777) -> None:
    if directory in ("", ".", "/"):
        return
    path = PurePosixPath(directory)
    parts = [str(p) for p in reversed(path.parents) if str(p) not in ("", ".", "/")] + [str(path)]
    for part in parts:
        try:
            attrs = sftp.stat(part)
        except FileNotFoundError:
            try:
                sftp.mkdir(part, mode)
            except OSError:
                attrs = sftp.stat(part)  # another uploader made it meanwhile
                if not stat.S_ISDIR(attrs.st_mode or 0):
                    raise
            continue
        if not stat.S_ISDIR(attrs.st_mode or 0):
            raise SSHError(f"{part} exists and is not a directory")


def _sftp_put(
    sftp: paramiko.SFTPClient, data: bytes | Path, remote_path: str, mode: int, dir_mode: int | None = None
) -> None:
    path = PurePosixPath(remote_path)
    _sftp_mkdir_p(sftp, str(path.parent), 0o777 if dir_mode is None else dir_mode)
    if dir_mode is not None and str(path.parent) not in ("", ".", "/"):
        sftp.chmod(str(path.parent), dir_mode)  # also when it existed before
    tmp = str(path.parent / f".{path.name}.fleet-tmp-{uuid.uuid4().hex[:12]}")
    try:
        with sftp.open(tmp, "wb") as handle:
            handle.set_pipelined(True)
            if isinstance(data, Path):
                with open(data, "rb") as source:
                    while chunk := source.read(_SFTP_CHUNK):
                        handle.write(chunk)
            else:
                for start in range(0, len(data), _SFTP_CHUNK):
                    handle.write(data[start : start + _SFTP_CHUNK])
        sftp.chmod(tmp, mode)
        sftp.posix_rename(tmp, str(path))
    except BaseException:
        try:
            sftp.remove(tmp)
        except (OSError, paramiko.SSHException, EOFError):
            pass
        raise


def _sftp_get(sftp: paramiko.SFTPClient, node: str, remote_path: str, local_path: Path) -> None:
    local_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_path.with_name(f".{local_path.name}.fleet-tmp-{uuid.uuid4().hex[:12]}")
    try:
        with sftp.open(remote_path, "rb") as source, open(tmp, "wb") as sink:
            source.prefetch()
            while chunk := source.read(_READ_CHUNK):
                sink.write(chunk)
        os.replace(tmp, local_path)
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        raise SSHError(f"{node}: {remote_path} does not exist", node=node) from None
    except (OSError, paramiko.SSHException, EOFError) as exc:
        tmp.unlink(missing_ok=True)
        raise SSHError(f"{node}: download of {remote_path} failed: {exc}", node=node) from None


@dataclass(frozen=True)
class TreeLimits:
    """How much `get_tree` copies at most: a remote tree is written by nodes (a sparse
    file claims terabytes, nesting can go thousands deep)."""

    max_bytes: int = 8 << 30
    max_files: int = 200_000
    max_depth: int = 32


def _same_file(listed: paramiko.SFTPAttributes, opened: paramiko.SFTPAttributes) -> bool:
    """Whether `opened` looks like the regular file the listing showed: same type,
    permissions and owner, no smaller (logs and metrics grow while a job runs)."""
    return (stat.S_ISREG(opened.st_mode or 0) and opened.st_mode == listed.st_mode
            and opened.st_uid == listed.st_uid and opened.st_gid == listed.st_gid
            and (opened.st_size or 0) >= (listed.st_size or 0))


@dataclass
class _TreeWalk:
    sftp: paramiko.SFTPClient
    node: str
    limits: TreeLimits
    written: list[Path]
    files: int = 0
    bytes: int = 0

    def _over(self, what: str, remote: str) -> SSHError:
        return SSHError(f"{self.node}: {remote}: the tree holds more than {what}; refusing to copy it", node=self.node)

    def copy_dir(self, remote_dir: str, local_dir: Path, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise self._over(f"{self.limits.max_depth} levels of directories", remote_dir)
        try:
            entries = self.sftp.listdir_attr(remote_dir)
        except FileNotFoundError:
            raise SSHError(f"{self.node}: {remote_dir} does not exist", node=self.node) from None
        except OSError as exc:
            raise SSHError(f"{self.node}: cannot list {remote_dir}: {exc}", node=self.node) from None
        local_dir.mkdir(parents=True, exist_ok=True)
        for entry in entries:
            name = entry.filename
            if name in (".", "..") or "/" in name or "\0" in name:
                continue
            remote = f"{remote_dir.rstrip('/')}/{name}"
            kind = entry.st_mode or 0
            if stat.S_ISDIR(kind):
                # A directory swapped for a symlink after the listing: lstat again.
                if stat.S_ISDIR(self.sftp.lstat(remote).st_mode or 0):
                    self.copy_dir(remote, local_dir / name, depth + 1)
            elif stat.S_ISREG(kind):
                self.copy_file(remote, entry, local_dir / name)

    def copy_file(self, remote: str, listed: paramiko.SFTPAttributes, local_path: Path) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise self._over(f"{self.limits.max_files:,} files", remote)
        if self.bytes + (listed.st_size or 0) > self.limits.max_bytes:
            raise self._over(f"{self.limits.max_bytes:,} bytes", remote)
        tmp = local_path.with_name(f".{local_path.name}.fleet-tmp-{uuid.uuid4().hex[:12]}")
        try:
            with self.sftp.open(remote, "rb") as source:
                # SFTP cannot open with O_NOFOLLOW: what was opened must be the very file
                # listed (fstat of the handle), and the path must still not be a link.
                opened = source.stat()
                if not _same_file(listed, opened) or not stat.S_ISREG(self.sftp.lstat(remote).st_mode or 0):
                    return
                size = opened.st_size or 0
                if self.bytes + size > self.limits.max_bytes:
                    raise self._over(f"{self.limits.max_bytes:,} bytes", remote)
                copied = 0
                source.prefetch(size)
                with open(tmp, "wb") as sink:
                    while copied < size and (chunk := source.read(min(_READ_CHUNK, size - copied))):
                        copied += len(chunk)
                        sink.write(chunk)
            self.bytes += copied
            os.replace(tmp, local_path)
            self.written.append(local_path)
        except FileNotFoundError:
            return  # gone since the listing
        except SSHError:
            raise
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"{self.node}: download of {remote} failed: {exc}", node=self.node) from None
        finally:
            tmp.unlink(missing_ok=True)
