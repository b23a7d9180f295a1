"""sftp upload and download against real sshd: round trips, atomic replace, modes, trees."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from ssh_lab import SshLab

from fleet.errors import SSHError, UsageError
from fleet.ssh import Target


def test_put_then_get_round_trip_with_modes_and_parents(
    trio: SshLab, trio_targets: list[Target], tmp_path: Path
) -> None:
    payload = os.urandom(300_000)
    local = tmp_path / "script.sh"
    local.write_text("#!/bin/sh\necho from-script\n")
    with trio.executor() as executor:
        assert executor.put(trio_targets, payload, "files/deep/er/blob.bin", mode=0o600).ok
        assert executor.put(trio_targets, local, "files/run.sh", mode=0o755).ok
        ran = executor.run(trio_targets, "./files/run.sh")
        assert ran.ok and all(r.stdout == "from-script\n" for r in ran)
        for node, target in zip(trio.nodes, trio_targets):
            blob = node.home / "files/deep/er/blob.bin"
            assert blob.read_bytes() == payload
            assert blob.stat().st_mode & 0o777 == 0o600
            assert (node.home / "files/run.sh").stat().st_mode & 0o777 == 0o755
            assert sorted(p.name for p in (node.home / "files").iterdir()) == [
                "deep",
                "run.sh",
            ]  # no temp files
            back = tmp_path / "back" / target.name / "blob.bin"
            executor.get(target, "files/deep/er/blob.bin", back)
            assert back.read_bytes() == payload
            assert [p.name for p in back.parent.iterdir()] == ["blob.bin"]


def test_put_replaces_atomically_while_a_reader_watches(lab: SshLab) -> None:
    node = lab.node("atomic-node")
    target = lab.target(node)
    old, new = b"A" * 4_000_000, b"B" * 4_000_000
    path = node.home / "data" / "big.bin"
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            seen.add("old" if data == old else "new" if data == new else f"torn:{len(data)}")

    with lab.executor() as executor:
        assert executor.put([target], old, "data/big.bin").ok
        reader = threading.Thread(target=watch)
        reader.start()
        try:
            for _ in range(3):
                assert executor.put([target], new, "data/big.bin").ok
                assert executor.put([target], old, "data/big.bin").ok
        finally:
            stop.set()
            reader.join()
    assert seen <= {"old", "new"}, seen
    assert "old" in seen


def test_get_tree_copies_files_and_directories_but_not_symlinks(
    trio: SshLab, trio_targets: list[Target], tmp_path: Path
) -> None:
    target = trio_targets[0]
    with trio.executor() as executor:
        made = executor.run(
            [target],
            "mkdir -p job/metrics/sub && echo 1 > job/metrics/a.jsonl && "
            "echo 2 > job/metrics/sub/b.jsonl && ln -sf /etc/passwd job/metrics/link",
        )
        assert made.ok, made.summary()
        written = executor.get_tree(target, "job/metrics", tmp_path / "copy")
    assert sorted(p.relative_to(tmp_path / "copy").as_posix() for p in written) == ["a.jsonl", "sub/b.jsonl"]
    assert (tmp_path / "copy/a.jsonl").read_text() == "1\n" and (
        tmp_path / "copy/sub/b.jsonl"
    ).read_text() == "2\n"
    assert not (tmp_path / "copy/link").exists()


def test_missing_remote_files_and_bad_paths_are_clear_errors(
    trio: SshLab, trio_targets: list[Target], tmp_path: Path
) -> None:
    target = trio_targets[0]
    with trio.executor() as executor:
        with pytest.raises(SSHError, match="does not exist"):
            executor.get(target, "no/such/file", tmp_path / "x")
        with pytest.raises(SSHError, match="does not exist"):
            executor.get_tree(target, "no/such/dir", tmp_path / "y")
        with pytest.raises(UsageError):
            executor.put([target], b"x", "dir/")
        assert executor.put([target], b"x", "plainfile").ok
        blocked = executor.put([target], b"x", "plainfile/inside.txt")
    assert not blocked.ok and "plainfile" in blocked.summary()
    assert not (tmp_path / "x").exists()


def test_paths_reach_sftp_literally(trio: SshLab, trio_targets: list[Target], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weird = f"odd dir/$(touch {marker})/x; touch {marker} #'\".txt"
    target, node = trio_targets[0], trio.nodes[0]
    with trio.executor() as executor:
        assert executor.put([target], b"literal", weird).ok
        executor.get(target, weird, tmp_path / "got")
    assert (node.home / weird).read_bytes() == b"literal"
    assert (tmp_path / "got").read_bytes() == b"literal"
    assert not marker.exists()
