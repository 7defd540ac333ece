"""The workspace's SQLite store: runs, their segments (one kernel version each), events, and drivers.

Every chain transition is one transaction guarded by the phase it expects, so a launcher killed at any
moment leaves a state that `watch` continues from, and two processes can never both take one step. A run
has one driver at a time (a lease with a heartbeat); WAL mode lets `status` read while it drives.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.states import FINAL_STATES, Phase, RunState

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    username TEXT NOT NULL,
    kernel_ref TEXT NOT NULL,
    dataset_ref TEXT NOT NULL,
    endpoint TEXT,
    local INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    max_segments INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    run TEXT NOT NULL REFERENCES runs(name),
    idx INTEGER NOT NULL,
    phase TEXT NOT NULL,
    PRIMARY KEY (run, idx)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS drivers (
    run TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat REAL NOT NULL
);
"""
# Columns the drivers table gained since workspaces were first created: (name, declaration).
DRIVER_COLUMNS = [("token", "TEXT NOT NULL DEFAULT ''"), ("pid_ns", "TEXT NOT NULL DEFAULT ''")]

# A driver that has not beaten for this long is gone (hung or its host asleep): another may take over.
HEARTBEAT_STALE_SECONDS = 60.0


class StoreError(KaggleRunnerError):
    pass


class TransitionError(StoreError):
    """Another process moved the segment first: this process must not perform the step's side effect."""


@dataclass
class Run:
    name: str
    config_json: str
    username: str
    kernel_ref: str
    dataset_ref: str
    endpoint: str | None
    local: int
    state: str
    reason: str
    max_segments: int
    created_at: float
    updated_at: float

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass
class Segment:
    run: str
    idx: int
    phase: str
    base_version: int | None = None
    kernel_version: int | None = None
    kernel_id: int | None = None
    resume_from: str | None = None  # the checkpoint this segment resumes from (flat name in the dataset)
    resume_sha256: str | None = None
    resume_step: int | None = None
    best_sha256: str | None = None
    resume_retries: int = 0  # pushes of the same resume that found no checkpoint (Kaggle pinned an old version)
    push_attempted_at: float | None = None  # a push was sent then: it may have landed even if Kaggle shows nothing
    pushed_at: float | None = None
    running_at: float | None = None  # first RUNNING status: session time counts from here, not from the push
    session_id: str | None = None  # from the kernel's session event; what cancel needs
    kaggle_status: str | None = None
    failure_message: str | None = None
    global_step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    run_state_json: str | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    dataset_version_before: int | None = None
    dataset_version: int | None = None  # the checkpoint-dataset version this segment's resume uploaded
    dataset_reuploads: int = 0  # uploads repeated because a version failed processing or never became ready
    settle_until: float | None = None  # when the settle after "ready" ends: a restarted launcher sleeps the rest
    resume_proven: int = 0  # the next segment's kernel reported it resumed from that exact checkpoint
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    upload_seconds: float | None = None
    ended_at: float | None = None

    @property
    def run_state(self) -> dict | None:
        try:
            state = json.loads(self.run_state_json) if self.run_state_json else None
        except ValueError:
            return None
        return state if isinstance(state, dict) else None


@dataclass
class Driver:
    pid: int
    host: str
    started_at: float
    heartbeat: float
    token: str = ""  # random per process: pid and host alone repeat across containers and pid reuse
    pid_ns: str = ""  # the pid namespace `pid` means something in ("" in leases older than this column)

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


SEGMENT_COLUMNS = [f.name for f in fields(Segment)]
_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT"}


def _column_type(annotation: str) -> str:
    for python_type, sql in _SQL_TYPES.items():
        if python_type.__name__ in annotation:
            return sql
    return "TEXT"


def this_host() -> str:
    return socket.gethostname()


def _new_token() -> str:
    return secrets.token_hex(8)


# This process's lease identity. A fork gets its own: parent and child must never renew each other's lease.
_PROCESS_TOKEN = _new_token()


def _renew_token() -> None:
    global _PROCESS_TOKEN
    _PROCESS_TOKEN = _new_token()


os.register_at_fork(after_in_child=_renew_token)


def process_token() -> str:
    return _PROCESS_TOKEN


def pid_namespace() -> str:
    """The pid namespace of this process: two containers may share a hostname, and pids mean nothing across
    namespaces. Empty where the system does not say (not Linux)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, workspace: str | Path, create: bool = True):
        self.workspace = Path(workspace)
        if not create and not (self.workspace / "runs.sqlite").exists():
            raise StoreError(f"no runs here: {self.workspace} does not exist in {Path.cwd()}. Runs live in the "
                             "folder you launched them from (or --workspace); `kaggle-runner status --all` lists "
                             "every workspace you launched from")
        try:
            self.workspace.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the workspace {self.workspace}: {exc.strerror}") from None
        self.path = self.workspace / "runs.sqlite"
        self._check_not_damaged()
        db = self._open()
        try:
            db.executescript(SCHEMA)  # commits on its own, so not inside connect()'s transaction
            self._migrate(db)
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None
        finally:
            db.close()

    # -- opening ---------------------------------------------------------------------------------------
    def _check_not_damaged(self) -> None:
        """A store that exists but is empty or not SQLite would otherwise read as "no runs": every run lost."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            header = handle.read(16)
        if header != b"SQLite format 3\x00":
            raise self._damaged(None)

    def _damaged(self, error: Exception | None) -> StoreError:
        aside = self.path.with_name(f"runs.damaged-{int(time.time())}.sqlite")
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            kept = f"it was moved to {aside}"
        except OSError:
            kept = "it was left where it is"
        detail = f" ({error})" if error else ""
        return StoreError(f"the run store {self.path} is damaged{detail}; {kept}. A new, empty store starts with "
                          "the next command; runs of the old one can be found on Kaggle by their kernel slugs")

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise self._busy(exc) from None
        return db

    def _busy(self, exc: sqlite3.Error) -> StoreError:
        """A store error in one line: locked (wait), damaged (kept aside), or what SQLite said."""
        if "locked" in str(exc) or "busy" in str(exc):
            return StoreError(f"the run store {self.path} is locked by another process for more than 10 s; "
                              "try again, or look for a stuck kaggle-runner process")
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError) \
                or "not a database" in str(exc) or "malformed" in str(exc):
            return self._damaged(exc)
        return StoreError(f"the run store {self.path} failed: {exc}")

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Columns added since a workspace was created (segments carry one column per Segment field)."""
        have = {row["name"] for row in db.execute("PRAGMA table_info(segments)")}
        for field in fields(Segment):
            if field.name not in have:
                default = " NOT NULL DEFAULT 0" if field.default == 0 else ""
                db.execute(f"ALTER TABLE segments ADD COLUMN {field.name} {_column_type(str(field.type))}{default}")
        have = {row["name"] for row in db.execute("PRAGMA table_info(drivers)")}
        for name, declaration in DRIVER_COLUMNS:
            if name not in have:  # a lease written before: empty token, matched by pid and host as it was
                db.execute(f"ALTER TABLE drivers ADD COLUMN {name} {declaration}")

    @contextmanager
    def connect(self):
        """One transaction, taken with the write lock up front so concurrent launchers serialize."""
        db = self._open()
        try:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise self._busy(exc) from None
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise self._busy(exc) from None
        finally:
            db.close()

    # -- runs ----------------------------------------------------------------------------------------
    def create_run(self, run: Run) -> None:
        with self.connect() as db:
            if db.execute("SELECT 1 FROM runs WHERE name = ?", (run.name,)).fetchone():
                raise StoreError(f"a run named {run.name!r} already exists; choose another --name")
            db.execute(f"INSERT INTO runs VALUES ({', '.join('?' * len(fields(Run)))})",
                       tuple(getattr(run, f.name) for f in fields(Run)))
            self._event(db, run.name, "created", f"run {run.name} for kernel {run.kernel_ref}")

    def get_run(self, name: str) -> Run:
        with self.connect() as db:
            row = db.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(r.name for r in self.list_runs()[:5]) or "none yet"
            raise StoreError(f"no run named {name!r} in {self.workspace} (runs: {known}); "
                             "`kaggle-runner status` lists them")
        return Run(**dict(row))

    def list_runs(self) -> list[Run]:
        with self.connect() as db:
            return [Run(**dict(r)) for r in db.execute("SELECT * FROM runs ORDER BY created_at DESC")]

    def update_run(self, name: str, *, only_if_active: bool = False, **values: Any) -> bool:
        """Update a run; with only_if_active, not one that already reached a final state (a cancel wins)."""
        if "state" in values:
            values["state"] = RunState(values["state"]).value
        values["updated_at"] = time.time()
        guard = f" AND state NOT IN ({', '.join('?' * len(FINAL_STATES))})" if only_if_active else ""
        with self.connect() as db:
            changed = db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE name = ?{guard}",
                                 (*values.values(), name, *(sorted(FINAL_STATES) if only_if_active else ()))
                                 ).rowcount
            if changed and "state" in values:
                self._event(db, name, "state", f"{values['state']}: {values.get('reason', '')}".rstrip(": "))
        return bool(changed)

    # -- segments ------------------------------------------------------------------------------------
    def segments(self, run: str) -> list[Segment]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM segments WHERE run = ? ORDER BY idx", (run,)).fetchall()
        return [Segment(**{k: row[k] for k in SEGMENT_COLUMNS}) for row in rows]

    def last_segment(self, run: str) -> Segment:
        return self.segments(run)[-1]

    @staticmethod
    def _insert_segment(db, segment: Segment) -> None:
        db.execute(f"INSERT INTO segments ({', '.join(SEGMENT_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(SEGMENT_COLUMNS))})",
                   tuple(getattr(segment, c) for c in SEGMENT_COLUMNS))

    def add_segment(self, segment: Segment) -> None:
        with self.connect() as db:
            self._insert_segment(db, segment)
            self._event(db, segment.run, "segment", f"segment {segment.idx} {segment.phase}")

    def update_segment(self, run: str, idx: int, **values: Any) -> None:
        """Record facts about a segment without moving its phase (use `transition` for that)."""
        if "phase" in values:
            raise ValueError("phase changes go through Store.transition")
        with self.connect() as db:
            db.execute(f"UPDATE segments SET {', '.join(f'{k} = ?' for k in values)} WHERE run = ? AND idx = ?",
                       (*values.values(), run, idx))

    def transition(self, run: str, idx: int, expected: Phase, phase: Phase, **values: Any) -> None:
        """Move segment `idx` from `expected` to `phase`; if it is no longer in `expected`, change nothing."""
        with self.connect() as db:
            self._move(db, run, idx, expected, phase, values)
            self._event(db, run, "segment", f"segment {idx} {Phase(phase).value}")

    def advance_segment(self, run: str, idx: int, expected: Phase, following: Segment) -> None:
        """Close segment `idx` and open the next one in one transaction: never two, never none."""
        with self.connect() as db:
            self._move(db, run, idx, expected, Phase.DONE, {})
            self._insert_segment(db, following)
            self._event(db, run, "segment", f"segment {idx} done; segment {following.idx} {following.phase}")

    def end_run(self, run: str, idx: int, expected: Phase, state: RunState, reason: str, **values: Any) -> None:
        """The last segment to `final` (with `values` recorded on it) and the run to its final state in one
        transaction (a kill between the two would leave a run neither `watch` nor `resume` could continue).
        A cancel already recorded wins."""
        with self.connect() as db:
            self._move(db, run, idx, expected, Phase.FINAL, values)
            done = db.execute(f"UPDATE runs SET state = ?, reason = ?, updated_at = ? WHERE name = ? AND state NOT IN "
                              f"({', '.join('?' * len(FINAL_STATES))})",
                              (RunState(state).value, reason, time.time(), run, *sorted(FINAL_STATES))).rowcount
            self._event(db, run, "segment", f"segment {idx} final")
            if done:
                self._event(db, run, "state", f"{RunState(state).value}: {reason}")

    @classmethod
    def _move(cls, db, run: str, idx: int, expected: Phase, phase: Phase, values: dict[str, Any]) -> None:
        """The guarded step every phase change takes: `phase` (and `values`) only if still in `expected`."""
        values = {**values, "phase": Phase(phase).value}
        changed = db.execute(
            f"UPDATE segments SET {', '.join(f'{k} = ?' for k in values)} WHERE run = ? AND idx = ? AND phase = ?",
            (*values.values(), run, idx, Phase(expected).value)).rowcount
        if not changed:
            raise cls._moved(db, run, idx, expected)

    @staticmethod
    def _moved(db, run: str, idx: int, expected: Phase) -> TransitionError:
        row = db.execute("SELECT phase FROM segments WHERE run = ? AND idx = ?", (run, idx)).fetchone()
        now = row["phase"] if row else "absent"
        return TransitionError(f"run {run} segment {idx} moved from {expected} to {now} in another process; "
                               "this one did not repeat the step")

    # -- drivers -------------------------------------------------------------------------------------
    def driver(self, run: str) -> Driver | None:
        """The live driver of `run`, if any (a dead or silent one is not)."""
        with self.connect() as db:
            return self._live_driver(db, run)

    @staticmethod
    def _live_driver(db, run: str) -> Driver | None:
        row = db.execute("SELECT pid, host, started_at, heartbeat, token, pid_ns FROM drivers WHERE run = ?",
                         (run,)).fetchone()
        if row is None:
            return None
        holder = Driver(**dict(row))
        # A gone pid means a dead driver only where that pid means the same process: this host, this pid
        # namespace (a container with our hostname has its own pids). Elsewhere only the heartbeat tells.
        if holder.host == this_host() and holder.pid_ns in ("", pid_namespace()) and not _pid_alive(holder.pid):
            return None
        if time.time() - holder.heartbeat > HEARTBEAT_STALE_SECONDS:
            return None
        return holder

    @staticmethod
    def _ours(holder: Driver) -> bool:
        if holder.token:
            return holder.token == process_token()
        return holder.pid == os.getpid() and holder.host == this_host()  # a lease older than tokens

    def acquire_driver(self, run: str) -> Driver | None:
        """Take the lease for `run`; None on success, else the live driver that holds it."""
        pid = os.getpid()
        with self.connect() as db:
            holder = self._live_driver(db, run)
            if holder is not None and not self._ours(holder):
                return holder
            now = time.time()
            db.execute("INSERT OR REPLACE INTO drivers (run, pid, host, started_at, heartbeat, token, pid_ns) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (run, pid, this_host(), now, now, process_token(), pid_namespace()))
            self._event(db, run, "driver", f"driven by process {pid} on {this_host()}")
        return None

    def heartbeat(self, run: str) -> bool:
        """Renew the lease; False if it is no longer ours (taken over after a long stall)."""
        with self.connect() as db:
            return bool(db.execute("UPDATE drivers SET heartbeat = ? WHERE run = ? AND token = ?",
                                   (time.time(), run, process_token())).rowcount)

    def release_driver(self, run: str) -> None:
        with self.connect() as db:
            db.execute("DELETE FROM drivers WHERE run = ? AND token = ?", (run, process_token()))

    # -- events --------------------------------------------------------------------------------------
    @staticmethod
    def _event(db, run: str, kind: str, message: str) -> None:
        db.execute("INSERT INTO events (run, at, kind, message) VALUES (?, ?, ?, ?)",
                   (run, time.time(), kind, message))

    def events(self, run: str) -> list[dict]:
        with self.connect() as db:
            return [dict(r) for r in db.execute("SELECT at, kind, message FROM events WHERE run = ? ORDER BY id",
                                                (run,))]
