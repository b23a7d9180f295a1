"""The work queue without a coordinator: claims with leases on the shared filesystem.

- What is done and what is claimed is learned from two directory listings (done/ and
  claims/), never from one stat per item.
- A worker visits the chunks that are neither done nor claimed in its own shuffled order
  and claims one by creating claims/<chunk> exclusively (O_CREAT|O_EXCL; over sshfs this
  is SFTP's SSH_FXF_EXCL, atomic on the server).
- The holder refreshes the claim's mtime every `heartbeat_seconds` (after checking the
  claim still carries its token). A claim older than `lease_seconds` by the observer's
  clock is stale: its holder died. Exactly one taker breaks it: the takers read the stale
  claim's token T and race to create claims/.take.<chunk>.<T>.0 exclusively; the one that
  creates it moves the stale claim aside (claims/.prev.<chunk>.<tag>) and claims anew.
  Nothing is ever put back, so a chunk is never briefly unclaimed while a live claim
  exists. A take lock older than the lease means its taker died mid-takeover: the next
  taker races for .take.<chunk>.<T>.1, and so on.
- Lease margin: lease_seconds must exceed heartbeat_seconds + the clock skew between
  nodes + the attribute cache of the mount (sshfs `cache_timeout`, 20 s by default).
- done/<chunk> is written only after every output of the chunk is in place, and only
  while the claim is still ours; then the claim is removed. A released claim (graceful
  stop) is renamed to claims/.prev.<chunk>.<token>: the next holder sees the hint and
  skips the outputs already written.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.worker.layout import JobLayout, dumps, is_hidden, listdir_visible, write_atomic

PREV_PREFIX = ".prev."
TAKE_PREFIX = ".take."
PROBE_PREFIX = ".probe."
RECHECK_LIMIT = 64  # chunks whose done marker all_done() may look up one by one


@dataclass
class Claim:
    """A chunk this worker holds."""

    chunk: str
    token: str
    resumed: bool = False  # an earlier holder may have written some outputs already
    lost: bool = False  # another worker took the claim: never mark this chunk done
    claimed_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Scan:
    """One look at the queue: two directory listings."""

    done: frozenset[str]
    claimed: frozenset[str]
    prev: frozenset[str]  # chunks with a set-aside claim (partial outputs may exist)


def scan(layout: JobLayout) -> Scan:
    done = frozenset(listdir_visible(layout.done))
    claimed: set[str] = set()
    prev: set[str] = set()
    try:
        names = os.listdir(layout.claims)
    except FileNotFoundError:
        names = []
    for name in names:
        if name.startswith(PREV_PREFIX):
            prev.add(name[len(PREV_PREFIX) :].split(".", 1)[0])
        elif not is_hidden(name):
            claimed.add(name)
    return Scan(done, frozenset(claimed), frozenset(prev))


class ChunkQueue:
    """Claims chunks for one worker process; thread-safe for heartbeat vs. claim/done."""

    def __init__(
        self,
        layout: JobLayout,
        chunk_ids: Iterable[str],
        *,
        node: str,
        proc: int,
        lease_seconds: float,
        clock: Callable[[], float] = time.time,
        seed: str | None = None,
    ) -> None:
        self.layout = layout
        self.node = node
        self.proc = proc
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.all_ids = list(chunk_ids)
        order = list(self.all_ids)
        random.Random(seed or f"{node}.{proc}.{os.getpid()}.{time.time_ns()}").shuffle(order)
        self._order = order
        self._candidates: list[str] = []
        self.last_scan = Scan(frozenset(), frozenset(), frozenset())
        self.held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        # Chunks to claim first (bulk I/O: those whose input pack the head has ready).
        self.prefer: Callable[[], frozenset[str]] | None = None

    # -- looking -------------------------------------------------------------------------
    def refresh(self) -> Scan:
        self.last_scan = scan(self.layout)
        done, claimed = self.last_scan.done, self.last_scan.claimed
        # Popped from the end: reverse so that the shuffled order is visited front first.
        self._candidates = [c for c in reversed(self._order) if c not in done and c not in claimed]
        if self.prefer is not None:
            first = self.prefer()
            if first:  # popped from the end: the preferred ones go last
                self._candidates.sort(key=lambda c: c in first)
        return self.last_scan

    def all_done(self) -> bool:
        """Every chunk has its done marker. The listing may be stale (sshfs caches
        directory listings for 20 s by default, but not failed lookups): when only a
        few chunks look unfinished, ask for their markers directly."""
        missing = [c for c in self.all_ids if c not in self.last_scan.done]
        if not missing:
            return True
        if len(missing) > RECHECK_LIMIT or any(c in self.held for c in missing):
            return False
        found = {c for c in missing if self.is_done(c)}
        if found:
            self.last_scan = Scan(self.last_scan.done | found, self.last_scan.claimed, self.last_scan.prev)
        return len(found) == len(missing)

    def is_done(self, chunk: str) -> bool:
        return (self.layout.done / chunk).exists()

    # -- claiming ------------------------------------------------------------------------
    def next_claim(self) -> Claim | None:
        """Claim the next chunk nobody holds (or whose holder died). None: nothing is
        claimable right now (all done, or all remaining chunks are held by live workers)."""
        for fresh_listing in (False, True):
            if fresh_listing:
                self.refresh()
            while self._candidates:
                chunk = self._candidates.pop()
                claim = self._create(chunk, resumed=False)
                if claim is not None:
                    return claim
            if fresh_listing:
                return self._take_over_stale()
        return None

    def _body(self, token: str) -> bytes:
        return dumps(
            {"node": self.node, "proc": self.proc, "pid": os.getpid(), "token": token, "t": self.clock()}
        )

    def _create(self, chunk: str, *, resumed: bool) -> Claim | None:
        token = secrets.token_hex(8)
        path = self.layout.claims / chunk
        if not self._create_exclusive(path, self._body(token)):
            return None
        claim = Claim(chunk, token, resumed=resumed)
        if self.is_done(chunk):  # done by another worker after our listing
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        if not resumed:
            claim.resumed = any(
                name.startswith(f"{PREV_PREFIX}{chunk}.") for name in os.listdir(self.layout.claims)
            )
        with self._lock:
            self.held[chunk] = claim
        return claim

    @staticmethod
    def _create_exclusive(path: Path, body: bytes) -> bool:
        """O_CREAT|O_EXCL: True for the one creator, False when the name exists."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except PermissionError:
            # sshfs reports the server's "exists" (a bare SSH_FX_FAILURE) as EPERM.
            if path.exists():
                return False
            raise
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
        return True

    def _take_over_stale(self) -> Claim | None:
        done = self.last_scan.done
        with self._lock:
            others = list(self.last_scan.claimed - done - self.held.keys())
        random.shuffle(others)
        for chunk in others:
            claim = self.take_over(chunk)
            if claim is not None:
                return claim
        return None

    def _stale_token(self, path: Path, *, fresh: bool = False) -> str | None:
        """The token of the claim at path if its lease ran out, else None. `fresh`: look
        past the mount's attribute cache (see `_fresh_mtime`)."""
        try:
            mtime = self._fresh_mtime(path) if fresh else os.stat(path).st_mtime
            if self.clock() - mtime <= self.lease_seconds:
                return None
            raw = path.read_bytes()
        except OSError:
            return None  # gone: finished, released or taken over meanwhile
        try:
            body = json.loads(raw)
            token = body.get("token") if isinstance(body, dict) else None
        except ValueError:
            token = None
        if isinstance(token, str) and token.isalnum():
            return token
        return f"m{int(mtime)}"  # its holder died before writing it: name it by its age

    def _fresh_mtime(self, path: Path) -> float:
        """The claim's mtime as the file server has it now. sshfs answers stat from its
        directory cache (filled by our listings, up to 20 s old), which can make a live
        claim look stale; a new name for the same file (a hard link) is not in any cache."""
        probe = self.layout.claims / f"{PROBE_PREFIX}{path.name}.{secrets.token_hex(6)}"
        try:
            os.link(path, probe)
        except FileNotFoundError:
            raise
        except OSError:  # no hard links on this file system: trust stat
            return os.stat(path).st_mtime
        try:
            return os.stat(probe).st_mtime
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)

    def take_over(self, chunk: str) -> Claim | None:
        """Break a stale claim; exactly one of several racing takers gets the chunk."""
        path = self.layout.claims / chunk
        stale = self._stale_token(path)
        if stale is None:
            return None
        lock = self._win_take_lock(chunk, stale)
        if lock is None:
            return None
        # Ours alone to break. Make sure the claim is still the stale one, by the server's
        # clock of it (a fresh-listing claimer may have replaced it after a release, or
        # the cache showed an old heartbeat), then move it aside.
        if self._stale_token(path, fresh=True) != stale:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # backed off: the next look starts from a clean slate
            return None
        aside = self.layout.claims / f"{PREV_PREFIX}{chunk}.{stale}"
        try:
            os.rename(path, aside)
        except OSError:
            return None
        return self._create(chunk, resumed=True)

    def _win_take_lock(self, chunk: str, stale: str) -> Path | None:
        """The take lock this taker created, or None when another taker has it."""
        body = self._body(secrets.token_hex(8))
        for generation in range(64):
            lock = self.layout.claims / f"{TAKE_PREFIX}{chunk}.{stale}.{generation}"
            if self._create_exclusive(lock, body):
                return lock
            try:
                if self.clock() - os.stat(lock).st_mtime <= self.lease_seconds:
                    return None  # a live taker is at work
            except FileNotFoundError:
                return None  # cleaned up: the chunk was finished, or its taker backed off
        return None

    # -- holding -------------------------------------------------------------------------
    def still_ours(self, claim: Claim) -> bool:
        try:
            body = json.loads((self.layout.claims / claim.chunk).read_bytes())
        except (OSError, ValueError):
            return False
        return isinstance(body, dict) and body.get("token") == claim.token

    def heartbeat(self) -> list[Claim]:
        """Refresh the lease of every held claim; returns the claims found lost."""
        lost = []
        with self._lock:
            held = list(self.held.values())
        for claim in held:
            if claim.lost:
                continue
            if self.still_ours(claim):
                with contextlib.suppress(OSError):
                    os.utime(self.layout.claims / claim.chunk)
                    continue
            claim.lost = True
            lost.append(claim)
        return lost

    def mark_done(self, claim: Claim, info: dict[str, Any]) -> bool:
        """Publish done/<chunk> (outputs must be in place) and drop the claim. False if the
        claim was lost meanwhile: then the new holder will finish the chunk."""
        with self._lock:
            self.held.pop(claim.chunk, None)
        if claim.lost or not self.still_ours(claim):
            claim.lost = True
            return False
        write_atomic(self.layout.done / claim.chunk, dumps({**info, "token": claim.token}))
        with contextlib.suppress(OSError):
            os.unlink(self.layout.claims / claim.chunk)
        if claim.resumed:  # set-aside claims and take locks exist only for these
            with contextlib.suppress(OSError):
                for name in os.listdir(self.layout.claims):
                    if name.startswith((f"{PREV_PREFIX}{claim.chunk}.", f"{TAKE_PREFIX}{claim.chunk}.")):
                        with contextlib.suppress(OSError):
                            os.unlink(self.layout.claims / name)
        return True

    def release(self, claim: Claim) -> None:
        """Give a chunk back unfinished; leave a hint that some outputs exist."""
        with self._lock:
            self.held.pop(claim.chunk, None)
        if claim.lost or not self.still_ours(claim):
            return
        with contextlib.suppress(OSError):
            os.rename(
                self.layout.claims / claim.chunk,
                self.layout.claims / f"{PREV_PREFIX}{claim.chunk}.{claim.token}",
            )


def failed_items(layout: JobLayout, chunks: set[str] | frozenset[str] | None = None) -> int:
    """Distinct failed items recorded in failures/*.jsonl (of the given chunks only), by
    the claim that marked their chunk done: a holder stopped mid-chunk may have recorded
    failures of items its successor then computed. Reads the done markers of the chunks
    with failures only."""
    rows_by_chunk: dict[str, list[dict[str, Any]]] = {}
    for name in listdir_visible(layout.failures):
        try:
            lines = (layout.failures / name).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            chunk = str(row.get("chunk"))
            if chunks is None or chunk in chunks:
                rows_by_chunk.setdefault(chunk, []).append(row)
    seen: dict[tuple[str, str], int] = {}
    for chunk, rows in rows_by_chunk.items():
        finisher = _done_token(layout, chunk)
        for row in rows:
            if finisher is not None and row.get("token") not in (None, finisher):
                continue  # recorded by an earlier holder of the chunk
            seen[(chunk, str(row.get("item")))] = int(row.get("items", 1))
    return sum(seen.values())


def _done_token(layout: JobLayout, chunk: str) -> str | None:
    """The token of the claim that marked the chunk done (None: not done, or unknown)."""
    try:
        body = json.loads((layout.done / chunk).read_bytes())
    except (OSError, ValueError):
        return None
    token = body.get("token") if isinstance(body, dict) else None
    return token if isinstance(token, str) else None


def job_status(layout: JobLayout, items_per_chunk: dict[str, int] | None) -> dict[str, Any]:
    """The `--status` object, from two listings, the failure logs and chunks.json."""
    look = scan(layout)
    if items_per_chunk is None:
        return {
            "total": None,
            "done": 0,
            "failed": 0,
            "chunks": None,
            "chunks_done": 0,
            "claimed": len(look.claimed),
            "frozen": False,
        }
    done_chunks = look.done.intersection(items_per_chunk)
    failed = failed_items(layout, done_chunks)
    return {
        "total": sum(items_per_chunk.values()),
        "done": sum(items_per_chunk[c] for c in done_chunks) - failed,
        "failed": failed,
        "chunks": len(items_per_chunk),
        "chunks_done": len(done_chunks),
        "claimed": len(look.claimed - look.done),
        "frozen": True,
    }
