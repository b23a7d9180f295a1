"""fleet's runtime on the nodes (`~/.fleet/runtime/<version>/`), on real local fleets.

Today's local nodes can see the whole machine, the control plane's virtualenv included,
so these tests prove the runtime is what runs: FLEET_PYTHON points into it, a node whose
runtime was removed cannot start the worker (and says which runtime it lacks), `up`
brings it back without touching the complete nodes, a replacement gets it, a pip
failure is one node's error, and nodes install what the image lacks from the head's
wheelhouse, hash-checked."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from jobs_fleet import LocalFleet, plain_job

from fleet import __version__
from fleet.providers.localns import missing_for_namespaces
from fleet.runtime import DIST, LOCAL_IMAGE, STAMP, WHEELHOUSE, runtime_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(LOCAL_IMAGE, "bin", "python").exists(),
                       reason=f"the local nodes' image {LOCAL_IMAGE} is not built (`make image`)"),
]


def tiny_wheel(directory: Path, name: str = "fleettinypkg", version: str = "1.0", body: str = "VALUE = 1\n") -> Path:
    """A minimal pure-Python wheel: what the image lacks, served from a local directory."""
    directory.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": body.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: fleet-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


def exec_json(fleet: LocalFleet, command: str, nodes: str = "all") -> dict[str, dict]:
    done = fleet.cli("exec", "--nodes", nodes, "--json", "--", command)
    results = json.loads(done.stdout.strip().splitlines()[-1])["results"]
    return {r["node"]: r for r in results}


def up_json(fleet: LocalFleet) -> tuple[int, dict]:
    done = fleet.cli("up", "--json", timeout=300)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def runtime_events(fleet: LocalFleet, kind: str = "runtime") -> list[str]:
    return [e["node"] for e in fleet.events() if e["kind"] == kind]


def test_jobs_need_the_runtime_up_restores_it_and_replacements_get_it(make_fleet) -> None:
    fleet = make_fleet(workers=2)
    w1, w2 = fleet.worker(1), fleet.worker(2)
    # FLEET_PYTHON (and PATH) point into each node's own runtime, whose fleet is the wheel's
    # and whose torch is the image's.
    where = exec_json(fleet, '"$FLEET_PYTHON" -c "import sys, fleet, torch; print(sys.prefix, fleet.__file__, '
                             'torch.__file__)"; command -v fleet-worker')
    for name, result in where.items():
        prefix, fleet_file, torch_file, worker_bin = result["stdout"].split()
        home = fleet.node_home(name)
        assert prefix == f"{fleet.home_on_node(name)}/{runtime_dir()}", result
        assert fleet_file.startswith(prefix + "/lib/") and torch_file.startswith(LOCAL_IMAGE + "/"), result
        assert worker_bin == f"{prefix}/bin/fleet-worker"
        assert (home / runtime_dir() / STAMP).read_text().startswith(f"{DIST} {__version__} ")
    # Nodes carry what the worker needs, never the control plane's cloud SDKs.
    sdk = exec_json(fleet, '"$FLEET_PYTHON" -c "import boto3"', nodes=w2)[w2]
    assert sdk["exit_code"] != 0 and "No module named 'boto3'" in sdk["stderr"], sdk

    # A node without the runtime cannot run the worker, and says which runtime it lacks.
    exec_json(fleet, 'rm -rf "$HOME/.fleet/runtime"', nodes=w1)
    job = plain_job("needs-runtime", 20, nodes=[w1])
    failed = fleet.cli("run", str(fleet.write_job(job)), timeout=120)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"the node runtime {DIST} {__version__} is not installed" in failed.stderr, failed.stderr
    assert "fleet up" in failed.stderr

    # A runtime of another build (its stamp differs from what this control plane installs)
    # is refused as well.
    (fleet.node_home(w2) / runtime_dir() / STAMP).write_text(f"{DIST} {__version__} wheel=0ld settings=0ld\n")
    other = fleet.cli("run", str(fleet.write_job(plain_job("other-runtime", 10, nodes=[w2]))), timeout=120)
    assert other.returncode == 1, other.stdout + other.stderr
    assert "wheel=0ld" in other.stderr and "run `fleet up` to upgrade it" in other.stderr, other.stderr

    # `up` reinstalls (upgrades) it on those nodes only; the complete ones are left alone.
    before = len(runtime_events(fleet))
    code, summary = up_json(fleet)
    assert code == 0 and summary["failures"] == {}, summary
    assert sorted(runtime_events(fleet)[before:]) == [w1, w2]
    # The first `up`'s pilot reported its environment's layout: both only unpacked the
    # prepared tree (no Python, no pip on them).
    details = [e["detail"] for e in fleet.events() if e["kind"] == "runtime"][before:]
    assert all("the prepared tree" in detail for detail in details), details
    ran = fleet.cli("run", str(fleet.write_job(job)), "--json", timeout=180)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert json.loads(ran.stdout.strip().splitlines()[-1])["done"] == 20

    # A replacement gets the runtime before anything runs on it.
    assert fleet.cli("preempt", w1).returncode == 0
    code, summary = up_json(fleet)
    assert code == 0, summary
    replacement = fleet.worker(1, 2)
    assert replacement in summary["nodes"]
    assert (fleet.node_home(replacement) / runtime_dir() / STAMP).is_file()
    job2 = plain_job("on-replacement", 10, nodes=[replacement])
    ran = fleet.cli("run", str(fleet.write_job(job2)), "--json", timeout=180)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_a_pip_failure_is_that_nodes_error_and_the_others_come_up(make_fleet, tmp_path: Path) -> None:
    links = tmp_path / "links"
    tiny_wheel(links)
    # Isolated nodes cannot see this machine's `links` (nor any index): they get the
    # package through the head's wheelhouse, loopback nodes straight from `links`.
    runtime = {"packages": ["fleettinypkg==1.0"], "find_links": [str(links)], "index_url": links.as_uri(),
               "wheelhouse": missing_for_namespaces() is None}
    fleet = make_fleet(workers=2, extra={"runtime": runtime})
    w1, w2 = fleet.worker(1), fleet.worker(2)
    got = exec_json(fleet, '"$FLEET_PYTHON" -c "import fleettinypkg; print(fleettinypkg.__file__)"')
    assert all(r["stdout"].strip().startswith(f"{fleet.home_on_node(n)}/{runtime_dir()}")
               for n, r in got.items()), got

    # One node's pip is broken (its pip configuration names a constraints file that is not
    # there); its runtime is gone. `up` reports that node with pip's own words, the rest is up.
    config = fleet.node_home(w1) / ".config" / "pip" / "pip.conf"
    config.parent.mkdir(parents=True)
    config.write_text("[install]\nconstraint = /nonexistent/fleet-test-constraints.txt\n")
    exec_json(fleet, 'rm -rf "$HOME/.fleet/runtime"', nodes=w1)
    code, summary = up_json(fleet)
    assert code == 1
    assert set(summary["failures"]) == {w1}, summary
    message = summary["failures"][w1]
    assert f"the node runtime ({DIST} {__version__}) could not be installed" in message
    assert "pip could not install fleettinypkg==1.0" in message and "fleet-test-constraints.txt" in message, message
    assert {f"{fleet.name}-head", w2} <= set(summary["nodes"]) and w1 not in summary["nodes"]


def test_workers_without_an_index_install_from_the_heads_wheelhouse(make_fleet, tmp_path: Path) -> None:
    links = tmp_path / "links"
    tiny_wheel(links)
    # The index is the local directory too: the control plane's `pip download` asks no
    # index on the network for the test's made-up package.
    fleet = make_fleet(workers=2, extra={"runtime": {"packages": ["fleettinypkg==1.0"], "find_links": [str(links)],
                                                     "index_url": links.as_uri(), "wheelhouse": True}})
    w1 = fleet.worker(1)
    houses = list((fleet.shared / WHEELHOUSE).iterdir())
    assert len(houses) == 1 and [p.name for p in houses[0].iterdir()] == ["fleettinypkg-1.0-py3-none-any.whl"]
    got = exec_json(fleet, '"$FLEET_PYTHON" -c "import fleettinypkg; print(fleettinypkg.VALUE)"')
    assert {r["stdout"].strip() for r in got.values()} == {"1"}, got

    # The control plane's sources are gone: a node that lost its runtime gets the package
    # from the head's wheelhouse (nodes never use an index in this mode).
    for path in links.iterdir():
        path.unlink()
    exec_json(fleet, 'rm -rf "$HOME/.fleet/runtime"', nodes=w1)
    code, summary = up_json(fleet)
    assert code == 0, summary
    assert exec_json(fleet, '"$FLEET_PYTHON" -c "import fleettinypkg"', nodes=w1)[w1]["exit_code"] == 0

    # Workers can write to the shared directory: a wheel swapped there is refused, because
    # the hashes come from the control plane over SSH.
    wheel = next(houses[0].iterdir())
    wheel.unlink()
    tiny_wheel(houses[0], body="import os\nVALUE = 'evil'\n")
    exec_json(fleet, 'rm -rf "$HOME/.fleet/runtime"', nodes=w1)
    code, summary = up_json(fleet)
    assert code == 1 and set(summary["failures"]) == {w1}, summary
    assert "hash" in summary["failures"][w1].lower(), summary["failures"][w1]
    assert exec_json(fleet, '"$FLEET_PYTHON" -c "import fleettinypkg"', nodes=w1)[w1]["exit_code"] != 0


def test_nodes_waiting_for_a_pilot_leave_it_ssh_threads_when_it_needs_pip(make_fleet, tmp_path: Path) -> None:
    """The nodes of the pilot's environment stage the tree and wait for its layout on
    their channels, each holding one of the executor's threads. The pilot needs a second
    operation (the control plane's pip, for what the image lacks): with two threads and
    three waiting nodes it must still get one (it waited forever when all three waited)."""
    links = tmp_path / "links"
    tiny_wheel(links)
    fleet = make_fleet(workers=3, extra={
        "ssh": {"parallelism": 2}, "local": {"isolation": "loopback"},
        "runtime": {"packages": ["fleettinypkg==1.0"], "find_links": [str(links)], "index_url": links.as_uri()}})
    got = exec_json(fleet, '"$FLEET_PYTHON" -c "import fleettinypkg; print(fleettinypkg.VALUE)"')
    assert len(got) == 4 and {r["stdout"].strip() for r in got.values()} == {"1"}, got
    assert sorted(runtime_events(fleet)) == sorted(got), fleet.events()
