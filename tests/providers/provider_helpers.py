"""Helpers of the provider tests (specs, contexts, SSH with a pinned host key)."""

from __future__ import annotations

import base64
import getpass
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko

from fleet.providers.base import ProviderContext
from fleet.runtime import LOCAL_IMAGE
from fleet.spec.models import FleetSpec

USER = getpass.getuser()
# The fakes' backing nodes see this machine's image, as a cloud node sees its Deep
# Learning image: fleet's runtime is layered on it (an isolated node has no index).
CLOUD_RUNTIME: dict[str, Any] = {"image": [LOCAL_IMAGE]}


def is_test_local(address: str | None) -> bool:
    """An address of this machine's tests: loopback, or an isolated node's bridge."""
    return bool(address) and address.startswith(("127.", "10.250."))  # type: ignore[union-attr]


def fleet_spec(
    name: str, provider: str, *, ssh_port: int = 22, workers: dict[str, Any] | None = None, **blocks: Any
) -> FleetSpec:
    data: dict[str, Any] = {
        "name": name,
        "provider": provider,
        "workers": workers or {"count": 2},
        "ssh": {"user": USER, "port": ssh_port},
        "runtime": CLOUD_RUNTIME,
        **blocks,
    }
    return FleetSpec.model_validate(data)


def context(spec: FleetSpec, state_dir: Path, public_key: str) -> ProviderContext:
    return ProviderContext(spec=spec, state_dir=state_dir, public_key=public_key, ssh_user=USER)


class Sleeps(list[float]):
    """An injected sleep that records instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def gcp_block(fake: Any, zones: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "project": "test-project",
        "zones": zones or ["us-central1-a", "us-central1-b"],
        "api_endpoint": fake.endpoint,
        "source_ranges": ["127.0.0.0/8"],
        **extra,
    }


def aws_block(zones: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "region": "us-east-1",
        "zones": zones or ["us-east-1a", "us-east-1b"],
        "ami": "ami-03cf127a",
        "source_ranges": ["127.0.0.0/8"],
        **extra,
    }


def ssh_run(address: str, port: int, key: Path, host_key_line: str, command: str) -> str:
    """Run a command over SSH, trusting only the given host key (RejectPolicy otherwise)."""
    client = paramiko.SSHClient()
    key_type, blob = host_key_line.split()[:2]
    host = address if port == 22 else f"[{address}]:{port}"
    client.get_host_keys().add(
        host, key_type, paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
    )
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            address,
            port=port,
            username=USER,
            key_filename=str(key),
            timeout=10,
            allow_agent=False,
            look_for_keys=False,
        )
        _stdin, stdout, _stderr = client.exec_command(command, timeout=20)
        return stdout.read().decode()
    finally:
        client.close()


SshRun = Callable[[str, int, Path, str, str], str]


def kill_up_midway(
    spec: FleetSpec, provider: str, public_key: str, *, max_parallel: int, started: Callable[[], bool]
) -> None:
    """Run `prepare()` and the creation of 6 workers through `provider` ("module:Class")
    in a child process with no local state, and kill it as soon as `started()` holds;
    fails if the child finished first (the test would prove nothing)."""
    module, cls = provider.split(":")
    script = textwrap.dedent(f"""
        import json, pathlib, sys
        from fleet.spec.models import FleetSpec
        from fleet.providers.base import ProviderContext
        from fleet.model import NodeRequest, Role
        from {module} import {cls}
        spec = FleetSpec.model_validate(json.loads(sys.argv[1]))
        provider = {cls}(ProviderContext(spec=spec, state_dir=pathlib.Path("."),
                         public_key={public_key!r}, ssh_user={USER!r}), max_parallel={max_parallel})
        provider.prepare()
        provider.create([NodeRequest(name=f"{spec.name}-w{{i}}-g1", role=Role.WORKER, slot=i, generation=1,
                                     spot=True) for i in range(1, 7)])
        print("finished", flush=True)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(spec.model_dump(mode="json"))],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not started():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        child.kill()
    finally:
        child.kill()
        out, _err = child.communicate()
    assert b"finished" not in out, "the child finished before it was killed: the test proves nothing"
