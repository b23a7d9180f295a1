"""A peer that stops answering (its sshd frozen with SIGSTOP: the kernel still
acknowledges every packet, so neither TCP nor paramiko's own keepalive notice) fails
the calls on it within seconds, and the executor's cancel token ends `wait_ready`."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
from ssh_lab import SshLab

from fleet.ssh.connection import NodeUnreachable
from fleet.ssh.executor import Cancelled


def test_a_frozen_peer_fails_a_running_command_within_seconds(lab: SshLab) -> None:
    node = lab.node("frozen")
    executor = lab.executor(keepalive_s=1.0, dead_after_s=3.0, command_timeout=120)
    target = lab.target(node)
    assert executor.run_on(target, "true").ok  # the connection is open and pooled
    listener = node.listener_pid()
    assert listener is not None
    outcome: dict = {}

    def call() -> None:
        started = time.monotonic()
        outcome["result"] = executor.run_on(target, "sleep 60")
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    time.sleep(0.5)
    frozen = [listener, *(p.pid for p in psutil.Process(listener).children(recursive=True))]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        thread.join(timeout=30)
        assert not thread.is_alive(), "the call still waits on a frozen peer"
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    result = outcome["result"]
    assert not result.ok and isinstance(result.error, NodeUnreachable)
    assert "stopped answering" in result.error.message
    assert outcome["seconds"] < 15  # ping period + dead_after, not the TCP retransmission time
    assert executor.run_on(target, "echo back").stdout.strip() == "back"  # reconnects once it answers


def test_the_cancel_token_ends_wait_ready(lab: SshLab, closed_port: int) -> None:
    from fleet.ssh import Target

    cancel = threading.Event()
    executor = lab.executor(cancel=cancel, connect_timeout=2)
    target = Target("nobody", "127.0.0.1", closed_port, "user", trust_on_first_use=True)
    threading.Timer(1.0, cancel.set).start()
    started = time.monotonic()
    result = executor.wait_ready([target], timeout=120)[target.name]
    assert time.monotonic() - started < 10
    assert isinstance(result.error, Cancelled)
