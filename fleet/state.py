"""The fleet's local record: nodes, generations, events and jobs, in SQLite.

Lives beside the spec in `.fleet/<name>/state.db`. WAL mode and a busy timeout make it
safe when two `fleet` commands run at once (e.g. `fleet watch` and `fleet exec`). It is
a record, not the source of truth: providers find what exists by label, so losing this
file never leaks a node. Connections are per thread (sqlite3 objects are not shared).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import StateError
from fleet.model import Node

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    slot INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    address TEXT,
    port INTEGER,
    zone TEXT,
    spot INTEGER NOT NULL DEFAULT 0,
    provider_id TEXT,
    setup_done INTEGER NOT NULL DEFAULT 0,
    mounted INTEGER NOT NULL DEFAULT 0,
    created_at REAL,
    updated_at REAL,
    gone INTEGER NOT NULL DEFAULT 0,
    step TEXT NOT NULL DEFAULT 'created',
    failed_step TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    retry_at REAL,
    unreachable_since REAL,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t REAL NOT NULL,
    node TEXT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS stockouts (
    zone TEXT PRIMARY KEY,
    t REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    summary TEXT NOT NULL DEFAULT '{}'
);
"""


@dataclass(frozen=True)
class NodeRecord:
    name: str
    role: str
    slot: int
    generation: int
    state: str
    address: str | None
    port: int | None
    zone: str | None
    spot: bool
    provider_id: str | None
    setup_done: bool
    mounted: bool
    created_at: float | None
    updated_at: float | None
    gone: bool
    # The node's lifecycle (fleet.reconcile.STEPS): the last step it completed, the step
    # that failed since, how often in a row, when to try again, and since when it has not
    # answered SSH (None: it answers, or was never probed).
    step: str = "created"
    failed_step: str | None = None
    failures: int = 0
    retry_at: float | None = None
    unreachable_since: float | None = None
    last_error: str | None = None


# Columns added after the first schema: (name, definition) for ALTER TABLE on old files.
_NODE_COLUMNS = (
    ("step", "TEXT NOT NULL DEFAULT 'created'"),
    ("failed_step", "TEXT"),
    ("failures", "INTEGER NOT NULL DEFAULT 0"),
    ("retry_at", "REAL"),
    ("unreachable_since", "REAL"),
    ("last_error", "TEXT"),
)


@dataclass(frozen=True)
class Event:
    t: float
    node: str | None
    kind: str
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"t": self.t, "node": self.node or "", "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True)
class JobRecord:
    name: str
    status: str
    spec: str
    created_at: float
    updated_at: float
    summary: dict[str, object]


def make_private_dir(path: Path) -> None:
    """Create `.fleet/<name>/` (and `.fleet/`) readable by this user only (0700)."""
    path = Path(path)
    for directory in (path.parent, path) if path.parent.name == ".fleet" else (path,):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(directory.stat().st_mode) != 0o700:
            os.chmod(directory, 0o700)


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an flock on `path` (0600, made if missing) for the block; when another
    process holds it, call `on_wait` once, then wait for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class State:
    """The SQLite record of one fleet."""

    def __init__(self, path: Path, *, clock=time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._local = threading.local()
        try:
            make_private_dir(self.path.parent)
            # It holds job specs (and their env): 0600 before SQLite writes a byte; its
            # -wal and -shm files take the database's permissions. Never open (and close)
            # a file SQLite may already have open in this process: closing any descriptor
            # of it drops the process's POSIX locks on it, another process then takes the
            # database for unused, checkpoints and deletes the WAL under the open
            # connections, and what they write next is lost.
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            os.chmod(self.path, 0o600)
            self._db().executescript(_SCHEMA)
            self._migrate()
        except (OSError, sqlite3.Error) as error:
            raise StateError(f"cannot open the fleet state at {self.path}: {error}") from None

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            # WAL + NORMAL: still atomic and consistent, without an fsync per event (a
            # power cut may lose the last events, never corrupt the file); `up` of a big
            # fleet writes a few events per node.
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def _migrate(self) -> None:
        """Add the lifecycle columns to a state file written by an older fleet."""
        with self._tx() as db:
            have = {row["name"] for row in db.execute("PRAGMA table_info(nodes)")}
            for name, definition in _NODE_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE nodes ADD COLUMN {name} {definition}")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- nodes ---------------------------------------------------------------------------
    def upsert_node(self, node: Node) -> None:
        now = self.clock()
        with self._tx() as db:
            db.execute(
                """INSERT INTO nodes (name, role, slot, generation, state, address, port, zone, spot,
                       provider_id, created_at, updated_at, gone)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0)
                   ON CONFLICT(name) DO UPDATE SET
                       -- a new machine under an old name (a head after down + up) is not set up
                       setup_done=CASE WHEN nodes.gone=0 AND nodes.provider_id IS excluded.provider_id
                                  THEN nodes.setup_done ELSE 0 END,
                       mounted=CASE WHEN nodes.gone=0 AND nodes.provider_id IS excluded.provider_id
                               THEN nodes.mounted ELSE 0 END,
                       step=CASE WHEN nodes.gone=0 AND nodes.provider_id IS excluded.provider_id
                                 AND nodes.step != 'requested' THEN nodes.step ELSE 'created' END,
                       unreachable_since=CASE WHEN nodes.provider_id IS excluded.provider_id
                                 THEN nodes.unreachable_since ELSE NULL END,
                       state=excluded.state, address=excluded.address,
                       port=excluded.port, zone=excluded.zone, provider_id=excluded.provider_id,
                       updated_at=excluded.updated_at, gone=0""",
                (node.name, node.role.value, node.slot, node.generation, node.state.value, node.address,
                 node.port, node.zone, int(node.spot), node.provider_id, node.created_at or now, now),
            )

    def set_node_state(self, name: str, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE nodes SET state=?, updated_at=? WHERE name=?", (state, self.clock(), name))

    def set_node_flags(self, name: str, *, setup_done: bool | None = None, mounted: bool | None = None) -> None:
        with self._tx() as db:
            if setup_done is not None:
                db.execute("UPDATE nodes SET setup_done=? WHERE name=?", (int(setup_done), name))
            if mounted is not None:
                db.execute("UPDATE nodes SET mounted=? WHERE name=?", (int(mounted), name))

    def record_request(self, name: str, *, role: str, slot: int, generation: int, spot: bool) -> None:
        """A node asked of the provider, before the provider answers: its generation is
        taken even when the create fails or times out, and a machine that turns up under
        this name later is known to be behind (step `requested`)."""
        now = self.clock()
        with self._tx() as db:
            db.execute(
                """INSERT INTO nodes (name, role, slot, generation, state, spot, created_at, updated_at, gone, step)
                   VALUES (?,?,?,?,'REQUESTED',?,?,?,0,'requested')
                   ON CONFLICT(name) DO UPDATE SET state='REQUESTED', step='requested', provider_id=NULL,
                       address=NULL, setup_done=0, mounted=0, unreachable_since=NULL, gone=0,
                       generation=excluded.generation, updated_at=excluded.updated_at""",
                (name, role, slot, generation, int(spot), now, now),
            )

    def set_step(self, name: str, step: str) -> None:
        """`name` completed `step`: its failures in a row and back-off are cleared."""
        with self._tx() as db:
            db.execute("UPDATE nodes SET step=?, failed_step=NULL, failures=0, retry_at=NULL, last_error=NULL, "
                       "updated_at=? WHERE name=?", (step, self.clock(), name))

    def record_failure(self, name: str, step: str, error: str, *, failures: int, retry_at: float | None) -> None:
        """`step` failed on `name` for the `failures`-th time in a row; try again at `retry_at`."""
        with self._tx() as db:
            db.execute("UPDATE nodes SET failed_step=?, last_error=?, failures=?, retry_at=?, updated_at=? "
                       "WHERE name=?", (step, error, failures, retry_at, self.clock(), name))

    def set_unreachable(self, name: str, since: float | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE nodes SET unreachable_since=? WHERE name=?", (since, name))

    def mark_gone(self, name: str, state: str = "TERMINATED") -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET gone=1, state=?, setup_done=0, mounted=0, updated_at=? WHERE name=?",
                (state, self.clock(), name),
            )

    def nodes(self, *, include_gone: bool = False) -> list[NodeRecord]:
        query = "SELECT * FROM nodes" + ("" if include_gone else " WHERE gone=0") + " ORDER BY role, slot, generation"
        rows = self._db().execute(query).fetchall()
        return [
            NodeRecord(**{**dict(row), "spot": bool(row["spot"]), "setup_done": bool(row["setup_done"]),
                          "mounted": bool(row["mounted"]), "gone": bool(row["gone"])})
            for row in rows
        ]

    def node(self, name: str) -> NodeRecord | None:
        return next((n for n in self.nodes(include_gone=True) if n.name == name), None)

    def forget_nodes(self) -> None:
        with self._tx() as db:
            db.execute("UPDATE nodes SET gone=1, setup_done=0, mounted=0")

    # -- zones -------------------------------------------------------------------------
    def record_stockout(self, zone: str, detail: str = "", *, t: float | None = None) -> None:
        """`zone` (AWS: a subnet or zone) answered "no capacity" at `t` (default: now)."""
        with self._tx() as db:
            db.execute("INSERT INTO stockouts (zone, t, detail) VALUES (?,?,?) "
                       "ON CONFLICT(zone) DO UPDATE SET t=excluded.t, detail=excluded.detail",
                       (zone, self.clock() if t is None else t, detail))

    def stockouts(self) -> dict[str, float]:
        """zone -> when it last answered "no capacity" (the reconciler's zone cool-down)."""
        return {row["zone"]: row["t"] for row in self._db().execute("SELECT zone, t FROM stockouts")}

    # -- events --------------------------------------------------------------------------
    def add_event(self, kind: str, node: str | None = None, detail: str = "", *, t: float | None = None) -> Event:
        event = Event(t=self.clock() if t is None else t, node=node, kind=kind, detail=detail)
        with self._tx() as db:
            db.execute("INSERT INTO events (t, node, kind, detail) VALUES (?,?,?,?)",
                       (event.t, event.node, event.kind, event.detail))
        return event

    def events(self, *, since: float | None = None, node: str | None = None) -> list[Event]:
        query, args = "SELECT t, node, kind, detail FROM events WHERE 1=1", []
        if since is not None:
            query += " AND t >= ?"
            args.append(since)
        if node is not None:
            query += " AND node = ?"
            args.append(node)
        rows = self._db().execute(query + " ORDER BY id", args).fetchall()
        return [Event(t=row["t"], node=row["node"], kind=row["kind"], detail=row["detail"]) for row in rows]

    def count_events(self, kind: str, *, since: float | None = None) -> int:
        query, args = "SELECT COUNT(*) FROM events WHERE kind=?", [kind]
        if since is not None:
            query += " AND t >= ?"
            args.append(since)
        return int(self._db().execute(query, args).fetchone()[0])

    # -- jobs ----------------------------------------------------------------------------
    def upsert_job(self, name: str, *, status: str, spec: str, summary: dict[str, object] | None = None) -> None:
        now = self.clock()
        with self._tx() as db:
            db.execute(
                """INSERT INTO jobs (name, status, spec, created_at, updated_at, summary) VALUES (?,?,?,?,?,?)
                   ON CONFLICT(name) DO UPDATE SET status=excluded.status, spec=excluded.spec,
                       updated_at=excluded.updated_at, summary=excluded.summary""",
                (name, status, spec, now, now, json.dumps(summary or {})),
            )

    def set_job_status(self, name: str, status: str, summary: dict[str, object] | None = None) -> None:
        with self._tx() as db:
            if summary is None:
                db.execute("UPDATE jobs SET status=?, updated_at=? WHERE name=?", (status, self.clock(), name))
            else:
                db.execute("UPDATE jobs SET status=?, updated_at=?, summary=? WHERE name=?",
                           (status, self.clock(), json.dumps(summary), name))

    def jobs(self) -> list[JobRecord]:
        rows = self._db().execute("SELECT * FROM jobs ORDER BY created_at").fetchall()
        return [JobRecord(**{**dict(row), "summary": json.loads(row["summary"])}) for row in rows]

    def job(self, name: str) -> JobRecord | None:
        return next((job for job in self.jobs() if job.name == name), None)
