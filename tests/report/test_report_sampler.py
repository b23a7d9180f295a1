"""The node sampler, run for real: its lines, its stop conditions, its disk filter."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.worker.sampler import AppendLog, is_whole_physical_disk


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for_lines(path: Path, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not get {count} lines in {timeout} s")


def test_sigterm_flushes_and_exits_zero(processes, tmp_path):
    out = tmp_path / "metrics" / "n1.jsonl"
    sampler = processes.sampler(out, "n1", interval=0.2)
    _wait_for_lines(out, 4)
    sampler.send_signal(signal.SIGTERM)
    _, err = sampler.communicate(timeout=10)
    assert sampler.returncode == 0, err
    lines = _lines(out)  # every line complete: json.loads raises on a cut line
    info, samples = lines[0], lines[1:]
    assert info["kind"] == "info" and info["node"] == "n1" and info["interval"] == 0.2
    assert info["gpu"] is False and info["reason"]  # no GPU on this machine: says why
    assert samples and all(s["kind"] == "sample" and s["node"] == "n1" for s in samples)
    sample = samples[-1]
    assert set(sample["cpu"]) == {"user", "system", "iowait", "idle", "steal", "ncpu"}
    assert 95 <= sum(v for k, v in sample["cpu"].items() if k != "ncpu") <= 105
    assert set(sample["mem"]) == {"used_pct", "used_mb"} and sample["mem"]["used_mb"] > 0
    assert set(sample["net"]) >= {"rx_bps", "tx_bps"}
    assert sample["gpus"] == []
    for name, disk in sample["disks"].items():
        assert not name.startswith(("loop", "ram", "zram")), name
        assert set(disk) == {"read_bps", "write_bps", "busy_pct"} and 0 <= disk["busy_pct"] <= 100
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(samples)]
    assert gaps and 0.1 <= sorted(gaps)[len(gaps) // 2] <= 0.4  # ~0.2 s apart


def test_sigint_also_stops(processes, tmp_path):
    out = tmp_path / "n.jsonl"
    sampler = processes.sampler(out, "n", interval=0.2)
    _wait_for_lines(out, 2)
    sampler.send_signal(signal.SIGINT)
    sampler.communicate(timeout=10)
    assert sampler.returncode == 0


def test_stops_when_the_watched_process_exits_and_samples_its_tree(processes, tmp_path):
    out = tmp_path / "n.jsonl"
    busy = processes.start(
        [sys.executable, "-c", "import time\nend = time.time() + 2.5\nwhile time.time() < end: pass"]
    )
    sampler = processes.sampler(out, "n", pid=busy.pid, interval=0.25)
    busy.communicate(timeout=30)
    _, err = sampler.communicate(timeout=10)  # no signal: it must end on its own
    assert sampler.returncode == 0, err
    samples = [line for line in _lines(out) if line["kind"] == "sample"]
    assert samples[0]["proc"]["pid"] == busy.pid
    # a busy loop wants a whole core: what it got plus what it waited for in the run
    # queue (on a machine shared with other busy processes it gets less than a core)
    demand = [s["proc"]["cpu_pct"] + s["proc"]["runq_pct"] for s in samples[1:-1]]
    assert demand and max(demand) > 80, samples


def test_appends_to_an_existing_file(processes, tmp_path):
    out = tmp_path / "n.jsonl"
    out.write_text('{"t": 1, "kind": "sample", "node": "n"}\n')
    sampler = processes.sampler(out, "n", interval=0.2)
    _wait_for_lines(out, 3)
    sampler.send_signal(signal.SIGTERM)
    sampler.communicate(timeout=10)
    lines = _lines(out)
    assert lines[0] == {"t": 1, "kind": "sample", "node": "n"} and lines[1]["kind"] == "info"


def test_a_pid_that_is_gone_ends_quietly(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # reaped: its pid names no process now
    gone = finished.pid
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet.worker.sampler",
            "--out",
            str(tmp_path / "n.jsonl"),
            "--pid",
            str(gone),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "already exited" in result.stderr


@pytest.mark.parametrize("interval", ["0", "-1", "abc"])
def test_bad_interval_is_a_clear_error(tmp_path, interval):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet.worker.sampler",
            "--out",
            str(tmp_path / "n.jsonl"),
            "--interval",
            interval,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "interval" in result.stderr and "Traceback" not in result.stderr


def test_disk_filter_keeps_whole_physical_disks_only(tmp_path):
    sys_block = tmp_path / "block"
    for name, physical in (
        ("sda", True),
        ("nvme0n1", True),
        ("vda", True),
        ("dm-0", False),
        ("md0", False),
        ("loop0", False),
        ("zram0", False),
        ("sr0", True),
    ):
        (sys_block / name).mkdir(parents=True)
        if physical:
            (sys_block / name / "device").mkdir()
    assert is_whole_physical_disk("sda", sys_block)
    assert is_whole_physical_disk("nvme0n1", sys_block)
    assert is_whole_physical_disk("vda", sys_block)
    # partitions are not in /sys/block; stacked, virtual and optical devices are left out
    for name in ("sda1", "nvme0n1p2", "dm-0", "md0", "loop0", "zram0", "sr0", "ram0"):
        assert not is_whole_physical_disk(name, sys_block), name
    # without /sys: decide by name
    missing = tmp_path / "no-sys"
    assert is_whole_physical_disk("sdb", missing) and not is_whole_physical_disk("sdb1", missing)
    assert not is_whole_physical_disk("nvme1n1p1", missing) and is_whole_physical_disk("nvme1n1", missing)


def test_a_failed_write_is_survived_and_the_file_reopened(tmp_path):
    """/dev/full fails every write (ENOSPC), as a file on a dropped sshfs mount does;
    once the path works again, the next line reopens it."""
    link = tmp_path / "n.jsonl"
    link.symlink_to("/dev/full")
    log = AppendLog(link)
    log.open()
    log.write('{"lost": 1}\n')  # fails: no exception
    assert log.failed_writes == 1
    real = tmp_path / "real.jsonl"
    link.unlink()
    link.symlink_to(real)
    log.write('{"kept": 2}\n')
    log.close()
    assert real.read_text() == '\n{"kept": 2}\n'  # a newline first: a cut line stays apart


def test_sampler_keeps_going_through_write_failures(processes, tmp_path):
    link = tmp_path / "n.jsonl"
    link.symlink_to("/dev/full")
    sampler = processes.sampler(link, "n", interval=0.2)
    time.sleep(1.5)
    assert sampler.poll() is None  # still running although every write failed
    real = tmp_path / "real.jsonl"
    link.unlink()
    link.symlink_to(real)
    _wait_for_lines(real, 3)
    sampler.send_signal(signal.SIGTERM)
    _, err = sampler.communicate(timeout=10)
    assert sampler.returncode == 0
    assert err.decode().count("cannot write") == 1  # said once, not once per tick
    lines = [json.loads(line) for line in real.read_text().splitlines() if line]
    assert lines and all(line["kind"] == "sample" for line in lines)
