"""Bulk I/O of files mode: a chunk's inputs and outputs cross the mount as one file each.

Over sshfs every small file costs several SFTP round trips (lookup, open, read, close;
create, write, close, rename for an output), one after another: 10,000 inputs of 400 B
moved at about 500 files/s, where one tar stream of them over the same SSH moved 22,000.
The workers' key opens only SFTP on the head (no exec, so no `tar` over SSH), and even
an SFTP client with hundreds of requests in flight measured only about 2,900 files/s
(asyncssh, docs/design.md). So the head packs: its packer (`fleet.worker.packer`, fleet's
own code run by `fleet run` on the head as the head user) writes each upcoming chunk's
inputs as one pack file, and unpacks each chunk's output pack that a worker delivers. A
worker moves one large file per chunk through the mount it already has, each way.

A pack is MAGIC, a JSON index {"names", "sizes"} and the members' bytes back to back (not
tar: Python's tarfile spent 40-70 us per member building and parsing headers, more than
the whole transport's cost per 400-byte file; and a pack has no links, devices or modes
that an unpacker would have to refuse).

    JOB_DIR/bulk/packer.json           the packer serves this job: {"io": "bulk", "pid",
                                       "t"}; rewritten every second (a heartbeat)
    JOB_DIR/bulk/in/<chunk>.pack       the chunk's inputs; member names are the input
                                       paths relative to the inputs' base
    JOB_DIR/bulk/out/<chunk>.<token>.pack  one holder's outputs of the chunk (members:
                                       <input path><handler suffix>), written under a
                                       temporary name and renamed: never seen partial;
                                       <token> is the claim's token, or the token and a
                                       4-digit part number for a partial pack (a flush)
    JOB_DIR/bulk/out/<chunk>.<token>.ok    the packer put every member in place (each one
                                       tmp + rename); JSON {"files": N, "rejected": [...]}

The worker marks the chunk done only after the `.ok` (the done marker stays last). A
worker that dies mid-chunk leaves at most a hidden temporary file and the partial packs
it flushed (`Pipeline._flush`: whenever half a chunk's worth of outputs over the chunks
in hand is not on the head); the next holder skips what those put in place.

Handing over (graceful stop: `fleet cancel`, a preemption notice): a stopping worker does
not wait for acks. Once its output pack is renamed into `bulk/out/`, the outputs are on
the head's disk: it releases the claim at once (a chunk it finished but whose ack has
not come yet is released too). The next holder of the chunk (a resumed claim) settles
the handover before it decides what to compute: it waits for the packer's ack of each
pack an earlier holder left, or, when no packer serves, unpacks the pack through the
mount itself; the ack lists the names it put in place (`"names"`), so the next holder
skips exactly those, whatever the mount's listing cache shows. Nothing depends on how
fast the packer is.
When no packer answers (none started, or it died), the worker reads and writes through
the mount one file at a time, as `io: mount` does: bulk is a speed-up, never a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from fleet.worker.config import WorkerConfig
from fleet.worker.inputs import ChunkList
from fleet.worker.layout import JobLayout, is_hidden, tmp_name_for, write_atomic

AUTO_MIN_CHUNK_FILES = 16
AUTO_MAX_FILE_BYTES = 1 << 20
AUTO_SAMPLE = 16
HEARTBEAT_S = 1.0
# The mount's attribute cache (sshfs: up to 20 s) can show the heartbeat that much older.
PACKER_STALE_S = 45.0
PACK_WAIT_S = 60.0
ACK_WAIT_S = 120.0
STOP_ACK_S = 1.0  # a stopping worker waits at most this long for an ack, then hands the pack over
IN_MEMORY_BYTES = 64 << 20  # a chunk's inputs beyond this spill to node-local scratch
SPOOL_BYTES = 16 << 20  # an output pack beyond this is spooled to node-local scratch
_POLL_S = 0.004
MAGIC = b"FLEETPACK1\n"
PACK = ".pack"
ACK = ".ok"
MAX_INDEX_BYTES = 256 << 20


def bulk_dir(layout: JobLayout) -> Path:
    return layout.job_dir / "bulk"


def packer_file(layout: JobLayout) -> Path:
    return bulk_dir(layout) / "packer.json"


def in_pack(layout: JobLayout, chunk: str) -> Path:
    return bulk_dir(layout) / "in" / f"{chunk}.pack"


def out_pack(layout: JobLayout, chunk: str, token: str) -> Path:
    return bulk_dir(layout) / "out" / f"{chunk}.{token}.pack"


def out_ack(layout: JobLayout, chunk: str, token: str) -> Path:
    return bulk_dir(layout) / "out" / f"{chunk}.{token}.ok"


def _read_ack(path: Path) -> Any:
    """The packer's ack (JSON), or None while there is none."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # written by tmp + rename: cannot be seen partial; be safe
        return None


def choose_io(config: WorkerConfig, chunks: ChunkList, base: Path) -> str:
    """'bulk' or 'mount' for this job. auto: bulk for many small files, judged from the
    sizes of up to AUTO_SAMPLE inputs spread over the list (a few stats, not one per item)."""
    if config.mode != "files" or config.io == "mount":
        return "mount"
    if config.io == "bulk":
        return "bulk"
    if chunks.chunk_size < AUTO_MIN_CHUNK_FILES or not chunks.files:
        return "mount"
    step = max(1, len(chunks.files) // AUTO_SAMPLE)
    sizes = []
    for rel in chunks.files[::step][:AUTO_SAMPLE]:
        try:
            sizes.append((base / rel).stat().st_size)
        except OSError:
            continue
    return "bulk" if sizes and statistics.median(sizes) <= AUTO_MAX_FILE_BYTES else "mount"


def scratch_root(config: WorkerConfig) -> Path:
    root = Path(config.scratch_dir or os.environ.get("FLEET_SCRATCH") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_pack_header(out: IO[bytes], names: list[str], sizes: list[int]) -> None:
    """A pack: MAGIC, the index's length (12 digits, newline), the index (JSON
    {"names", "sizes"}), then the members' bytes one after another."""
    index = json.dumps({"names": names, "sizes": sizes}, separators=(",", ":")).encode()
    out.write(MAGIC + b"%012d\n" % len(index) + index)


def read_pack_header(handle: IO[bytes], *, max_index: int = MAX_INDEX_BYTES) -> list[tuple[str, int]]:
    """The (name, size) of each member, in order; ValueError for anything malformed."""
    head = handle.read(len(MAGIC) + 13)
    if len(head) != len(MAGIC) + 13 or not head.startswith(MAGIC) or not head.endswith(b"\n"):
        raise ValueError("not a fleet pack")
    length = int(head[len(MAGIC) : -1])
    if not 0 <= length <= max_index:
        raise ValueError(f"index of {length} bytes")
    index = json.loads(handle.read(length))
    if not isinstance(index, dict):
        raise ValueError("malformed index")  # noqa: TRY004 - bad data, not a caller error
    names, sizes = index.get("names"), index.get("sizes")
    if not isinstance(names, list) or not isinstance(sizes, list) or len(names) != len(sizes):
        raise ValueError("malformed index")
    if not all(isinstance(n, str) for n in names) or not all(type(z) is int and z >= 0 for z in sizes):
        raise ValueError("malformed index")
    return list(zip(names, sizes))


class OutputPack:
    """The outputs of one chunk, gathered in memory (spooled to node-local scratch when big)."""

    def __init__(self, scratch: Path) -> None:
        self._spool: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_BYTES, dir=scratch)  # noqa: SIM115
        self._lock = threading.Lock()
        self.names: list[str] = []
        self.sizes: list[int] = []

    def add(self, name: str, data: bytes) -> None:
        with self._lock:
            self._spool.write(data)
            self.names.append(name)
            self.sizes.append(len(data))

    def write_to(self, out: IO[bytes]) -> None:
        write_pack_header(out, self.names, self.sizes)
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, out, 1 << 20)

    def members(self) -> list[tuple[str, bytes]]:
        """Every output, for the fallback that writes them through the mount itself."""
        self._spool.seek(0)
        return [(name, self._spool.read(size)) for name, size in zip(self.names, self.sizes)]

    def close(self) -> None:
        self._spool.close()


class BulkClient:
    """The worker's side: fetch a chunk's pack, deliver its outputs, tell if a packer serves."""

    def __init__(self, layout: JobLayout, out_dir: Path, scratch: Path) -> None:
        self.layout = layout
        self.out_dir = out_dir
        self.scratch = scratch
        self._checked = -HEARTBEAT_S
        self._seen: float | None = None
        self._lock = threading.Lock()

    # -- is a packer serving this job? -----------------------------------------------------
    def active(self) -> bool:
        """A packer serves this job: its heartbeat was seen within PACKER_STALE_S. A packer
        that stopped removes the file (dead at once); a failed look for another reason
        (e.g. during the heartbeat's rename) does not count as its death."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= HEARTBEAT_S:
                self._checked = now
                alive = self._packer_alive()
                if alive:
                    self._seen = now
                elif alive is False:
                    self._seen = None
            return self._seen is not None and now - self._seen < PACKER_STALE_S

    def _packer_alive(self) -> bool | None:
        path = packer_file(self.layout)
        try:
            age = time.time() - path.stat().st_mtime
            info = json.loads(path.read_bytes())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return None
        return isinstance(info, dict) and info.get("io") == "bulk" and age < PACKER_STALE_S

    def packed(self) -> frozenset[str]:
        """Chunks whose input pack is ready (one listing): the queue claims these first."""
        try:
            names = os.listdir(bulk_dir(self.layout) / "in")
        except OSError:
            return frozenset()
        return frozenset(n[: -len(PACK)] for n in names if n.endswith(PACK) and not is_hidden(n))

    # -- inputs ----------------------------------------------------------------------------
    def fetch(
        self, chunk: str, wanted: set[str], *, stopping: threading.Event | None = None
    ) -> dict[str, bytes | Path] | None:
        """The chunk's inputs from its pack: {rel: bytes, or a scratch file when the chunk is
        big}. None when no packer serves (the caller reads through the mount instead), or
        when `stopping` is set while the pack is awaited."""
        path = in_pack(self.layout, chunk)
        deadline = time.monotonic() + PACK_WAIT_S
        while True:
            try:
                handle = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed by the with below
                break
            except FileNotFoundError:
                if not self.active() or time.monotonic() > deadline or (stopping is not None and stopping.is_set()):
                    return None
                time.sleep(_POLL_S)
        local: dict[str, bytes | Path] = {}
        held = 0
        spill: Path | None = None
        with handle:
            for name, size in read_pack_header(handle):
                if name not in wanted:
                    handle.seek(size, os.SEEK_CUR)
                elif held + size <= IN_MEMORY_BYTES:
                    data = handle.read(size)
                    if len(data) != size:
                        raise ValueError("truncated pack")
                    local[name] = data
                    held += size
                else:
                    if spill is None:
                        spill = Path(tempfile.mkdtemp(prefix=f"fleet-{chunk}-", dir=self.scratch))
                    target = spill / f"{len(local)}.in"
                    with open(target, "wb") as out:
                        left = size
                        while left:
                            piece = handle.read(min(left, 1 << 20))
                            if not piece:
                                raise ValueError("truncated pack")
                            out.write(piece)
                            left -= len(piece)
                    local[name] = target
        return local

    @staticmethod
    def read_local(value: bytes | Path) -> bytes:
        if isinstance(value, bytes):
            return value
        try:
            return value.read_bytes()
        finally:
            value.unlink(missing_ok=True)

    @staticmethod
    def discard(local: dict[str, bytes | Path] | None) -> None:
        for value in (local or {}).values():
            if isinstance(value, Path):
                value.unlink(missing_ok=True)
                try:
                    value.parent.rmdir()
                except OSError:
                    pass

    # -- outputs ---------------------------------------------------------------------------
    def output_pack(self) -> OutputPack:
        return OutputPack(self.scratch)

    def deliver(
        self,
        chunk: str,
        token: str,
        pack: OutputPack,
        *,
        wait_s: float = ACK_WAIT_S,
        stopping: threading.Event | None = None,
    ) -> bool:
        """Hand the chunk's outputs to the head. True once every output is in place: the
        packer's ack, or, when no packer answers within `wait_s`, written through the mount
        by this worker. False when the pack was handed over instead (on the head's disk, not
        unpacked yet: `wait_s` is 0, or `stopping` was set and no ack came within
        STOP_ACK_S): the caller releases the claim and the next holder settles it."""
        try:
            if not pack.names:
                return True
            if not self.active():
                self._write_through_mount(pack)
                return True
            final = out_pack(self.layout, chunk, token)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_name_for(final)
            try:
                with open(tmp, "wb", buffering=1 << 20) as out:
                    pack.write_to(out)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if wait_s <= 0:
                return False
            return self._await_ack(chunk, token, pack, wait_s, stopping)
        finally:
            pack.close()

    def _await_ack(
        self, chunk: str, token: str, pack: OutputPack, wait_s: float, stopping: threading.Event | None
    ) -> bool:
        ack = out_ack(self.layout, chunk, token)
        deadline = time.monotonic() + wait_s
        stop_deadline: float | None = None
        while True:
            info = _read_ack(ack)
            if info is not None:
                break
            now = time.monotonic()
            if stopping is not None and stopping.is_set():
                stop_deadline = stop_deadline or now + STOP_ACK_S
                if now > stop_deadline:
                    return False  # handed over: the pack is on the head
            if not self.active() or now > deadline:
                # The packer is gone: this worker puts the outputs in place itself.
                # (Should the packer wake up later, it writes the same bytes, atomically.)
                self._write_through_mount(pack)
                return True
            time.sleep(_POLL_S)
        rejected = info.get("rejected") if isinstance(info, dict) else None
        if rejected or not isinstance(info, dict) or info.get("files") != len(pack.names):
            raise RuntimeError(f"the head's packer did not accept the outputs of {chunk}: {info}")
        return True

    def await_part(
        self, chunk: str, token: str, outputs: set[str], *, stopping: threading.Event | None = None
    ) -> bool:
        """A partial pack this worker delivered earlier without waiting (`deliver(wait_s=0)`):
        True once its outputs are in place (the packer's ack; or, when no packer answers
        within ACK_WAIT_S, unpacked here through the mount: only names in `outputs`). False
        when `stopping` is set and no ack came within STOP_ACK_S: the pack is handed over."""
        ack, pack = out_ack(self.layout, chunk, token), out_pack(self.layout, chunk, token)
        deadline = time.monotonic() + ACK_WAIT_S
        stop_deadline: float | None = None
        while True:
            info = _read_ack(ack)
            if info is not None:
                if not isinstance(info, dict) or info.get("rejected"):
                    raise RuntimeError(f"the head's packer did not accept the outputs of {chunk}: {info}")
                return True
            now = time.monotonic()
            if stopping is not None and stopping.is_set():
                stop_deadline = stop_deadline or now + STOP_ACK_S
                if now > stop_deadline:
                    return False
            if not self.active() or now > deadline:
                if self._unpack_through_mount(pack, outputs) is not None:
                    return True
                if _read_ack(ack) is None and now > deadline:
                    raise RuntimeError(f"the partial pack {pack.name} of {chunk} vanished unacknowledged")
            time.sleep(_POLL_S)

    # -- handovers (a resumed claim) -------------------------------------------------------
    def handed_over(self, chunk: str, outputs: set[str]) -> set[str]:
        """The outputs (names relative to the output directory) that earlier holders of
        `chunk` handed over as packs, once they are in place: each pack's ack is awaited
        (the packer unpacks it), or, when no packer serves, the pack is unpacked here
        through the mount. Only names in `outputs` are taken from another holder's pack."""
        try:
            names = os.listdir(bulk_dir(self.layout) / "out")
        except OSError:
            return set()
        prefix = f"{chunk}."
        tokens = {
            name[len(prefix) :].rsplit(".", 1)[0]
            for name in names
            if name.startswith(prefix) and name.endswith((PACK, ACK))
        }
        placed: set[str] = set()
        for token in tokens:
            placed |= self._settle_handover(chunk, token, outputs)
        return placed

    def _settle_handover(self, chunk: str, token: str, outputs: set[str]) -> set[str]:
        ack, pack = out_ack(self.layout, chunk, token), out_pack(self.layout, chunk, token)
        deadline = time.monotonic() + ACK_WAIT_S
        while True:
            info = _read_ack(ack)
            if info is not None:
                named = info.get("names") if isinstance(info, dict) else None
                return {n for n in named if isinstance(n, str)} & outputs if isinstance(named, list) else set()
            if not pack.exists():
                info = _read_ack(ack)  # unpacked between the two looks, or gone for good
                if info is None:
                    return set()
                continue
            if not self.active() or time.monotonic() > deadline:
                placed = self._unpack_through_mount(pack, outputs)
                if placed is not None:
                    return placed
                continue  # a packer took it meanwhile: its ack says what it put in place
            time.sleep(_POLL_S)

    def _unpack_through_mount(self, pack: Path, outputs: set[str]) -> set[str] | None:
        """No packer serves: put another holder's pack in place ourselves (only the names
        this chunk may have), then remove it. None when the pack went away meanwhile."""
        placed: set[str] = set()
        made: set[Path] = set()
        try:
            with open(pack, "rb", buffering=1 << 20) as handle:
                for name, size in read_pack_header(handle):
                    data = handle.read(size)
                    if len(data) != size:
                        raise ValueError("truncated pack")
                    if name not in outputs:
                        continue
                    path = self.out_dir / name
                    if path.parent not in made:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        made.add(path.parent)
                    write_atomic(path, data)
                    placed.add(name)
        except FileNotFoundError:
            return None
        except ValueError:
            pass  # unreadable: its outputs are computed again
        pack.unlink(missing_ok=True)
        return placed

    def _write_through_mount(self, pack: OutputPack) -> None:
        made: set[Path] = set()
        for name, data in pack.members():
            path = self.out_dir / name
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            write_atomic(path, data)
