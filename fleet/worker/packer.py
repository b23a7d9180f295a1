"""The head's packer for bulk I/O: `python -P -m fleet.worker.packer JOB_DIR [--window N]`.

`fleet run` starts it on the head (as the head user, fleet's own installed code, never
code from the shared directory; `-P` keeps the working directory off sys.path) for files
mode jobs whose `io` is not `mount`. It serves one job over the head's local disk
(protocol in `fleet.worker.bulk`) and exits when every chunk is done, when the job is
cancelled, or at once when the job does not use bulk I/O or another packer serves it:

- packs the inputs of every claimed chunk and of the next `window` unclaimed ones into
  `bulk/in/<chunk>.pack` (tmp + rename), and deletes the packs of done chunks;
- unpacks each delivered `bulk/out/<chunk>.<token>.pack`, which it does not trust (any
  worker can write there): only members named `<input of that chunk><suffix>` pass, in
  a directory that stays inside the job's output directory (realpath); each output is
  written tmp + rename (O_NOFOLLOW), then `<chunk>.<token>.ok` says so and the pack is
  deleted (a pack holds no links, devices or modes: nothing else to refuse);
- reads only files under the shared root (the chunk list is written by a worker too:
  a path that leaves the shared root, through `..` or a symlink, is left out of the
  pack, so the worker's read of it through its own mount decides).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from fleet.worker.bulk import (
    HEARTBEAT_S,
    PACK,
    SPOOL_BYTES,
    bulk_dir,
    choose_io,
    in_pack,
    out_ack,
    packer_file,
    read_pack_header,
    write_pack_header,
)
from fleet.worker.errors import WorkerError
from fleet.worker.inputs import ChunkList, freeze
from fleet.worker.layout import (
    TMP_SUFFIX,
    JobLayout,
    dumps,
    is_hidden,
    listdir_visible,
    load_worker_config,
    tmp_name_for,
    write_atomic,
)

DEFAULT_WINDOW = 8
UNPACK_THREADS = 4
PLACE_THREADS = 4  # one pack's outputs are created by this many threads at once
PLACE_BATCH_BYTES = 16 << 20  # outputs read from a pack before they are placed
IDLE_POLL_S = 0.05
DRAIN_S = 30.0  # after `cancelled`: at most this long for the workers' last deliveries
_OUT_NAME = re.compile(r"^(?P<chunk>c\d+)\.(?P<token>[0-9a-f]{6,64})\.pack$")
_SUFFIX = re.compile(r"^(?P<rel>.+?)(?P<suffix>\.[A-Za-z0-9_]{1,16})$")
MAX_OUTPUT_BYTES = 1 << 30  # one output; a worker cannot fill the head's disk with one member


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class Packer:
    def __init__(self, layout: JobLayout, *, window: int = DEFAULT_WINDOW, poll_s: float = 0.01) -> None:
        self.layout = layout
        self.window = window
        self.poll_s = poll_s
        self.config = load_worker_config(layout)
        self.chunks: ChunkList = freeze(layout, self.config)
        self.root = os.path.realpath(layout.shared_root)
        self.base = os.path.realpath(self.chunks.base_path(layout))
        self.out_dir = os.path.realpath(layout.resolve(self.config.outputs))
        self.by_id = self.chunks.by_id()
        self.order = [chunk.id for chunk in self.chunks.chunks]
        self.stop = threading.Event()
        # Unpacking is file creation on the head's disk: several at once keep its queue full.
        self.unpackers = ThreadPoolExecutor(UNPACK_THREADS, thread_name_prefix="fleet-unpack")
        # Creating files is the head's limit, and a job's last pack is unpacked while the
        # workers wait for it: its outputs are created by several threads, not one.
        self.placers = ThreadPoolExecutor(PLACE_THREADS, thread_name_prefix="fleet-place")
        self._unpacking: set[str] = set()
        self._lock = threading.Lock()
        self.packed_files = 0
        self.unpacked_files = 0
        self.pack_s = 0.0
        self.unpack_s = 0.0

    def serves(self) -> str | None:
        """Why this job is not for the packer, or None when it is."""
        if not _inside(self.base, self.root):
            return f"the inputs' base {self.base} is outside the shared root"
        if not _inside(self.out_dir, self.root):
            return f"the output directory {self.out_dir} is outside the shared root"
        if choose_io(self.config, self.chunks, Path(self.base)) != "bulk":
            return "io resolves to mount for this job"
        return None

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        reason = self.serves()
        if reason is not None:
            print(f"fleet-packer: not serving {self.layout.job_name}: {reason}", flush=True)
            return 0
        for sub in ("in", "out"):
            (bulk_dir(self.layout) / sub).mkdir(parents=True, exist_ok=True)
        lock = open(bulk_dir(self.layout) / ".packer.lock", "a")  # noqa: SIM115 - held while serving
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"fleet-packer: another packer serves {self.layout.job_name}", flush=True)
            return 0
        self._write_heartbeat()
        beat = threading.Thread(target=self._heartbeat_loop, name="fleet-packer-heartbeat", daemon=True)
        beat.start()
        pid_file = bulk_dir(self.layout) / "packer.pid"
        write_atomic(pid_file, f"{os.getpid()}\n".encode())
        try:
            pause = self.poll_s
            draining_since: float | None = None
            while not self.stop.is_set():
                if draining_since is None and (self.layout.job_dir / "cancelled").exists():
                    draining_since = time.monotonic()  # stopping workers still deliver what they release
                try:
                    busy, finished = self.step(pack=draining_since is None)
                except OSError as exc:  # a hiccup of the head's disk: look again shortly
                    print(f"fleet-packer: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                    busy, finished = False, False
                if finished or (
                    draining_since is not None
                    and not busy
                    and (self._no_claims() or time.monotonic() - draining_since > DRAIN_S)
                ):
                    break
                # Quick while work flows (a worker waits for each ack); twenty looks a second when idle.
                pause = self.poll_s if busy else min(IDLE_POLL_S, pause * 1.5)
                if not busy:
                    self.stop.wait(pause)
        finally:
            self.stop.set()
            self._unpack_pending()  # SIGTERM (fleet cancel): what is delivered still lands
            self.unpackers.shutdown(wait=True)
            self.placers.shutdown(wait=True)
            beat.join(timeout=10)
            packer_file(self.layout).unlink(missing_ok=True)
            pid_file.unlink(missing_ok=True)
            lock.close()
        print(
            f"fleet-packer: packed {self.packed_files} inputs in {self.pack_s:.2f} s, "
            f"unpacked {self.unpacked_files} outputs in {self.unpack_s:.2f} s (thread time)",
            flush=True,
        )
        return 0

    def _write_heartbeat(self) -> None:
        info = {"io": "bulk", "pid": os.getpid(), "t": time.time(), "window": self.window}
        write_atomic(packer_file(self.layout), dumps(info))

    def _heartbeat_loop(self) -> None:
        """Its own thread: a long unpack on a slow disk must not look like a dead packer."""
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self._write_heartbeat()
            except OSError:
                pass  # the next beat tries again

    def _no_claims(self) -> bool:
        return not listdir_visible(self.layout.claims)

    def _unpack_pending(self) -> None:
        out_dir = bulk_dir(self.layout) / "out"
        try:
            names = os.listdir(out_dir)
        except OSError:
            return
        for name in names:
            if name.endswith(PACK) and not is_hidden(name) and name not in self._unpacking:
                self._unpack_guarded(out_dir / name)

    def step(self, *, pack: bool = True) -> tuple[bool, bool]:
        """One look at the queue: (did something, every chunk is done and delivered).
        Without `pack` (the job is cancelled) it only unpacks what workers deliver."""
        done = set(listdir_visible(self.layout.done))
        claimed = set(listdir_visible(self.layout.claims)) - done
        in_dir = bulk_dir(self.layout) / "in"
        out_dir = bulk_dir(self.layout) / "out"
        outs = os.listdir(out_dir)
        busy = False
        for name in outs:
            if name.endswith(PACK) and not is_hidden(name) and name not in self._unpacking:
                with self._lock:
                    self._unpacking.add(name)
                self.unpackers.submit(self._unpack_guarded, out_dir / name)
                busy = True
        packs = {n[: -len(PACK)] for n in listdir_visible(in_dir) if n.endswith(PACK)}
        for chunk in packs & done:
            in_pack(self.layout, chunk).unlink(missing_ok=True)
        for name in outs:
            if name.endswith(".ok") and name.split(".", 1)[0] in done:
                (out_dir / name).unlink(missing_ok=True)
        packs -= done
        if not pack:
            with self._lock:
                return busy or bool(self._unpacking), False
        want = [c for c in self.order if c in claimed and c not in packs]
        ahead = len(packs - claimed)
        for chunk in self.order:
            if ahead >= self.window:
                break
            if chunk not in done and chunk not in claimed and chunk not in packs:
                want.append(chunk)
                ahead += 1
        for chunk in want:
            started = time.perf_counter()
            self._pack(chunk)
            self.pack_s += time.perf_counter() - started
            busy = True
        with self._lock:
            idle = not self._unpacking
        finished = set(self.order) <= done and idle and not busy
        return busy, finished

    def _unpack_guarded(self, path: Path) -> None:
        started = time.perf_counter()
        try:
            self._unpack(path)
        except Exception as exc:  # noqa: BLE001 - one bad pack must not stop the others
            print(f"fleet-packer: {path.name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            with self._lock:
                self._unpacking.discard(path.name)
                self.unpack_s += time.perf_counter() - started

    # -- packing inputs -------------------------------------------------------------------
    def _pack(self, chunk: str) -> None:
        names: list[str] = []
        sizes: list[int] = []
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as payload:
            for rel in self.chunks.chunk_files(self.by_id[chunk]):
                path = os.path.join(self.base, rel)
                if not safe_rel(rel) or not _inside(os.path.realpath(path), self.root):
                    continue  # left out: the worker reads it through its own mount
                try:
                    with open(path, "rb") as source:
                        data = source.read()
                except OSError:
                    continue  # likewise: the worker's read records why it failed
                payload.write(data)
                names.append(rel)
                sizes.append(len(data))
            final = in_pack(self.layout, chunk)
            tmp = tmp_name_for(final)
            try:
                with open(tmp, "wb", buffering=1 << 20) as out:
                    write_pack_header(out, names, sizes)
                    payload.seek(0)
                    shutil.copyfileobj(payload, out, 1 << 20)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self.packed_files += len(names)

    # -- unpacking outputs ----------------------------------------------------------------
    def _unpack(self, path: Path) -> None:
        match = _OUT_NAME.match(path.name)
        chunk = match["chunk"] if match else None
        if match is None or chunk not in self.by_id:
            path.unlink(missing_ok=True)
            return
        expected = {rel for rel in self.chunks.chunk_files(self.by_id[chunk]) if safe_rel(rel)}
        rejected: list[str] = []
        written: list[str] = []
        try:
            handle = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            return  # unpacked a moment ago (listed before that thread removed it)
        dirs = _OutputDirs(self.out_dir)
        batch: list[tuple[int, str, bytes, str]] = []
        held = 0
        try:
            with handle:
                for name, size in read_pack_header(handle):
                    if size > MAX_OUTPUT_BYTES:
                        raise ValueError(f"{name}: {size} bytes")
                    data = handle.read(size)
                    if len(data) != size:
                        raise ValueError("truncated pack")
                    named = _SUFFIX.match(name)
                    if named is None or named["rel"] not in expected:
                        rejected.append(f"{name}: not an output of this chunk's inputs")
                        continue
                    parent, _, leaf = name.rpartition("/")
                    dir_fd = dirs.open(parent)
                    if dir_fd is None:
                        rejected.append(f"{name}: its directory leaves the output directory")
                        continue
                    batch.append((dir_fd, leaf, data, name))
                    held += size
                    if held >= PLACE_BATCH_BYTES:
                        written += self._place(batch)
                        batch, held = [], 0
            written += self._place(batch)
        except (OSError, ValueError) as exc:
            rejected.append(f"unreadable pack: {exc}")
        finally:
            dirs.close()
        # The names in place: a later holder of the chunk skips exactly these (a handover).
        ack = {"files": len(written), "rejected": rejected, "names": written}
        write_atomic(out_ack(self.layout, chunk, match["token"]), dumps(ack))
        path.unlink(missing_ok=True)
        with self._lock:
            self.unpacked_files += len(written)


    def _place(self, batch: list[tuple[int, str, bytes, str]]) -> list[str]:
        """Create a batch of outputs, split over the placer threads; their names."""
        if len(batch) < 2 * PLACE_THREADS:
            parts = [batch]
        else:
            parts = [batch[i::PLACE_THREADS] for i in range(PLACE_THREADS)]
        futures = [self.placers.submit(_place_all, part) for part in parts]
        wait(futures)
        for future in futures:
            future.result()  # the first error is the pack's (its ack says so)
        return [name for _, _, _, name in batch]


def _place_all(part: list[tuple[int, str, bytes, str]]) -> None:
    for dir_fd, leaf, data, _name in part:
        place_atomic(dir_fd, leaf, data)


def safe_rel(rel: str) -> bool:
    """A relative path with no empty, '.', '..' or hidden component (chunks.json is
    written by a worker: never trust it to stay inside a directory)."""
    return not rel.startswith("/") and all(part and not part.startswith(".") for part in rel.split("/"))


class _OutputDirs:
    """The output directories one pack writes into, each opened once (outputs are created
    relative to its fd: no path walk per file). A directory is opened only if its realpath
    stays inside the output directory, looked at before creating anything (a planted
    symlink must not make us create directories elsewhere) and again after."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.fds: dict[str, int | None] = {}

    def open(self, parent: str) -> int | None:
        if parent in self.fds:
            return self.fds[parent]
        path = os.path.join(self.out_dir, parent) if parent else self.out_dir
        fd: int | None = None
        if _inside(os.path.realpath(path), self.out_dir):
            os.makedirs(path, exist_ok=True)
            if _inside(os.path.realpath(path), self.out_dir):
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fds[parent] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            if fd is not None:
                os.close(fd)
        self.fds.clear()


_tmpfile_works = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


def place_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """Put `data` in place as `name` in the directory `dir_fd`, never visible partial.

    The packer writes thousands per second, and creating them is the head's limit: an
    unnamed file (O_TMPFILE) written, then linked in under its name (linkat), costs one
    directory operation where tmp + rename costs two (measured ~40% cheaper). Where the
    name exists already (an output written before: a redo) or the filesystem has no
    O_TMPFILE, the file gets a temporary name and is renamed onto it (atomic replace)."""
    global _tmpfile_works
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
    if _tmpfile_works:
        try:
            fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            _tmpfile_works = False  # this filesystem has none: tmp + rename from now on
        else:
            try:
                _write_all(fd, data)
                proc_path = f"/proc/self/fd/{fd}"
                try:
                    os.link(proc_path, name, dst_dir_fd=dir_fd)  # linkat(AT_SYMLINK_FOLLOW)
                    return
                except FileExistsError:
                    os.link(proc_path, tmp, dst_dir_fd=dir_fd)
            finally:
                os.close(fd)
            _rename_or_remove(dir_fd, tmp, name)
            return
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    _rename_or_remove(dir_fd, tmp, name)


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        while view:
            view = view[os.write(fd, view) :]


def _rename_or_remove(dir_fd: int, tmp: str, name: str) -> None:
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet-packer", description="Serve bulk I/O of one job on the head.")
    parser.add_argument("job_dir", metavar="JOB_DIR")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="unclaimed chunks packed ahead")
    args = parser.parse_args(argv)
    try:
        packer = Packer(JobLayout.at(args.job_dir), window=max(1, args.window))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: packer.stop.set())
        return packer.run()
    except WorkerError as exc:
        print(f"fleet-packer: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
