"""What a job hands to its nodes stays theirs, and nothing on the shared directory is
trusted (real local fleet, head + 2 workers): remote output is printed as text, a job's
env never reaches job.yaml, events or messages, nothing planted in the job directory is
imported or run, a forged pid file signals no stranger, and the temporary-file sweep
stays inside the job's own directories."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from jobs_fleet import LocalFleet, check_outputs, finish_fleet, plain_job, summary_of

from fleet.fleetops import Fleet
from fleet.jobs import JobRunner, sweep_root
from fleet.monitor import Monitor
from fleet.providers.localnode import LocalNode, generate_ed25519_keypair
from fleet.spec.loader import load_fleet_spec, parse_job_spec
from fleet.spec.models import FleetSpec


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    root = tmp_path_factory.mktemp("secfleet")
    local = LocalFleet(root, workers=2)
    try:
        local.up()
        yield local
    finally:
        finish_fleet(local)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_remote_output_is_printed_as_text_without_control_characters(fleet: LocalFleet) -> None:
    shown = fleet.cli("exec", "--nodes", "head", "--",
                      r"printf '[/usr/lib] [bold]x[/bold] \033]0;pwned\007\033[31mred\033[0m\n'")
    assert shown.returncode == 0, shown.stderr
    assert "[/usr/lib] [bold]x[/bold] red" in shown.stdout
    assert "\x1b" not in shown.stdout + shown.stderr and "\x07" not in shown.stdout
    failed = fleet.cli("exec", "--nodes", "head", "--", r"printf '[/oops] \033[2J\n' >&2; exit 3")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "[/oops]" in failed.stderr and "\x1b" not in failed.stderr


@pytest.mark.slow
def test_a_jobs_env_reaches_its_processes_and_nothing_else(fleet: LocalFleet) -> None:
    secret = f"hf_{uuid.uuid4().hex}"
    failing = {"name": "leaky", "nodes": "workers", "env": {"HF_TOKEN": secret},
               "setup": ['echo "token is $HF_TOKEN" >&2', "exit 3"], "run": "true"}
    started = fleet.cli("run", str(fleet.write_job(failing)), "--detach")
    assert started.returncode == 1 and "no node could start it" in started.stderr, started.stderr
    assert "token is ***" in started.stderr and secret not in started.stdout + started.stderr
    events = fleet.cli("events", "--json", check=True).stdout
    setup_failures = [e for e in json.loads(events) if e["kind"] == "job_setup_failed"]
    assert len(setup_failures) == 2 and all("token is ***" in e["detail"] for e in setup_failures)
    assert secret not in events
    # The env still reaches the job's processes, from a file only the node's user reads.
    job = {"name": "tokened", "nodes": "workers", "env": {"HF_TOKEN": secret, "QUOTED": "it's $HOME"},
           "run": 'printf "%s|%s" "$HF_TOKEN" "$QUOTED" > "$FLEET_SHARED/seen-$FLEET_NODE_NAME"'}
    result = fleet.cli("run", str(fleet.write_job(job)), "--json", "--timeout", "60")
    assert result.returncode == 0, result.stderr
    for worker in (fleet.worker(1), fleet.worker(2)):
        assert (fleet.shared / f"seen-{worker}").read_text() == f"{secret}|it's $HOME"
        node_dir = fleet.node_home(worker) / ".fleet" / "jobs" / "tokened"
        assert mode_of(node_dir) == 0o700 and mode_of(node_dir / "env.sh") == 0o600
        assert mode_of(node_dir / "launch.sh") == 0o700
    shared_yaml = (fleet.job_dir("tokened") / "job.yaml").read_text()
    assert secret not in shared_yaml and "env" not in yaml.safe_load(shared_yaml)
    assert secret not in fleet.cli("events", "--json", check=True).stdout
    state_dir = fleet.root / ".fleet" / fleet.name
    assert mode_of(fleet.root / ".fleet") == 0o700 and mode_of(state_dir) == 0o700
    assert mode_of(state_dir / "state.db") == 0o600


@pytest.mark.slow
def test_nothing_planted_in_the_job_directory_is_imported_or_run(fleet: LocalFleet, tmp_path: Path) -> None:
    job = plain_job("planted", 40, chunk_size=10)
    marker = tmp_path / "planted-code-ran"
    job_dir = fleet.job_dir("planted")
    payload = f"open({str(marker)!r}, 'a').write('ran\\n')\n"
    # What any worker can write there through its mount, before or during the job.
    for module in ("fleet/__init__.py", "fleet/worker/__init__.py", "fleet/worker/__main__.py",
                   "fleet/worker/sampler.py"):
        (job_dir / module).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / module).write_text(payload)
    (job_dir / "launch.sh").write_text(f"#!/bin/sh\necho ran >> {marker}\n")
    result = fleet.cli("run", str(fleet.write_job(job)), "--json", "--timeout", "120")
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["done"] == 40
    check_outputs(fleet, job)
    assert not marker.exists(), "code planted in the shared job directory ran"
    assert "#!/bin/sh\necho ran" in (job_dir / "launch.sh").read_text()  # never rewritten, never used
    head_launcher = fleet.node_home(f"{fleet.name}-head") / ".fleet" / "jobs" / "planted" / "launch.sh"
    assert head_launcher.exists() and mode_of(head_launcher) == 0o700


@pytest.mark.slow
def test_a_forged_pid_file_signals_no_stranger(fleet: LocalFleet) -> None:
    job = {"name": "sleeper", "nodes": "workers", "run": "sleep 60"}
    started = fleet.cli("run", str(fleet.write_job(job)), "--detach")
    assert started.returncode == 0, started.stderr
    pids = fleet.job_dir("sleeper") / "pids"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(pids.glob("*.pid"))) < 2:
        time.sleep(0.2)
    # A process group of someone else on the same machine, named by a forged pid file.
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        real = int((pids / f"{fleet.worker(2)}.pid").read_text())
        (pids / f"{fleet.worker(1)}.pid").write_text(f"{stranger.pid}\n")
        cancelled = fleet.cli("cancel", "sleeper")
        assert cancelled.returncode == 0, cancelled.stderr
        time.sleep(0.5)
        assert stranger.poll() is None, "cancel signalled a process group that is not the job's"
        with pytest.raises(ProcessLookupError):  # the genuine launcher was stopped
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                os.killpg(real, 0)
                time.sleep(0.2)
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.slow
def test_the_temporary_sweep_stays_in_the_jobs_own_directories(fleet: LocalFleet) -> None:
    head_home = fleet.node_home(f"{fleet.name}-head")
    old = time.time() - 3600
    strays = [head_home / ".precious.tmp", fleet.shared / ".other-job.tmp"]
    own = [fleet.shared / "out-sweep" / ".half.npy.tmp", fleet.job_dir("sweepy") / "claims" / ".c.tmp"]
    for path in [*strays, *own]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        os.utime(path, (old, old))
    spec = load_fleet_spec(fleet.spec_path)
    with Fleet(spec, fleet.spec_path) as handle:
        nodes = handle.observe()
        for outputs in ("..", "~", ".", "jobs"):
            runner = JobRunner(handle, parse_job_spec(
                f"name: sweepy\nworker: {{handler: checksum, inputs: 'x/*.txt', outputs: {outputs!r}}}\n",
                file="sweepy.yaml", env={}))
            runner.sweep_temporaries(nodes)
            assert all(p.exists() for p in strays), f"outputs {outputs!r} swept beyond the job"
        runner = JobRunner(handle, parse_job_spec(
            "name: sweepy\nworker: {handler: checksum, inputs: 'x/*.txt', outputs: out-sweep}\n",
            file="sweepy.yaml", env={}))
        assert runner.sweep_temporaries(nodes) == 2
    assert not any(p.exists() for p in own)
    assert all(p.exists() for p in strays)


@pytest.mark.parametrize(("shared", "outputs", "root"), [
    ("shared", "/", None), ("shared", "~", None), ("shared", "~/", None), ("shared", "..", None),
    ("shared", ".", None), ("shared", "jobs", None), ("shared", "a/../..", None), ("/srv/x", "/srv", None),
    ("/srv/x", "/", None), ("shared", "out", "shared/out"), ("shared", "/data/out", "/data/out"),
    ("shared", "~/elsewhere/out", "elsewhere/out"), ("/srv/x", "out/", "/srv/x/out"),
])
def test_the_sweep_root_of_an_outputs_setting(shared: str, outputs: str, root: str | None) -> None:
    assert sweep_root(shared, outputs) == root


@pytest.mark.slow
def test_down_on_an_existing_head_stops_the_recorded_groups_and_nothing_else(tmp_path: Path) -> None:
    key = tmp_path / "id_existing"
    public = generate_ed25519_keypair(key, "existing-head-test")
    machine = LocalNode.create(tmp_path / "machine", name="existing", fleet="existing-machine",
                               authorized_keys=[public])
    # Loopback workers on purpose: the existing head is an sshd on this machine's
    # 127.0.0.1, which isolated workers (they see only their bridge) cannot reach.
    local = LocalFleet(tmp_path / "f", workers=1, extra={
        "head": {"host": machine.address, "port": machine.port, "user": machine.user},
        "ssh": {"key": str(key)},
    }, isolation="loopback")
    decoy = None
    try:
        # A machine fleet did not create: its host key comes from the user, or first use
        # is trusted only when asked for by name.
        unvouched = local.cli("up")
        assert unvouched.returncode == 1 and "ssh.trust_on_first_use" in unvouched.stderr, unvouched.stderr
        local.spec["ssh"]["trust_on_first_use"] = [f"{local.name}-head"]
        local.spec_path.write_text(yaml.safe_dump(local.spec, sort_keys=False))
        trusted = local.cli("up")
        assert trusted.returncode == 0, trusted.stderr
        assert f"warning: {local.name}-head: trusting the host key" in trusted.stderr
        pinned = (local.root / ".fleet" / local.name / "known_hosts").read_text()
        assert f"{local.name}-head {machine.host_key_line}" in pinned
        # With the key given in the spec, it is the vouched one.
        local.spec["head"]["host_key"] = machine.host_key_line
        with Fleet(FleetSpec.model_validate(local.spec), local.spec_path) as handle:
            target = handle.target(handle.existing_head())
            assert target.host_key == machine.host_key_line and not target.trust_on_first_use
        started = local.cli("run", str(local.write_job({"name": "onhead", "nodes": "head", "run": "sleep 120"})),
                            "--detach")
        assert started.returncode == 0, started.stderr
        pid_file = machine.home / "shared" / "jobs" / "onhead" / "pids" / f"{local.name}-head.pid"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pid_file.exists():
            time.sleep(0.1)
        group = int(pid_file.read_text())
        # Another fleet's process on the same machine whose command line starts like ours.
        decoy = subprocess.Popen(["sh", "-c", "sleep 120; :", f"FLEET_FLEET={local.name}-2"])
        down = local.down()
        assert down.returncode == 0, down.stderr
        time.sleep(0.3)
        assert decoy.poll() is None, "down killed a process of another fleet"
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
        assert "1 job process group(s) on existing head" in down.stdout, down.stdout
        assert machine.is_running(), "down must leave the existing machine itself alone"
        keys = (machine.home / ".ssh" / "authorized_keys").read_text()
        assert "mount" not in keys
    finally:
        if decoy is not None:
            decoy.kill()
            decoy.wait()
        finish_fleet(local)
        machine.destroy()


@pytest.mark.slow
def test_two_monitors_give_a_lost_slot_one_next_generation(fleet: LocalFleet) -> None:
    """`fleet run` and `fleet watch` side by side (run last in this module: it preempts)."""
    victim = fleet.worker(2)
    assert fleet.cli("preempt", victim).returncode == 0
    spec = load_fleet_spec(fleet.spec_path)
    handles = [Fleet(spec, fleet.spec_path), Fleet(spec, fleet.spec_path)]
    try:
        monitors = [Monitor(handle) for handle in handles]
        barrier = threading.Barrier(2)
        reports: list[object] = []

        def one_pass(monitor: Monitor) -> None:
            barrier.wait()
            reports.append(monitor.reconcile_once())

        threads = [threading.Thread(target=one_pass, args=(m,)) for m in monitors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert len(reports) == 2
        events = handles[0].state.events()
        assert [e.node for e in events if e.kind == "replace_failed"] == []
        assert [e.node for e in events if e.kind == "replaced"] == [fleet.worker(2, 2)]
        slot_two = [n["name"] for n in fleet.status() if n["labels"].get("fleet-slot") == "2"]
        assert slot_two == [fleet.worker(2, 2)], slot_two
    finally:
        for handle in handles:
            handle.close()


def _with_mount_key(worker_home: Path, share: dict[str, object], program: str, *flags: str,
                    command: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ssh or sftp with a worker's mount key and files, as its share.json says."""
    options = ["-F", "/dev/null", "-i", str(worker_home / ".fleet" / "mount_key"), "-o", "IdentitiesOnly=yes",
               "-o", f"UserKnownHostsFile={worker_home / '.fleet' / 'known_hosts'}",
               "-o", f"HostKeyAlias={share['host_key_alias']}", "-o", "StrictHostKeyChecking=yes",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-P" if program == "sftp" else "-p",
               str(share["port"])]
    argv = [program, *options, *flags, f"{share['user']}@{share['host']}", *([command] if command else [])]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="a share account needs root on the head; as an ordinary user "
                    "loopback nodes fall back to forced SFTP on the head user's account (README, Security)")
def test_the_mount_key_opens_only_sftp_inside_the_shared_directory(fleet: LocalFleet, tmp_path: Path) -> None:
    worker_home = fleet.node_home(fleet.worker(1))
    share_file = worker_home / ".fleet" / "share.json"
    assert mode_of(share_file) == 0o600
    share = json.loads(share_file.read_text())
    assert share["confined"] is True and share["path"] == "/shared" and str(share["user"]).startswith("fs-")
    assert share["host_key_alias"] == f"{fleet.name}-head" and share["protocol"] == "sftp"
    head_home = fleet.node_home(f"{fleet.name}-head")
    guarded = [head_home / ".ssh" / "authorized_keys", head_home.parent / "sshd" / "authorized_keys"]
    before = {p: p.read_bytes() if p.exists() else None for p in guarded}
    # A command, with and without a PTY: no shell, whatever is asked.
    command = _with_mount_key(worker_home, share, "ssh", command="id; echo SHELL-REACHED")
    assert "SHELL-REACHED" not in command.stdout and "uid=" not in command.stdout
    pty = _with_mount_key(worker_home, share, "ssh", "-tt", command="echo SHELL-REACHED")
    assert "SHELL-REACHED" not in pty.stdout and "PTY allocation request failed" in pty.stderr
    # Port forwarding, both ways.
    forward = _with_mount_key(worker_home, share, "ssh", "-W", f"127.0.0.1:{share['port']}")
    assert forward.returncode != 0 and "prohibited" in forward.stderr, forward.stderr
    remote = _with_mount_key(worker_home, share, "ssh", "-N", "-o", "ExitOnForwardFailure=yes",
                             "-R", "0:127.0.0.1:22")
    assert remote.returncode != 0 and "forwarding failed" in remote.stderr, remote.stderr
    # SFTP sees the shared directory and nothing else: no /etc, no way up, no keys.
    outside = tmp_path / "got"
    for path in ("/etc/passwd", "../../etc/passwd", "/shared/../../etc/passwd", str(head_home / ".ssh" / "id")):
        got = _with_mount_key(worker_home, share, "sftp", "-b", "-", stdin=f"get {path} {outside}\n")
        assert got.returncode != 0 and not outside.exists(), f"read {path} outside the shared directory"
    payload = tmp_path / "key.pub"
    payload.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake x\n")
    for target in ("/.ssh/authorized_keys", "/shared/../.ssh/authorized_keys", *map(str, guarded)):
        put = _with_mount_key(worker_home, share, "sftp", "-b", "-",
                              stdin=f"-mkdir {Path(target).parent}\nput {payload} {target}\n")
        assert put.returncode != 0, f"wrote {target}"
    assert {p: p.read_bytes() if p.exists() else None for p in guarded} == before
    listing = _with_mount_key(worker_home, share, "sftp", "-b", "-", stdin="ls -1 /\n")
    assert listing.returncode == 0 and listing.stdout.split()[-1:] == ["/shared"], listing.stdout
    # ...and sshfs through it works both ways.
    (fleet.shared / "from-head.txt").write_text("hello workers\n")
    assert (worker_home / "shared" / "from-head.txt").read_text() == "hello workers\n"
    (worker_home / "shared" / "from-worker.txt").write_text("hello head\n")
    assert (fleet.shared / "from-worker.txt").read_text() == "hello head\n"
