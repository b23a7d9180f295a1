"""The fake metadata servers answer like GCE's and EC2's, and their triggers work."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from fleet.testing.fake_metadata import FakeMetadata


@pytest.fixture
def metadata() -> Iterator[FakeMetadata]:
    fake = FakeMetadata().start()
    try:
        yield fake
    finally:
        fake.stop()


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_gce_preempted_long_poll_returns_on_the_notice(metadata: FakeMetadata) -> None:
    url = f"{metadata.endpoint}computeMetadata/v1/instance/preempted"
    assert get(url)[0] == 403  # the header is required, as on GCE
    assert get(url, {"Metadata-Flavor": "Google"}) == (200, "FALSE")
    answers: list[tuple[int, str]] = []
    waiter = threading.Thread(target=lambda: answers.append(
        get(url + "?wait_for_change=true", {"Metadata-Flavor": "Google"})))
    waiter.start()
    time.sleep(0.3)
    assert answers == []  # still waiting
    started = time.monotonic()
    metadata.preempt()
    waiter.join(5)
    assert answers == [(200, "TRUE")] and time.monotonic() - started < 2


def test_gce_long_poll_times_out_with_the_unchanged_value(metadata: FakeMetadata) -> None:
    url = f"{metadata.endpoint}computeMetadata/v1/instance/preempted?wait_for_change=true&timeout_sec=1"
    assert get(url, {"Metadata-Flavor": "Google"}) == (200, "FALSE")


def test_ec2_spot_instance_action_needs_a_token_and_appears_on_interrupt(metadata: FakeMetadata) -> None:
    url = f"{metadata.endpoint}latest/meta-data/spot/instance-action"
    assert get(url)[0] == 401
    status, token = get(f"{metadata.endpoint}latest/api/token",
                        {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, method="PUT")
    assert status == 200 and token
    assert get(url, {"X-aws-ec2-metadata-token": token})[0] == 404  # no event yet
    urllib.request.urlopen(urllib.request.Request(f"{metadata.endpoint}_fake/spot-interrupt", method="POST",
                                                  data=b'{"in_s": 120}'), timeout=5).read()
    status, body = get(url, {"X-aws-ec2-metadata-token": token})
    assert status == 200 and '"action": "terminate"' in body and body.count("Z") == 1
    assert get(url, {"X-aws-ec2-metadata-token": "forged"})[0] == 401
