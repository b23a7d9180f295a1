"""The head's data disk on local fleets, through the CLI: the shared directory lives in
the fleet's data directory (outside the head's own), `fleet down --keep-data` keeps it
and the next `fleet up` gives it to the new head, and `fleet down` deletes it, also
when the local state is gone. In both isolations."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
from e2e_helpers import CliFleet, leftovers, nothing_left

from fleet.providers.localns import missing_for_namespaces


@pytest.mark.parametrize("isolation", ["loopback", "namespaces"])
def test_the_shared_directory_outlives_the_head_through_down_keep_data(make_fleet: Callable[..., CliFleet],
                                                                       isolation: str) -> None:
    if isolation == "namespaces" and (reason := missing_for_namespaces()):
        pytest.skip(reason)
    fleet = make_fleet(1, local={"isolation": isolation}, runtime={"install": False}, setup=[])
    fleet.up()
    data = fleet.root / fleet.name / ".data"
    code, results = fleet.exec_json('echo kept > "$FLEET_SHARED/a.txt"', nodes="workers")
    assert code == 0, results
    assert (data / "shared" / "a.txt").read_text() == "kept\n"  # written through the mount, onto the data disk

    down = fleet.cli("down", "--yes", "--keep-data")
    assert down.returncode == 0, down.stderr + down.stdout
    assert f"kept local data disk {data}" in down.stdout and "without --keep-data deletes it" in down.stdout
    assert nothing_left(leftovers(fleet.root, fleet.name)) and fleet.nodes() == {}
    assert (data / "shared" / "a.txt").exists()

    fleet.up()  # a new head attaches the kept disk; the workers mount it
    code, results = fleet.exec_json('cat "$FLEET_SHARED/a.txt"')
    assert code == 0 and {n: r["stdout"] for n, r in results.items()} == {n: "kept\n" for n in results}, results

    shutil.rmtree(fleet.dir / ".fleet")  # the local state is lost
    down = fleet.cli("down", "--yes")
    assert down.returncode == 0, down.stderr + down.stdout
    assert f"deleted local data disk {data}" in down.stdout
    assert not (fleet.root / fleet.name).exists() and nothing_left(leftovers(fleet.root, fleet.name))
