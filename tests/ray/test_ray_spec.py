"""Ray's parts that need no cluster: the `ray:` sections of fleet.yaml and job.yaml (file:line
errors), what each node's `ray start` is given, the working-dir package, and that the
control plane does not import ray."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fleet.errors import SpecErrors, UsageError
from fleet.fleetops import Fleet
from fleet.model import Node, NodeState, Role
from fleet.ray.cluster import RayCluster, ray_node
from fleet.ray.package import zip_working_dir
from fleet.spec.loader import load_fleet_spec, parse_job_spec
from fleet.worker.ray_jobs import exit_code, package_uri

FLEET_BIN = str(Path(sys.executable).with_name("fleet"))


def write(tmp_path: Path, text: str, name: str = "fleet.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_ray_defaults_fit_a_spot_fleet(tmp_path: Path) -> None:
    spec = load_fleet_spec(write(tmp_path, "name: demo\nprovider: local\nworkers: {count: 2}\nray: {enabled: true}\n"),
                           env={})
    ray = spec.ray
    assert ray.enabled and (ray.gcs_port, ray.dashboard_port, ray.head_cpus) == (6380, 8266, 0)
    assert (ray.health_check_period_ms, ray.health_check_timeout_ms, ray.health_check_failure_threshold) == \
        (1000, 2000, 3)
    assert ray.auth == "token"
    assert not load_fleet_spec(write(tmp_path, "name: dd\nprovider: local\nworkers: {count: 1}\n", "plain.yaml"),
                               env={}).ray.enabled


@pytest.mark.parametrize(("body", "field", "words"), [
    ("ray:\n  enabled: true\n  gcs_port: 80\n", "ray.gcs_port", "1024"),
    ("ray:\n  enabled: true\n  enable_dashboard: true\n", "ray.enable_dashboard", "unknown key"),
    ("ray:\n  enabled: true\n  auth: password\n", "ray.auth", "token"),
])
def test_bad_ray_settings_are_errors_at_their_line(tmp_path: Path, body: str, field: str, words: str) -> None:
    path = write(tmp_path, "name: demo\nprovider: local\nworkers: {count: 2}\n" + body)
    with pytest.raises(SpecErrors) as caught:
        load_fleet_spec(path, env={})
    error = next(e for e in caught.value.errors if e.field == field)
    assert error.line == 6 and words in str(error)
    result = subprocess.run([FLEET_BIN, "validate", "-f", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "fleet.yaml:6" in result.stderr and "Traceback" not in result.stderr


def test_a_ray_job_spec_covers_every_node_and_keeps_one_kind(tmp_path: Path) -> None:
    job = parse_job_spec("name: seeds\nray:\n  entrypoint: python tasks.py\n  working_dir: templates/ray\n",
                         file="job.yaml", env={})
    assert job.nodes == "all" and job.ray is not None and job.ray.working_dir == "templates/ray"
    with pytest.raises(SpecErrors) as both:
        parse_job_spec("name: x\nrun: echo\nray: {entrypoint: python p.py}\n", file="job.yaml", env={})
    assert "not both" in str(both.value)
    with pytest.raises(SpecErrors) as nested:
        parse_job_spec("name: x\nray:\n  entrypoint: python p.py\n  runtime_env:\n    working_dir: .\n",
                       file="job.yaml", env={})
    assert "ray.working_dir" in str(nested.value) and "job.yaml:5" in str(nested.value)


def _node(name: str, role: Role, address: str) -> Node:
    return Node(name=name, fleet="demo", role=role, state=NodeState.RUNNING, address=address, port=22)


def test_each_nodes_ray_start_arguments(tmp_path: Path) -> None:
    path = write(tmp_path, "name: demo\nprovider: local\nworkers:\n  count: 2\n  accelerators: {type: nvidia-l4, "
                 "count: 2}\nray: {enabled: true}\n")
    cluster = RayCluster(Fleet(load_fleet_spec(path, env={}), path))
    head, worker = _node("demo-head", Role.HEAD, "10.0.0.2"), _node("demo-w1-g1", Role.WORKER, "10.0.0.3")
    head_args = cluster.start_args(head, head)
    assert head_args[head_args.index("--port") + 1] == "6380" and "--head" in head_args
    assert head_args[head_args.index("--dashboard-host") + 1] == "127.0.0.1"  # the tunnel's way only
    assert head_args[head_args.index("--num-cpus") + 1] == "0"
    worker_args = cluster.start_args(worker, head)
    assert worker_args[worker_args.index("--address") + 1] == "10.0.0.2:6380"
    assert worker_args[worker_args.index("--num-gpus") + 1] == "2"
    assert worker_args[worker_args.index("--node-ip-address") + 1] == "10.0.0.3"
    assert '{"fleet_node:demo-w1-g1":1}' in worker_args
    assert "RAY_health_check_period_ms=1000" in cluster.ray_env()
    token = cluster.token()
    assert token and cluster.token() == token and (cluster.token_path.stat().st_mode & 0o777) == 0o600


def test_loopback_nodes_are_refused_before_anything_is_created(tmp_path: Path) -> None:
    path = write(tmp_path, f"name: demo\nprovider: local\nworkers: {{count: 1}}\nray: {{enabled: true}}\n"
                 f"local: {{root: {tmp_path / 'nodes'}, isolation: loopback}}\n")
    result = subprocess.run([FLEET_BIN, "up", "-f", str(path)], capture_output=True, text=True, check=False,
                            timeout=120)
    assert result.returncode == 2 and "addresses of their own" in result.stderr, result.stderr
    assert not list((tmp_path / "nodes").glob("*/*/node.json"))
    with pytest.raises(UsageError):
        RayCluster(Fleet(load_fleet_spec(path, env={}), path)).check_supported()


def test_ray_nodes_map_back_to_fleet_names_and_results_to_exit_codes() -> None:
    node = ray_node({"node_id": "ab", "node_ip": "10.0.0.3", "state": "DEAD", "is_head_node": False,
                     "resources_total": {"CPU": 2.0, "fleet_node:demo-w1-g1": 1.0, "node:10.0.0.3": 1.0}})
    assert node.fleet_node == "demo-w1-g1" and not node.alive
    assert node.to_dict()["resources"] == {"CPU": 2.0} and node.to_dict()["cpus"] == 2.0
    assert exit_code({"status": "SUCCEEDED"}) == 0
    assert exit_code({"status": "FAILED", "driver_exit_code": 3}) == 3
    assert exit_code({"status": "STOPPED"}) == 1


def test_the_working_dir_package_is_deterministic_and_skips_caches(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "prog.py").write_text("print(1)\n")
    (tmp_path / "pkg" / "sub" / "data.txt").write_text("x")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "prog.pyc").write_bytes(b"\0")
    (tmp_path / "pkg" / ".git").mkdir()
    (tmp_path / "pkg" / ".git" / "HEAD").write_text("ref")
    first = zip_working_dir(tmp_path / "pkg")
    assert zipfile.ZipFile(io.BytesIO(first)).namelist() == ["prog.py", "sub/data.txt"]
    assert zip_working_dir(tmp_path / "pkg") == first
    assert package_uri(first).startswith("gcs://_ray_pkg_") and package_uri(first).endswith(".zip")
    with pytest.raises(UsageError):
        zip_working_dir(tmp_path / "missing")


def test_the_control_plane_does_not_import_ray() -> None:
    code = ("import sys, fleet, fleet.cli, fleet.cli_ray, fleet.ray.cluster, fleet.ray.client, fleet.ray.jobspec, "
            "fleet.serve; fleet.cli.build_parser(); fleet.connect; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
