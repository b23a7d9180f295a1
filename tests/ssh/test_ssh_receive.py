"""Files that come on a command's stdin (`receive_files`: the mount step's key, a runtime tree): exactly
their bytes, 0600 in a 0700 directory, and a short stdin fails the command."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from fleet.ssh.quote import receive_files


def run(script: str, data: bytes, home: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["bash", "-c", script + "cat > rest.bin"], input=data, capture_output=True, cwd=home,
                          env={"HOME": str(home), "PATH": os.environ["PATH"]}, timeout=30, check=False)


def test_each_file_gets_exactly_its_bytes_private_and_the_rest_is_left_on_stdin(tmp_path: Path) -> None:
    key, share = b"-----BEGIN KEY-----\nsecret\n" * 40, b'{"user": "fleet-share"}\n'
    script = receive_files([(".fleet/mount_key", len(key)), (".fleet/share.json", len(share))])
    done = run(script, key + share + b"what the command reads next", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / ".fleet/mount_key").read_bytes() == key
    assert (tmp_path / ".fleet/share.json").read_bytes() == share
    assert (tmp_path / "rest.bin").read_bytes() == b"what the command reads next"
    assert stat.S_IMODE((tmp_path / ".fleet").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / ".fleet/mount_key").stat().st_mode) == 0o600
    assert not list((tmp_path / ".fleet").glob("*.part"))


def test_a_short_stdin_fails_and_leaves_the_old_file(tmp_path: Path) -> None:
    (tmp_path / ".fleet").mkdir(mode=0o700)
    (tmp_path / ".fleet/mount_key").write_bytes(b"old key")
    short = run(receive_files([(".fleet/mount_key", 100)]), b"only 20 bytes here..", tmp_path)
    assert short.returncode == 1 and b"could not write" in short.stderr
    assert (tmp_path / ".fleet/mount_key").read_bytes() == b"old key"


def test_files_in_two_directories_and_the_callers_umask_after(tmp_path: Path) -> None:
    script = "umask 022\n" + receive_files([("a/one", 3), ("b/c/two", 3), ("a/three", 1)]) + "umask > umask.txt\n"
    done = run(script, b"111222" + b"3", tmp_path)
    assert done.returncode == 0, done.stderr
    assert [(tmp_path / p).read_bytes() for p in ("a/one", "b/c/two", "a/three")] == [b"111", b"222", b"3"]
    assert all(stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700 for d in ("a", "b/c"))
    assert (tmp_path / "umask.txt").read_text().strip() == "0022"  # what the command does next is not 077
