"""`Executor.get_tree` copies what nodes wrote (the report's fetch of a job directory):
a symlink swapped in after the listing is never followed, and a tree larger, fuller or
deeper than its limits is refused with a clear error instead of filling the disk."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from ssh_lab import SshLab

from fleet.errors import SSHError
from fleet.ssh import TreeLimits


def test_a_file_swapped_for_a_symlink_after_the_listing_is_not_followed(lab: SshLab, tmp_path: Path) -> None:
    node = lab.node("tree-swap")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET of the head\n")
    os.chmod(secret, 0o600)
    many = node.home / "job" / "many"
    many.mkdir(parents=True)
    names = [f"f{i:03d}.bin" for i in range(400)]
    for name in names:
        (many / name).write_bytes(b"x" * 32768)
        os.chmod(many / name, 0o644)
    copy = tmp_path / "copy"
    swapped = threading.Event()
    stop = threading.Event()

    def swap_once_the_copy_started() -> None:
        # Once the first file arrived, the listing is done: every other entry becomes a
        # link to the secret, the way a worker would race the fetch.
        while not stop.is_set():
            if copy.is_dir() and any(not p.name.startswith(".") for p in copy.rglob("*.bin")):
                break
            time.sleep(0.001)
        for name in names:
            link = many / f".{name}.link"
            link.symlink_to(secret)
            os.replace(link, many / name)
        swapped.set()

    swapper = threading.Thread(target=swap_once_the_copy_started)
    swapper.start()
    try:
        with lab.executor() as executor:
            written = executor.get_tree(lab.target(node), "job", copy)
    finally:
        stop.set()
        swapper.join(timeout=30)
    assert swapped.is_set(), "the copy ended before the swap: the test proved nothing"
    leaked = [p.name for p in copy.rglob("*") if p.is_file() and b"TOP-SECRET" in p.read_bytes()]
    assert not leaked, f"{len(leaked)} file(s) copied through a swapped-in symlink"
    assert 0 < len(written) < len(names)
    assert all(p.read_bytes() == b"x" * 32768 for p in written)


def test_a_tree_past_its_limits_is_refused_clearly(lab: SshLab, tmp_path: Path) -> None:
    node = lab.node("tree-limits")
    sparse = node.home / "big" / "sparse.bin"
    sparse.parent.mkdir(parents=True)
    with open(sparse, "wb") as handle:
        handle.truncate(64 << 30)  # 64 GiB that take no disk
    deep = node.home / "deep"
    deep.joinpath(*["d"] * 40).mkdir(parents=True)
    (deep.joinpath(*["d"] * 40) / "leaf.txt").write_text("leaf\n")
    full = node.home / "full"
    full.mkdir()
    for i in range(30):
        (full / f"{i}.txt").write_text(f"{i}\n")
    with lab.executor() as executor:
        target = lab.target(node)
        with pytest.raises(SSHError, match="more than 1,073,741,824 bytes"):
            executor.get_tree(target, "big", tmp_path / "big", limits=TreeLimits(max_bytes=1 << 30))
        with pytest.raises(SSHError, match="32 levels"):
            executor.get_tree(target, "deep", tmp_path / "deep")  # the default depth bound
        with pytest.raises(SSHError, match="more than 10 files"):
            executor.get_tree(target, "full", tmp_path / "full", limits=TreeLimits(max_files=10))
        assert len(executor.get_tree(target, "full", tmp_path / "all")) == 30
    assert not any(p.stat().st_size for p in (tmp_path / "big").rglob("*") if p.is_file())
