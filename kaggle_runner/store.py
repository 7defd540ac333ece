"""The workspace's SQLite store: runs, their segments (one kernel version each), events, and drivers.

Every change of a segment's phase or a run's state is one guarded UPDATE: it happens only from the state the
caller expects and only along a move `states.PHASE_MOVES` / `states.RUN_MOVES` allows for that actor, so a
launcher killed at any moment leaves a state `watch` continues from, and two processes never both take one
step. Writes take the lock up front (BEGIN IMMEDIATE); reads don't (WAL lets `status` read while a driver
writes). A run has one driver at a time: a lease with a heartbeat. The schema is store_migrations.py's.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kaggle_runner.records import (
    PER_PHASE,
    RUN_COLUMNS,
    SEGMENT_COLUMNS,
    Driver,
    Run,
    Segment,
    StoreError,
    checked,
)
from kaggle_runner.states import (
    PHASE_MOVES,
    RUN_MOVES,
    Actor,
    Phase,
    RunState,
    allowed_sources,
    is_allowed,
)
from kaggle_runner.store_migrations import MIGRATIONS, RELEASE_0_1_0_COLUMNS, SCHEMA_VERSION

__all__ = ["Driver", "Run", "Segment", "Store", "StoreError", "TransitionError", "IllegalMove"]

# A driver that has not beaten for this long is gone (hung or its host asleep): another may take over.
HEARTBEAT_STALE_SECONDS = 60.0
# SQLite's primary result codes for a file that is not a database, or one whose pages are damaged: the only
# errors that make a store "damaged". Anything else (a value SQLite refused, a locked file) is not.
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26
BUSY_SECONDS = 10


class TransitionError(StoreError):
    """Another process moved the segment first: this process must not perform the step's side effect."""


class IllegalMove(StoreError):
    """A move the state tables do not allow: a bug in the caller, refused before anything changed."""


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
        self._migrate()

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
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        db.row_factory = sqlite3.Row
        db.text_factory = lambda raw: raw.decode("utf-8", errors="replace")  # a hand-edited cell is not a crash
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000}")
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            db.close()
            raise self._failed(exc) from None
        return db

    def _failed(self, exc: sqlite3.Error) -> StoreError:
        """A store error in one line: locked (wait), damaged (kept aside), or what SQLite said."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB):
            return self._damaged(exc)
        if "locked" in str(exc) or "busy" in str(exc):
            return StoreError(f"the run store {self.path} is locked by another process for more than "
                              f"{BUSY_SECONDS} s; try again, or look for a stuck kaggle-runner process")
        return StoreError(f"the run store {self.path} failed: {exc}")

    def _migrate(self) -> None:
        """Bring the store to SCHEMA_VERSION, one numbered migration per transaction."""
        db = self._open()
        try:
            while True:
                db.execute("BEGIN IMMEDIATE")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version == 0 and db.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone():
                    version = self._adopt_release_0_1_0(db)
                if version >= SCHEMA_VERSION:
                    db.execute("COMMIT")
                    if version > SCHEMA_VERSION:
                        raise StoreError(f"the run store {self.path} was made by a newer kaggle-runner (schema "
                                         f"{version}, this one knows {SCHEMA_VERSION}); upgrade kaggle-runner")
                    return
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise self._failed(exc) from None
        finally:
            db.close()

    def _adopt_release_0_1_0(self, db: sqlite3.Connection) -> int:
        """A store with tables but no schema version was made by release 0.1.0, if its columns say so."""
        for table, columns in RELEASE_0_1_0_COLUMNS.items():
            have = [row["name"] for row in db.execute(f"PRAGMA table_info({table})")]
            if have != columns:
                db.execute("ROLLBACK")
                raise StoreError(f"the run store {self.path} was made by a kaggle-runner older than 0.1.0 (its "
                                 f"{table} table differs); move it aside and launch again")
        db.execute("PRAGMA user_version = 1")
        return 1

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, taken with the write lock up front so concurrent launchers serialize."""
        db = self._open()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        finally:
            db.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot without the write lock: readers never wait for a driver, nor it for them."""
        db = self._open()
        try:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        finally:
            db.close()

    # -- runs ----------------------------------------------------------------------------------------
    def create_run(self, run: Run) -> None:
        values = checked(Run, {name: getattr(run, name) for name in RUN_COLUMNS})
        with self.write() as db:
            if db.execute("SELECT 1 FROM runs WHERE name = ?", (run.name,)).fetchone():
                raise StoreError(f"a run named {run.name!r} already exists; choose another --name")
            db.execute(f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
                       tuple(values.values()))
            self._event(db, run.name, "created", f"run {run.name} for kernel {run.kernel_ref}")

    def get_run(self, name: str) -> Run:
        with self.read() as db:
            row = db.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(r.name for r in self.list_runs()[:5]) or "none yet"
            raise StoreError(f"no run named {name!r} in {self.workspace} (runs: {known}); "
                             "`kaggle-runner status` lists them")
        return Run(**{k: row[k] for k in RUN_COLUMNS})

    def list_runs(self) -> list[Run]:
        with self.read() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created_at DESC").fetchall()
        return [Run(**{k: row[k] for k in RUN_COLUMNS}) for row in rows]

    def update_run(self, name: str, **values: Any) -> None:
        """Record facts about a run without changing its state (use `set_state` for that)."""
        if "state" in values:
            raise IllegalMove("a run's state changes through Store.set_state")
        values = checked(Run, {**values, "updated_at": time.time()})
        with self.write() as db:
            db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE name = ?",
                       (*values.values(), name))

    def set_state(self, name: str, state: RunState, reason: str, by: Actor = Actor.CHAIN, **values: Any) -> bool:
        """Move the run to `state` if `by` may from where it is (a cancel recorded first wins over the chain's
        own moves, and only `resume` leaves a final state). True if it moved; False if it had moved elsewhere."""
        with self.write() as db:
            return self._set_state(db, name, RunState(state), reason, by, values)

    @classmethod
    def _set_state(cls, db, name: str, state: RunState, reason: str, by: Actor, values: dict[str, Any]) -> bool:
        sources = allowed_sources(RUN_MOVES, state, by)
        if not sources:
            raise IllegalMove(f"{by} never moves a run to {state}")
        current = db.execute("SELECT state FROM runs WHERE name = ?", (name,)).fetchone()
        if current is not None and current["state"] == state.value and by == Actor.CHAIN:
            sources = (*sources, state.value)  # the chain restating where it is: not a move
        values = checked(Run, {**values, "state": state.value, "reason": reason, "updated_at": time.time()})
        changed = db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE name = ? AND state IN "
                             f"({', '.join('?' * len(sources))})", (*values.values(), name, *sources)).rowcount
        if changed:
            cls._event(db, name, "state", f"{state.value}: {reason}".rstrip(": "))
        return bool(changed)

    # -- segments ------------------------------------------------------------------------------------
    def segments(self, run: str) -> list[Segment]:
        with self.read() as db:
            rows = db.execute("SELECT * FROM segments WHERE run = ? ORDER BY idx", (run,)).fetchall()
        return [Segment(**{k: row[k] for k in SEGMENT_COLUMNS}) for row in rows]

    def last_segment(self, run: str) -> Segment:
        return self.segments(run)[-1]

    @staticmethod
    def _insert_segment(db, segment: Segment) -> None:
        values = checked(Segment, {c: getattr(segment, c) for c in SEGMENT_COLUMNS})
        db.execute(f"INSERT INTO segments ({', '.join(SEGMENT_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(SEGMENT_COLUMNS))})", tuple(values.values()))

    def add_segment(self, segment: Segment) -> None:
        with self.write() as db:
            self._insert_segment(db, segment)
            self._event(db, segment.run, "segment", f"segment {segment.idx} {segment.phase}")

    def update_segment(self, run: str, idx: int, **values: Any) -> None:
        """Record facts about a segment without moving its phase (use `transition` for that)."""
        if "phase" in values:
            raise IllegalMove("a segment's phase changes through Store.transition")
        values = checked(Segment, values)
        with self.write() as db:
            db.execute(f"UPDATE segments SET {', '.join(f'{k} = ?' for k in values)} WHERE run = ? AND idx = ?",
                       (*values.values(), run, idx))

    def transition(self, run: str, idx: int, expected: Phase, phase: Phase, by: Actor = Actor.CHAIN,
                   **values: Any) -> None:
        """Move segment `idx` from `expected` to `phase`; if it is no longer in `expected`, change nothing."""
        with self.write() as db:
            self._move(db, run, idx, expected, phase, by, values)
            self._event(db, run, "segment", f"segment {idx} {Phase(phase).value}")

    def advance_segment(self, run: str, idx: int, expected: Phase, following: Segment,
                        by: Actor = Actor.CHAIN) -> None:
        """Close segment `idx` and open the next one in one transaction: never two, never none."""
        with self.write() as db:
            self._move(db, run, idx, expected, Phase.DONE, by, {})
            self._insert_segment(db, following)
            self._event(db, run, "segment", f"segment {idx} done; segment {following.idx} {following.phase}")

    def end_run(self, run: str, idx: int, expected: Phase, state: RunState, reason: str, **values: Any) -> None:
        """The last segment to `final` (with `values` recorded on it) and the run to its final state in one
        transaction (a kill between the two would leave a run neither `watch` nor `resume` could continue).
        A cancel already recorded wins."""
        with self.write() as db:
            self._move(db, run, idx, expected, Phase.FINAL, Actor.CHAIN, values)
            self._event(db, run, "segment", f"segment {idx} final")
            self._set_state(db, run, RunState(state), reason, Actor.CHAIN, {})

    @classmethod
    def _move(cls, db, run: str, idx: int, expected: Phase, phase: Phase, by: Actor, values: dict[str, Any]) -> None:
        """The guarded step every phase change takes: `phase` (and `values`) only along an allowed move, and only
        if the segment is still in `expected`. A phase that may wait starts its wait afresh; a segment that is done
        or final keeps the record of its last one."""
        expected, phase = Phase(expected), Phase(phase)
        if not is_allowed(PHASE_MOVES, expected, phase, by):
            raise IllegalMove(f"{by} never moves a segment from {expected} to {phase} (kaggle_runner.states)")
        fresh = {} if phase in (Phase.DONE, Phase.FINAL) else PER_PHASE
        values = checked(Segment, {**fresh, **values, "phase": phase.value})
        changed = db.execute(
            f"UPDATE segments SET {', '.join(f'{k} = ?' for k in values)} WHERE run = ? AND idx = ? AND phase = ?",
            (*values.values(), run, idx, expected.value)).rowcount
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
        with self.read() as db:
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
        if holder.host == this_host() and holder.pid_ns == pid_namespace() and not _pid_alive(holder.pid):
            return None
        if time.time() - holder.heartbeat > HEARTBEAT_STALE_SECONDS:
            return None
        return holder

    def acquire_driver(self, run: str) -> Driver | None:
        """Take the lease for `run`; None on success, else the live driver that holds it."""
        pid = os.getpid()
        with self.write() as db:
            holder = self._live_driver(db, run)
            if holder is not None and holder.token != process_token():
                return holder
            now = time.time()
            db.execute("INSERT OR REPLACE INTO drivers (run, pid, host, started_at, heartbeat, token, pid_ns) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (run, pid, this_host(), now, now, process_token(), pid_namespace()))
            self._event(db, run, "driver", f"driven by process {pid} on {this_host()}")
        return None

    def heartbeat(self, run: str) -> bool:
        """Renew the lease; False if it is no longer ours (taken over after a long stall)."""
        with self.write() as db:
            return bool(db.execute("UPDATE drivers SET heartbeat = ? WHERE run = ? AND token = ?",
                                   (time.time(), run, process_token())).rowcount)

    def release_driver(self, run: str) -> None:
        with self.write() as db:
            db.execute("DELETE FROM drivers WHERE run = ? AND token = ?", (run, process_token()))

    # -- events --------------------------------------------------------------------------------------
    @staticmethod
    def _event(db, run: str, kind: str, message: str) -> None:
        db.execute("INSERT INTO events (run, at, kind, message) VALUES (?, ?, ?, ?)",
                   (run, time.time(), kind, message))

    def events(self, run: str) -> list[dict]:
        with self.read() as db:
            return [dict(r) for r in db.execute("SELECT at, kind, message FROM events WHERE run = ? ORDER BY id",
                                                (run,))]
