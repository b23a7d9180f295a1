"""The preemption-notice watcher (`python -m fleet.worker.notice`) as a real process,
against the fake GCE metadata server / EC2 IMDSv2 of `fleet.testing.fake_metadata` on
loopback: on a notice it SIGTERMs the job's process group; without one it leaves it be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from fleet.testing.fake_metadata import FakeMetadata


@pytest.fixture
def metadata() -> Iterator[FakeMetadata]:
    with FakeMetadata() as fake:
        yield fake


@pytest.fixture
def spawn() -> Iterator:
    """Start processes; kill whatever is still running at the end."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _job_group(spawn) -> subprocess.Popen:
    """Stands for the launcher: the leader of its own process group, with a child."""
    return spawn(["sh", "-c", "sleep 120 & wait"], start_new_session=True)


def _watcher(spawn, provider: str, pgid: int, env: dict[str, str]) -> subprocess.Popen:
    return spawn([sys.executable, "-m", "fleet.worker.notice", "--provider", provider, "--pgid", str(pgid)],
                 env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)


def _gce_env(fake: FakeMetadata) -> dict[str, str]:
    return {"GCE_METADATA_HOST": fake.address}


def _aws_env(fake: FakeMetadata) -> dict[str, str]:
    return {"AWS_EC2_METADATA_SERVICE_ENDPOINT": fake.endpoint}


def _wait_requests(fake: FakeMetadata, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(fake.requests) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(fake.requests) >= count, fake.requests


def test_gcp_preempted_true_sigterms_the_job_group(metadata: FakeMetadata, spawn) -> None:
    group = _job_group(spawn)
    watcher = _watcher(spawn, "gcp", group.pid, _gce_env(metadata))
    _wait_requests(metadata, 2)  # the first read, then the long poll from its ETag
    time.sleep(0.5)
    assert group.poll() is None and watcher.poll() is None, "stopped without a notice"
    noticed = time.monotonic()
    metadata.preempt()
    assert group.wait(timeout=10) == -signal.SIGTERM
    assert time.monotonic() - noticed < 2, "the long poll did not answer the change at once"
    assert watcher.wait(timeout=10) == 0
    assert "instance/preempted is TRUE" in watcher.stderr.read()


def test_gcp_a_notice_given_before_the_watcher_started_is_not_missed(metadata: FakeMetadata, spawn) -> None:
    metadata.preempt()
    group = _job_group(spawn)
    watcher = _watcher(spawn, "gcp", group.pid, _gce_env(metadata))
    assert group.wait(timeout=10) == -signal.SIGTERM
    assert watcher.wait(timeout=10) == 0


def test_aws_spot_interruption_sigterms_the_job_group_using_a_token(metadata: FakeMetadata, spawn) -> None:
    group = _job_group(spawn)
    watcher = _watcher(spawn, "aws", group.pid, _aws_env(metadata))
    _wait_requests(metadata, 2)
    time.sleep(2.5)  # at least one more poll, every 2 s
    assert group.poll() is None and watcher.poll() is None, "stopped without a notice"
    assert ("PUT", "/latest/api/token") in metadata.requests
    gets = [path for method, path in metadata.requests if method == "GET"]
    assert gets and set(gets) == {"/latest/meta-data/spot/instance-action"}
    metadata.interrupt_spot("terminate", in_s=120)
    assert group.wait(timeout=10) == -signal.SIGTERM
    assert watcher.wait(timeout=10) == 0
    assert "spot interruption notice: terminate" in watcher.stderr.read()


def test_the_watcher_ends_with_the_job_without_signalling_anything(metadata: FakeMetadata, spawn) -> None:
    group = _job_group(spawn)
    watcher = _watcher(spawn, "aws", group.pid, _aws_env(metadata))
    _wait_requests(metadata, 2)
    os.killpg(group.pid, signal.SIGKILL)
    group.wait(timeout=10)
    assert watcher.wait(timeout=10) == 0
    assert "stopping" not in watcher.stderr.read()
