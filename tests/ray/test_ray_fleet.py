"""Ray on a real local fleet: one head and two workers (isolated nodes, real Ray 2.60),
one cluster shared by the tests of this module, brought down (and swept) at the end, also
when a test failed. The tests run in file order; the last ones break the cluster
(preemption, `fleet down`)."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBS_TESTS = REPO / "tests" / "jobs"
if str(JOBS_TESTS) not in sys.path:
    sys.path.insert(0, str(JOBS_TESTS))

from jobs_fleet import LocalFleet, finish_fleet, launched_processes_matching, wait_for

from fleet.providers.localns import missing_for_namespaces

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_for_namespaces() is not None,
                       reason=f"Ray nodes need addresses of their own: {missing_for_namespaces()}"),
]
TEMPLATES = REPO / "templates" / "ray"
RAY = {"enabled": True, "object_store_mb": 150, "join_timeout": 120}


@pytest.fixture(scope="module")
def ray_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    fleet = LocalFleet(tmp_path_factory.mktemp("ray"), workers=2, isolation="namespaces",
                       monitor={"interval": 1, "grace": 4}, extra={"ray": RAY})
    try:
        fleet.up()
        yield fleet
    finally:
        finish_fleet(fleet)


def ray_status(fleet: LocalFleet) -> dict:
    return json.loads(fleet.cli("ray", "status", "--json", check=True).stdout)


def alive_nodes(status: dict) -> dict[str, dict]:
    return {n["node"]: n for n in status["nodes"] if n["state"] == "ALIVE"}


def json_lines(text: str) -> dict[str, dict]:
    found = {}
    for line in text.splitlines():
        if line.startswith("{") and '"program"' in line:
            record = json.loads(line)
            found[record["program"]] = record
    return found


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({exc})"


def survive_diagnostics(fleet: LocalFleet) -> str:
    """What a stuck Ray job leaves to read: the head launcher's log, the Ray driver's and
    the GCS's logs on the head, the fleet's events and Ray's view of the nodes."""
    head = f"{fleet.name}-head"
    parts = [f"--- head launcher log\n{_tail(fleet.job_dir('survive') / 'logs' / f'{head}.log')}"]
    ray_logs = fleet.on_node(head, "/tmp/ray/session_latest/logs")
    for pattern in ("job-driver-survive-*.log", "gcs_server.out", "raylet.out"):
        for path in sorted(ray_logs.glob(pattern))[-1:]:
            parts.append(f"--- {path.name}\n{_tail(path)}")
    parts.append("--- events\n" + "\n".join(json.dumps(e) for e in fleet.events()[-25:]))
    parts.append("--- ray status\n" + fleet.cli("ray", "status", "--json", timeout=60).stdout[-3000:])
    return "\n".join(parts)


def test_up_starts_a_head_and_joins_every_worker_with_its_cpus(ray_fleet: LocalFleet) -> None:
    status = ray_status(ray_fleet)
    alive = alive_nodes(status)
    head, workers = f"{ray_fleet.name}-head", {f"{ray_fleet.name}-w1-g1", f"{ray_fleet.name}-w2-g1"}
    assert set(alive) == {head, *workers}, status
    assert alive[head]["head"] and alive[head]["cpus"] == 0  # head_cpus: 0, the head runs no tasks
    assert all(alive[w]["cpus"] >= 1 and not alive[w]["head"] for w in workers)
    assert status["not_joined"] == []
    assert len({n["node_id"] for n in alive.values()}) == 3


def test_seed_programs_give_their_known_results_and_tasks_spread(ray_fleet: LocalFleet) -> None:
    result = ray_fleet.cli("ray", "submit", "--working-dir", str(TEMPLATES), "--", "python", "run_all.py",
                           timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    found = json_lines(result.stdout)
    tasks = found["tasks"]
    assert tasks["sum"] == sum(range(8)) and tasks["tasks"] == 8
    assert set(tasks["nodes"]) == {f"{ray_fleet.name}-w1-g1", f"{ray_fleet.name}-w2-g1"}  # on both workers
    assert found["dependencies"]["shape"] == [200, 200] and found["dependencies"]["matches_local"]
    assert found["aggregate"]["linear"] == 36 and found["aggregate"]["tree"] == 36
    assert found["incremental"]["result"] == 6 and found["incremental"]["put"] == 10
    assert found["incremental"]["scaled_sum"] == 60 and sorted(found["incremental"]["order"]) == [0, 1, 2, 3]
    assert found["actors"]["first"] == [1, 1, 1, 1] and found["actors"]["second"] == [11, 11, 11, 11]
    assert found["map_reduce"]["simple"] == 9900 and found["map_reduce"]["tree"] == 9900


def test_submit_exits_with_the_jobs_result(ray_fleet: LocalFleet) -> None:
    failing = ray_fleet.cli("ray", "submit", "--", "python", "-c", "import sys; print('bye'); sys.exit(3)",
                            timeout=120)
    assert failing.returncode == 3, failing.stdout + failing.stderr
    assert "bye" in failing.stdout and "FAILED" in failing.stderr
    queued = ray_fleet.cli("ray", "submit", "--no-wait", "--", "python", "-c", "print(1)", timeout=60, check=True)
    assert queued.stdout.strip().startswith("fleet-")


def test_connect_gives_rays_jobs_client_and_the_dashboard_through_the_tunnel(ray_fleet: LocalFleet) -> None:
    from ray.job_submission import JobStatus

    import fleet

    with fleet.connect(ray_fleet.spec_path) as connection:
        url = connection.ray.dashboard_url
        assert url.startswith("http://127.0.0.1:")
        client = connection.ray.jobs_client()
        submission = client.submit_job(entrypoint="python -c \"print('from the client')\"")
        deadline = time.monotonic() + 90
        while client.get_job_status(submission) not in (JobStatus.SUCCEEDED, JobStatus.FAILED) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client.get_job_status(submission) == JobStatus.SUCCEEDED
        assert "from the client" in client.get_job_logs(submission)
        assert {n.fleet_node for n in connection.ray.nodes() if n.alive} >= {f"{ray_fleet.name}-head"}


def test_rays_ports_are_reachable_inside_the_fleet_only(ray_fleet: LocalFleet) -> None:
    status = ray_status(ray_fleet)
    head_ip = next(n["ip"] for n in status["nodes"] if n["head"] and n["state"] == "ALIVE")
    for port in (6380, 8266):  # the caller's side: dropped by the fleet's bridge
        with pytest.raises(OSError):
            socket.create_connection((head_ip, port), timeout=2).close()
    worker = f"{ray_fleet.name}-w1-g1"
    probe = "; ".join(f"if timeout 3 bash -c 'exec 3<>/dev/tcp/{head_ip}/{port}' 2>/dev/null; "
                      f"then echo {port}=open; else echo {port}=closed; fi" for port in (6380, 8266))
    result = ray_fleet.cli("exec", "--nodes", worker, "--", probe, check=True)
    assert "6380=open" in result.stdout  # the GCS: inside the fleet
    assert "8266=closed" in result.stdout  # the dashboard: on the head's loopback, the tunnel's way only


def test_a_preempted_worker_loses_no_task_the_actor_moves_and_the_replacement_joins(ray_fleet: LocalFleet) -> None:
    job = ray_fleet.root / "survive.yaml"
    job.write_text(f"name: survive\nray:\n  entrypoint: python survive.py --tasks 12 --seconds 2\n"
                   f"  working_dir: {shlex.quote(str(TEMPLATES))}\n")
    with ray_fleet.running("run", str(job)) as run:
        log = ray_fleet.job_dir("survive") / "logs" / f"{ray_fleet.name}-head.log"
        wait_for(lambda: log.exists() and "ACTOR_NODE " in log.read_text(), 120, "the actor's first answer")
        actor_node = log.read_text().split("ACTOR_NODE ", 1)[1].split()[0]
        assert actor_node.startswith(f"{ray_fleet.name}-w")
        ray_fleet.cli("preempt", actor_node, check=True)
        try:
            stdout, stderr = run.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the survive job did not end in 240 s\n{survive_diagnostics(ray_fleet)}")
    assert run.returncode == 0, stdout + stderr
    outcome = json_lines(log.read_text())["survive"]
    assert outcome["lost"] == 0 and outcome["all_results"] and outcome["tasks"] == 12
    assert outcome["actor_moved"] and outcome["actor_now"] != actor_node
    every_slot = {f"{ray_fleet.name}-head", f"{ray_fleet.name}-w1", f"{ray_fleet.name}-w2"}

    def slots_alive() -> set[str]:
        return {name.rsplit("-g", 1)[0] for name in alive_nodes(ray_status(ray_fleet))}

    if slots_alive() != every_slot:  # the run ended before its monitor's replacement joined: `up` converges
        ray_fleet.up()
    status = ray_status(ray_fleet)
    alive = alive_nodes(status)
    assert {name.rsplit("-g", 1)[0] for name in alive} == every_slot, status
    assert actor_node not in alive and any(n["node"] == actor_node and n["state"] == "DEAD" for n in status["nodes"])


def test_down_leaves_no_ray_process(ray_fleet: LocalFleet) -> None:
    assert launched_processes_matching(ray_fleet.name, "ray"), "the fleet's Ray processes are not found: the check is blind"
    result = ray_fleet.down()
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: not launched_processes_matching(ray_fleet.name, "ray"), 30, "no Ray process of the fleet")
