"""Fixtures of the provider tests: fake GCE and fake EC2 servers on loopback, the fleet's
key, and providers pointed at the fakes. Nothing here reaches beyond 127.0.0.0/8:
google-auth's metadata-server probe and botocore's IMDS lookup are switched off before
either library is imported, and every test passes explicit `source_ranges`."""

from __future__ import annotations

import os

os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1:9"
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from provider_helpers import Sleeps

from fleet.providers.localnode import free_port, generate_ed25519_keypair


@pytest.fixture(autouse=True)
def _no_cloud_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real credentials or endpoints leak into a test from the machine."""
    for name in (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "CLOUDSDK_CONFIG",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    import google.auth.compute_engine._metadata as metadata  # imported early elsewhere: be sure

    monkeypatch.setattr(metadata, "_NO_GCE_CHECK", True, raising=False)


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key-do-not-print")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def fleet_key(tmp_path: Path) -> tuple[Path, str]:
    private = tmp_path / "keys" / "id_ed25519"
    return private, generate_ed25519_keypair(private, "fleet-test")


@pytest.fixture
def loopback() -> tuple[str, int]:
    """A loopback /24 of our own for the fakes' nodes, and a free SSH port on it."""
    base = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.1"
    return base, free_port(base)


# The fakes' instances are isolated nodes (as root with the tools), as strict as the clouds.
BACKING_ISOLATION = "auto"


@pytest.fixture
def fake_gce(tmp_path: Path, loopback: tuple[str, int]) -> Iterator[Any]:
    from fleet.testing.fake_gce import FakeGce

    base, port = loopback
    fake = FakeGce(nodes_root=tmp_path / "gce-nodes", ssh_port=port, address_base=base,
                   isolation=BACKING_ISOLATION).start()
    try:
        yield fake
    finally:
        fake.stop()
        shutil.rmtree(tmp_path / "gce-nodes", ignore_errors=True)


@pytest.fixture
def fake_ec2(
    tmp_path: Path, loopback: tuple[str, int], aws_credentials: None, monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    from fleet.testing.fake_ec2 import FakeEc2

    base, port = loopback
    fake = FakeEc2(nodes_root=tmp_path / "ec2-nodes", ssh_port=port, address_base=base,
                   isolation=BACKING_ISOLATION).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", fake.endpoint)
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()
