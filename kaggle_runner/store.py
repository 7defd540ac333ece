"""The workspace's SQLite store: runs, their segments (one kernel version each) and events.

Every chain transition is one transaction, so a launcher killed at any moment leaves a state that
`watch` continues from. WAL mode lets `status` read while another process follows a run.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kaggle_runner.errors import KaggleRunnerError

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
    base_version INTEGER,
    kernel_version INTEGER,
    kernel_id INTEGER,
    resume_from TEXT,
    pushed_at REAL,
    kaggle_status TEXT,
    failure_message TEXT,
    global_step INTEGER,
    total_steps INTEGER,
    epoch INTEGER,
    run_state_json TEXT,
    train_loss REAL,
    val_loss REAL,
    dataset_version_before INTEGER,
    bytes_downloaded INTEGER NOT NULL DEFAULT 0,
    bytes_uploaded INTEGER NOT NULL DEFAULT 0,
    ended_at REAL,
    PRIMARY KEY (run, idx)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"""

RUN_STATES = ("running", "resuming", "complete", "failed", "stopped", "cancelled")
FINAL_STATES = ("complete", "failed", "stopped", "cancelled")


class StoreError(KaggleRunnerError):
    pass


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
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)


@dataclass
class Segment:
    run: str
    idx: int
    phase: str
    base_version: int | None = None
    kernel_version: int | None = None
    kernel_id: int | None = None
    resume_from: str | None = None
    pushed_at: float | None = None
    kaggle_status: str | None = None
    failure_message: str | None = None
    global_step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    run_state_json: str | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    dataset_version_before: int | None = None
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    ended_at: float | None = None

    @property
    def run_state(self) -> dict | None:
        return json.loads(self.run_state_json) if self.run_state_json else None


SEGMENT_COLUMNS = [f.name for f in fields(Segment)]


class Store:
    def __init__(self, workspace: str | Path):
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.path = self.workspace / "runs.sqlite"
        db = self._open()
        try:
            db.executescript(SCHEMA)  # commits on its own, so not inside connect()'s transaction
        finally:
            db.close()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    @contextmanager
    def connect(self):
        """One transaction, taken with the write lock up front so concurrent launchers serialize."""
        db = self._open()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # -- runs ----------------------------------------------------------------------------------------
    def create_run(self, run: Run) -> None:
        with self.connect() as db:
            if db.execute("SELECT 1 FROM runs WHERE name = ?", (run.name,)).fetchone():
                raise StoreError(f"a run named {run.name!r} already exists; choose another --name")
            db.execute(f"INSERT INTO runs VALUES ({', '.join('?' * 12)})",
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

    def update_run(self, name: str, **values: Any) -> None:
        if "state" in values and values["state"] not in RUN_STATES:
            raise ValueError(values["state"])
        values["updated_at"] = time.time()
        with self.connect() as db:
            db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE name = ?",
                       (*values.values(), name))
            if "state" in values:
                self._event(db, name, "state", f"{values['state']}: {values.get('reason', '')}".rstrip(": "))

    # -- segments ------------------------------------------------------------------------------------
    def segments(self, run: str) -> list[Segment]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM segments WHERE run = ? ORDER BY idx", (run,)).fetchall()
        return [Segment(**dict(r)) for r in rows]

    def add_segment(self, segment: Segment) -> None:
        with self.connect() as db:
            db.execute(f"INSERT INTO segments ({', '.join(SEGMENT_COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(SEGMENT_COLUMNS))})",
                       tuple(getattr(segment, c) for c in SEGMENT_COLUMNS))
            self._event(db, segment.run, "segment", f"segment {segment.idx} {segment.phase}")

    def update_segment(self, run: str, idx: int, **values: Any) -> None:
        with self.connect() as db:
            db.execute(f"UPDATE segments SET {', '.join(f'{k} = ?' for k in values)} WHERE run = ? AND idx = ?",
                       (*values.values(), run, idx))
            if "phase" in values:
                self._event(db, run, "segment", f"segment {idx} {values['phase']}")

    def advance_segment(self, run: str, idx: int, following: Segment) -> None:
        """Close segment `idx` and open the next one in one transaction: never two, never none."""
        with self.connect() as db:
            db.execute("UPDATE segments SET phase = 'done' WHERE run = ? AND idx = ?", (run, idx))
            db.execute(f"INSERT INTO segments ({', '.join(SEGMENT_COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(SEGMENT_COLUMNS))})",
                       tuple(getattr(following, c) for c in SEGMENT_COLUMNS))
            self._event(db, run, "segment", f"segment {idx} done; segment {following.idx} {following.phase}")

    # -- events --------------------------------------------------------------------------------------
    @staticmethod
    def _event(db, run: str, kind: str, message: str) -> None:
        db.execute("INSERT INTO events (run, at, kind, message) VALUES (?, ?, ?, ?)",
                   (run, time.time(), kind, message))

    def event(self, run: str, kind: str, message: str) -> None:
        with self.connect() as db:
            self._event(db, run, kind, message)

    def events(self, run: str) -> list[dict]:
        with self.connect() as db:
            return [dict(r) for r in db.execute("SELECT at, kind, message FROM events WHERE run = ? ORDER BY id",
                                                (run,))]
