"""Bulk I/O (`io: bulk`): the head's packer and workers over a real sshfs mount.

The packer runs as on a head: a process of its own working on the head's local
directory (the one the test sshd serves); workers reach that directory only through
their sshfs mounts.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import worker_plugins
from worker_helpers import (
    REPO,
    assert_checksum_outputs,
    chunk_ids,
    done_chunk_counts,
    kill_group,
    make_job,
    metric_lines,
    run_cli,
    sha256_hex,
    start_worker,
    visible_files,
    wait_for,
    worker_env,
    write_files,
)

from fleet.worker.bulk import (
    MAGIC,
    PACK_WAIT_S,
    BulkClient,
    choose_io,
    out_ack,
    out_pack,
    read_pack_header,
    write_pack_header,
)
from fleet.worker.config import WorkerConfig
from fleet.worker.inputs import freeze
from fleet.worker.layout import JobLayout, load_worker_config
from fleet.worker.packer import Packer
from fleet.worker.runner import run_worker


def start_packer(job: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "fleet.worker.packer", str(job), *args],
        stdout=open(log, "wb"),  # noqa: SIM115 - the child holds it
        stderr=subprocess.STDOUT,
        env=worker_env(),
        cwd=REPO,
        start_new_session=True,
    )
    wait_for(lambda: (job / "bulk" / "packer.json").exists() or proc.poll() is not None, 60, "the packer")
    assert proc.poll() is None, log.read_text()
    return proc


class OutputWatcher:
    """Scans the head's output directory over and over while a job runs: every visible
    output must be complete and correct, and a chunk's outputs appear all at once."""

    def __init__(self, job: Path, corpus: Path, out: Path) -> None:
        self.job, self.corpus, self.out = job, corpus, out
        self.problems: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        chunks = json.loads((self.job / "chunks.json").read_text())
        groups = [chunks["files"][c["files"][0] : c["files"][1]] for c in chunks["chunks"]]
        while not self._stop.is_set():
            done = set(os.listdir(self.job / "done")) if (self.job / "done").exists() else set()
            for chunk, rels in zip(chunks["chunks"], groups):
                present = []
                for rel in rels:
                    path = self.out / (rel + ".sha256")
                    try:
                        data = path.read_bytes()
                    except FileNotFoundError:
                        continue
                    present.append(rel)
                    if data != (sha256_hex((self.corpus / rel).read_bytes()) + "\n").encode():
                        self.problems.append(f"partial or wrong output {rel}: {data!r}")
                if chunk["id"] in done and len(present) < len(rels):
                    self.problems.append(f"{chunk['id']} is done with {len(present)}/{len(rels)} outputs")
            self.scans += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.slow
def test_bulk_over_sshfs_equals_mount_atomic_outputs_done_last(
    shared: Path, sshfs_mount, tmp_path: Path
) -> None:
    inputs = write_files(shared / "corpus", 240, per_dir=40)
    worker = {"handler": "checksum", "inputs": "corpus/**/*.txt", "chunk_size": 30, "batch_size": 16}
    make_job(shared, "viamount", {**worker, "outputs": "out_mount", "io": "mount"})
    bulk_job = make_job(shared, "viabulk", {**worker, "outputs": "out_bulk", "io": "bulk"})
    view = sshfs_mount(shared, "node0")
    for name in ("viamount", "viabulk"):
        assert run_cli(str(view / "jobs" / name), "--init").returncode == 0
    packer = start_packer(bulk_job, tmp_path / "packer.log")
    watcher = OutputWatcher(bulk_job, shared / "corpus", shared / "out_bulk")
    try:
        for name in ("viamount", "viabulk"):
            result = run_cli(str(view / "jobs" / name), "--node", "node0", timeout=150)
            assert result.returncode == 0, result.stderr
        assert packer.wait(timeout=60) == 0
    finally:
        watcher.close()
        kill_group(packer, signal.SIGKILL)
    assert watcher.scans > 0 and watcher.problems == []
    assert_checksum_outputs(shared / "corpus", shared / "out_bulk", inputs)
    mount_outputs = {p.relative_to(shared / "out_mount"): p.read_bytes() for p in visible_files(shared / "out_mount")}
    bulk_outputs = {p.relative_to(shared / "out_bulk"): p.read_bytes() for p in visible_files(shared / "out_bulk")}
    assert bulk_outputs == mount_outputs
    # Through the packer, not the fallback: it packed and unpacked every file.
    assert "packed 240 inputs" in (log := (tmp_path / "packer.log").read_text()) and "unpacked 240 outputs" in log
    assert done_chunk_counts(bulk_job) == {c: 1 for c in chunk_ids(bulk_job)}
    assert visible_files(bulk_job / "bulk") == []  # packs of done chunks are removed
    assert not (bulk_job / "bulk" / "packer.json").exists()


@pytest.mark.slow
def test_bulk_worker_killed_mid_chunk_loses_only_that_chunk(shared: Path, sshfs_mount, tmp_path: Path) -> None:
    inputs = write_files(shared / "corpus", 60, per_dir=20)
    job = make_job(
        shared,
        "bulkkill",
        {
            "handler": "worker_plugins:slow_checksum",
            "handler_options": {"delay_s": 0.05},
            "inputs": "corpus/**/*.txt",
            "outputs": "out",
            "chunk_size": 20,
            "batch_size": 4,
            "prefetch": 1,
            "lease_seconds": 3,
            "heartbeat_seconds": 0.5,
            "io": "bulk",
        },
    )
    victim_mount, rescuer_mount = sshfs_mount(shared, "victim"), sshfs_mount(shared, "rescuer")
    assert run_cli(str(victim_mount / "jobs" / "bulkkill"), "--init").returncode == 0
    packer = start_packer(job, tmp_path / "packer.log")
    watcher = OutputWatcher(job, shared / "corpus", shared / "out")
    try:
        victim = start_worker(victim_mount / "jobs" / "bulkkill", "--node", "victim", log=tmp_path / "v.log")
        try:
            wait_for(lambda: len(os.listdir(job / "done")) >= 1, 90, "a first done chunk")
            wait_for(lambda: any(not n.startswith(".") for n in os.listdir(job / "claims")), 30, "a held chunk")
            kill_group(victim, signal.SIGKILL)
            victim.wait(timeout=10)
        finally:
            kill_group(victim, signal.SIGKILL)
        done_before = set(os.listdir(job / "done"))
        held = [n for n in os.listdir(job / "claims") if not n.startswith(".") and n not in done_before]
        assert held
        result = run_cli(str(rescuer_mount / "jobs" / "bulkkill"), "--node", "rescuer", timeout=150)
        assert result.returncode == 0, result.stderr
        assert packer.wait(timeout=60) == 0
    finally:
        watcher.close()
        kill_group(packer, signal.SIGKILL)
    assert watcher.problems == []
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)
    # (the victim may leave a hidden temporary marker, killed between write and rename)
    assert sorted(n for n in os.listdir(job / "done") if not n.startswith(".")) == chunk_ids(job)
    assert set(done_chunk_counts(job).values()) == {1}  # (the victim may die before its metrics line)
    rescued = {r["chunk"] for r in metric_lines(job) if r["kind"] == "chunk" and r["node"] == "rescuer"}
    assert set(held) <= rescued and not (done_before & rescued)  # lost: only what the victim held
    assert "unpacked 60 outputs" in (tmp_path / "packer.log").read_text()


def test_io_auto_picks_bulk_for_many_small_files(shared: Path) -> None:
    write_files(shared / "small", 40)
    big = shared / "big"
    big.mkdir()
    for i in range(40):
        with open(big / f"f{i:03d}.bin", "wb") as handle:
            handle.truncate(2 << 20)  # sparse: 2 MiB each, no disk used

    def chosen(inputs: str, **worker: object) -> str:
        job = make_job(shared, f"auto{len(os.listdir(shared / 'jobs'))}", {
            "handler": "checksum", "inputs": inputs, "outputs": "out", **worker,
        })
        layout = JobLayout.at(job)
        config = load_worker_config(layout)
        chunks = freeze(layout, config)
        return choose_io(config, chunks, chunks.base_path(layout))

    assert chosen("small/**/*.txt", chunk_size=20) == "bulk"
    assert chosen("small/**/*.txt") == "bulk"  # default chunk of 100 files
    assert chosen("small/**/*.txt", chunk_size=8) == "mount"  # chunks too small to be worth a pack
    assert chosen("big/*.bin", chunk_size=20) == "mount"  # large files: the mount streams them well
    assert chosen("big/*.bin", chunk_size=20, io="bulk") == "bulk"
    assert chosen("small/**/*.txt", chunk_size=20, io="mount") == "mount"
    assert chosen("small/**/*.txt", mode="records") == "mount"
    with pytest.raises(ValueError, match="io: bulk applies to files mode"):
        WorkerConfig(handler="checksum", inputs="x/*", outputs="o", mode="records", io="bulk")


def test_without_a_packer_bulk_falls_back_to_the_mount(shared: Path) -> None:
    inputs = write_files(shared / "corpus", 50)
    job = make_job(shared, "nopacker", {"handler": "checksum", "inputs": "corpus/**/*.txt", "outputs": "out",
                                        "chunk_size": 20, "io": "bulk"})
    summary = run_worker(job, node="n0", install_signal_handlers=False)
    assert summary["items"] == 50 and summary["reason"] == "done"
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)


def test_packer_refuses_what_a_worker_must_not_write_or_read(shared: Path, tmp_path: Path) -> None:
    write_files(shared / "corpus", 4, per_dir=2)
    (shared / "corpus" / "d01" / "sub").mkdir()
    (shared / "corpus" / "d01" / "sub" / "deep.txt").write_text("deep\n")
    (tmp_path / "secret.txt").write_text("the head's own file\n")
    (shared / "corpus" / "d00" / "link.txt").symlink_to(tmp_path / "secret.txt")
    job = make_job(shared, "hostile", {"handler": "checksum", "inputs": "corpus/**/*.txt", "outputs": "out",
                                       "chunk_size": 20, "io": "bulk"})
    layout = JobLayout.at(job)
    layout.make_dirs()
    packer = Packer(layout, poll_s=0.01)
    assert packer.serves() is None
    chunk = packer.order[0]
    rels = packer.chunks.chunk_files(packer.by_id[chunk])
    assert "d00/link.txt" in rels
    (job / "bulk" / "in").mkdir(parents=True)
    (job / "bulk" / "out").mkdir(parents=True)
    packer._pack(chunk)
    assert packer.packed_files == len(rels) - 1  # the symlink out of the shared root is left out
    (shared / "out" / "d00").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (shared / "out" / "d01").symlink_to(tmp_path / "outside")  # planted by a worker
    names = ["d00/f00000.txt.sha256", "../../evil.sha256", "d00/unknown.txt.sha256", "d01/f00002.txt.sha256",
             "d01/sub/deep.txt.sha256"]
    path = out_pack(layout, chunk, "abcdef0123")
    with open(path, "wb") as handle:
        write_pack_header(handle, names, [3, 3, 3, 3, 3])
        handle.write(b"ok\nno\nno\nno\nno\n")
    packer._unpack(path)
    ack = json.loads(out_ack(layout, chunk, "abcdef0123").read_text())
    assert ack["files"] == 1 and len(ack["rejected"]) == 4, ack
    assert (shared / "out" / "d00" / "f00000.txt.sha256").read_bytes() == b"ok\n"
    # Nothing outside: not even a directory made through the planted link.
    assert not (shared.parent / "evil.sha256").exists() and os.listdir(tmp_path / "outside") == []
    assert not path.exists()


@pytest.mark.parametrize(
    "raw",
    [
        b"not a pack at all",
        MAGIC + b"%012d\n" % 2 + b"[]",
        MAGIC + b"%012d\n" % 30 + b'{"names":["a"],"sizes":[-1]}  ',
        MAGIC + b"%012d\n" % 26 + b'{"names":["a"],"sizes":[]}',
        MAGIC + b"999999999999\n",
    ],
)
def test_a_malformed_pack_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        read_pack_header(io.BytesIO(raw))


def test_a_pack_round_trips() -> None:
    out = io.BytesIO()
    write_pack_header(out, ["a/b.txt", "c.txt"], [3, 0])
    out.write(b"abc")
    handle = io.BytesIO(out.getvalue())
    assert read_pack_header(handle) == [("a/b.txt", 3), ("c.txt", 0)]
    assert handle.read() == b"abc"


def test_bulk_items_are_prepared_in_the_reader_threads(shared: Path, tmp_path: Path) -> None:
    """Items loaded from a chunk's pack get the handler's prepare step (tokenising, for
    text-embed) in a reader thread, as items read through the mount do."""
    corpus = shared / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i:02d}.txt").write_text(f"text {i}" if i != 5 else "POISON 5")
    job = make_job(shared, "prepbulk", {"handler": "worker_plugins:PreparingChecksum", "inputs": "corpus/*.txt",
                                         "outputs": "out", "chunk_size": 20, "io": "bulk"})
    assert run_cli(str(job), "--init").returncode == 0
    worker_plugins.CALLS.pop("prepare_threads", None)
    packer = start_packer(job, tmp_path / "packer.log")
    try:
        summary = run_worker(job, node="n0", install_signal_handlers=False)
        assert packer.wait(timeout=60) == 0
    finally:
        kill_group(packer, signal.SIGKILL)
    assert summary["items"] == 39 and summary["failed"] == 1
    assert "unpacked 39 outputs" in (tmp_path / "packer.log").read_text()  # through the packs, not the mount
    for i in range(40):
        output = shared / "out" / f"{i:02d}.txt.sha256"
        if i == 5:
            assert not output.exists()
            continue
        assert output.read_text().split() == [sha256_hex(f"TEXT {i}".encode())]
    threads = worker_plugins.CALLS["prepare_threads"]
    assert threads and all(name.startswith("fleet-reader") for name in threads)


def test_a_stopping_worker_hands_its_chunks_over_however_late_the_ack(shared: Path, tmp_path: Path) -> None:
    """A slow ack (the packer stalled: SIGSTOP, its heartbeat still fresh) must not hold a
    stopping worker nor cost a recomputation: the stop hands the packs over at once, and
    the next holder settles them (waits for their acks) and computes nothing twice."""
    inputs = write_files(shared / "corpus", 100, per_dir=100)
    job = make_job(shared, "handover", {
        "handler": "worker_plugins:CountingChecksum", "handler_options": {"delay_s": 0.05},
        "inputs": "corpus/**/*.txt", "outputs": "out", "chunk_size": 20, "batch_size": 4, "io": "bulk",
    })
    assert run_cli(str(job), "--init").returncode == 0
    worker_plugins.CALLS["computed"] = []
    packer = start_packer(job, tmp_path / "packer.log")
    out = job / "bulk" / "out"
    try:
        wait_for(lambda: len(visible_files(job / "bulk" / "in")) >= 5, 60, "the inputs packed")
        kill_group(packer, signal.SIGSTOP)  # from now on no ack comes
        stop = threading.Event()
        stopped: list[dict[str, object]] = []
        first = threading.Thread(target=lambda: stopped.append(
            run_worker(job, node="n0", stop=stop, install_signal_handlers=False)))
        first.start()
        wait_for(lambda: any(n.endswith(".pack") for n in os.listdir(out)), 60, "a delivered pack")
        stop.set()
        first.join(timeout=20)  # `fleet cancel` SIGKILLs a worker after 10 s
        assert not first.is_alive(), "the stopping worker waited for the stalled packer's ack"
        assert stopped and stopped[0]["reason"] == "signal", stopped
        assert visible_files(job / "done") == []  # no ack came: nothing may be marked done
        handed = [n for n in os.listdir(out) if n.endswith(".pack")]
        assert handed
        kill_group(packer, signal.SIGCONT)
        summary = run_worker(job, node="n1", install_signal_handlers=False)
        assert summary["reason"] == "done"
        assert packer.wait(timeout=60) == 0
    finally:
        kill_group(packer, signal.SIGCONT)
        kill_group(packer, signal.SIGKILL)
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)
    computed = worker_plugins.CALLS["computed"]
    assert sorted(computed) == sorted(path.read_bytes() for path in inputs)  # each exactly once
    chunks = [r for r in metric_lines(job) if r["kind"] == "chunk"]
    assert any(r["node"] == "n0" and r["outcome"] == "released" and r["items"] > 0 for r in chunks), chunks
    assert any(r["node"] == "n1" and r["skipped"] > 0 for r in chunks), chunks  # took over, not recomputed


@pytest.mark.parametrize("tmpfile", [True, False], ids=["o_tmpfile", "tmp_rename"])
def test_the_packer_places_outputs_atomically_replacing_not_following(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmpfile: bool
) -> None:
    from fleet.worker import packer as packer_module

    if tmpfile and not packer_module._tmpfile_works:
        pytest.skip("this filesystem has no O_TMPFILE")
    monkeypatch.setattr(packer_module, "_tmpfile_works", tmpfile)
    (tmp_path / "elsewhere.txt").write_text("not ours\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.sha256").write_text("stale\n")
    (out / "link.sha256").symlink_to(tmp_path / "elsewhere.txt")  # planted
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("new.sha256", "old.sha256", "link.sha256"):
            packer_module.place_atomic(fd, name, f"{name}\n".encode())
    finally:
        os.close(fd)
    for name in ("new.sha256", "old.sha256", "link.sha256"):
        assert (out / name).read_text() == f"{name}\n" and not (out / name).is_symlink()
    assert (tmp_path / "elsewhere.txt").read_text() == "not ours\n"
    assert sorted(os.listdir(out)) == ["link.sha256", "new.sha256", "old.sha256"]  # no temporary left


def test_a_stopping_worker_does_not_wait_for_an_input_pack(shared: Path) -> None:
    """A packer that serves (fresh heartbeat) but has not packed the chunk: the fetch
    gives up as soon as the worker stops, instead of waiting up to PACK_WAIT_S."""
    job = make_job(shared, "nopack", {"handler": "checksum", "inputs": "corpus/*.txt", "outputs": "out",
                                      "io": "bulk"})
    layout = JobLayout.at(job)
    (job / "bulk").mkdir(parents=True)
    (job / "bulk" / "packer.json").write_text(json.dumps({"io": "bulk", "pid": os.getpid(), "t": 0}))
    client = BulkClient(layout, shared / "out", shared)
    assert client.active()
    stopping = threading.Event()
    threading.Timer(0.3, stopping.set).start()
    started = time.monotonic()
    assert client.fetch("c000000", {"a.txt"}, stopping=stopping) is None
    assert time.monotonic() - started < 0.3 + PACK_WAIT_S / 4


def _ledger_job(
    shared: Path, name: str, ledger: Path, batch_size: int, **options: object
) -> tuple[Path, list[Path]]:
    """A bulk job of 200 inputs of varied lengths (bucketed by length), chunks of 20, the
    default prefetch (8 batches: 2-4 chunks), whose handler notes every computation in
    `ledger`; options (delay, hang) apply to node "victim" only."""
    inputs = write_files(shared / "corpus", 200, per_dir=100, text=lambda i: "x" * (i * 7 % 61) + f"item {i}\n")
    job = make_job(shared, name, {
        "handler": "worker_plugins:LedgerChecksum",
        "handler_options": {"ledger": str(ledger), "node": "victim", **options},
        "inputs": "corpus/**/*.txt", "outputs": "out", "chunk_size": 20, "batch_size": batch_size,
        "lease_seconds": 2, "heartbeat_seconds": 0.5, "io": "bulk",
    })
    assert run_cli(str(job), "--init").returncode == 0
    return job, inputs


def _recomputed(ledger: Path) -> int:
    counts = collections.Counter(ledger.read_text().splitlines())
    return sum(n - 1 for n in counts.values())


def test_a_killed_bulk_worker_leaves_at_most_one_chunk_to_recompute(shared: Path, tmp_path: Path) -> None:
    """SIGKILL at a known point: the victim's device (0.1 s a batch, so that its queue
    fills up with 4 chunks, mixed by the length buckets) hangs after 50 items computed
    (2.5 chunks' worth). What it computed reaches the head as it goes (partial packs once
    half a chunk's worth is not there), so a kill loses at most a chunk: here the batch
    it had computed last, whose outputs were never written (50 before: the outputs of
    4 chunks computed side by side, each delivered only when complete)."""
    ledger = tmp_path / "ledger"
    job, inputs = _ledger_job(shared, "bulkloss", ledger, 10, delay_s=0.1, hang_after=50)
    packer = start_packer(job, tmp_path / "packer.log")
    try:
        victim = start_worker(job, "--node", "victim", log=tmp_path / "victim.log")
        try:
            wait_for(lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 50, 60, "50 items computed")
            # The outputs of its first 4 batches reach the head (unpacked by the packer); not
            # waited for on the old code, which had none there: the assertions say what was lost.
            deadline = time.monotonic() + 15
            while len(visible_files(shared / "out")) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            kill_group(victim, signal.SIGKILL)
            victim.wait(timeout=10)
        finally:
            kill_group(victim, signal.SIGKILL)
        computed_by_victim = len(ledger.read_text().splitlines())
        summary = run_worker(job, node="rescuer", install_signal_handlers=False)
        assert summary["reason"] == "done"
        assert packer.wait(timeout=60) == 0
    finally:
        kill_group(packer, signal.SIGKILL)
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)
    assert computed_by_victim == 50
    assert _recomputed(ledger) <= 20, f"{_recomputed(ledger)} items computed twice (chunks of 20)"


def test_a_bulk_worker_stopped_by_a_notice_loses_nothing(shared: Path, tmp_path: Path) -> None:
    """A preemption notice: SIGTERM, and the machine is gone NOTICE_S later (SIGKILL;
    the clouds give 30 s or 2 min, the local provider 5 s), while the victim holds more
    work than it could compute meanwhile (0.3 s a batch of 4). Everything it computed reaches
    the head in time (complete chunks done, the others as partial packs of the released
    chunks), so no item is computed twice."""
    notice_s = 3.0
    ledger = tmp_path / "ledger"
    job, inputs = _ledger_job(shared, "bulknotice", ledger, 4, delay_s=0.3)
    packer = start_packer(job, tmp_path / "packer.log")
    try:
        victim = start_worker(job, "--node", "victim", log=tmp_path / "victim.log")
        try:
            # 7 batches: the second chunk is partly computed (3 of its batches to go)
            wait_for(lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 28, 60, "28 items computed")
            kill_group(victim, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                victim.wait(timeout=notice_s)
        finally:
            kill_group(victim, signal.SIGKILL)
        summary = run_worker(job, node="rescuer", install_signal_handlers=False)
        assert summary["reason"] == "done"
        assert packer.wait(timeout=60) == 0
    finally:
        kill_group(packer, signal.SIGKILL)
    assert_checksum_outputs(shared / "corpus", shared / "out", inputs)
    assert _recomputed(ledger) == 0, f"{_recomputed(ledger)} items computed twice"
    chunks = [r for r in metric_lines(job) if r["kind"] == "chunk"]
    assert any(r["node"] == "victim" and r["outcome"] == "released" and r["items"] > 0 for r in chunks), chunks
