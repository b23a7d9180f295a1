"""`--tmpfs` of the scaling benchmarks: their fleets' files on a private tmpfs.

On this machine every local node's disk is one shared ext4. Mounted without a journal,
its inode allocator skips the inodes deleted in the last 60-300 s (fs/ext4/ialloc.c,
recently_deleted(); seen with perf as 60% of tar's CPU after an earlier fleet's down):
one node's deletions slow every other node's file creation, which machines with disks
of their own never see. A fresh tmpfs per run removes that cross-node effect; the
benchmarks report their figures both ways.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def private_tmpfs(size: str = "4g") -> Iterator[Path]:
    """A fresh tmpfs as the temporary directory of this process (and of the `fleet`
    commands it runs, through TMPDIR), unmounted at the end."""
    mount = Path(tempfile.mkdtemp(prefix="fleet-bench-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "fleet-bench", str(mount)], check=True)
    previous, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(mount), str(mount)
    try:
        yield mount
    finally:
        tempfile.tempdir = previous
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)
