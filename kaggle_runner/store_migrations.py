"""The run store's schema, as numbered migrations: the store's `PRAGMA user_version` is the last one applied.

Migration 1 is the schema release 0.1.0 made (its stores carry user_version 0 and exactly these columns);
each later one takes a store from the version before it to its own, in one transaction. A new column or a
rename is a new migration at the end, never an edit of an old one; tests/test_store.py opens a store made by
0.1.0 (tests/data/store-0.1.0.sqlite) and checks that it reaches the newest schema with its runs intact.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: release 0.1.0.
    """
    CREATE TABLE runs (
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
    CREATE TABLE segments (
        run TEXT NOT NULL REFERENCES runs(name),
        idx INTEGER NOT NULL,
        phase TEXT NOT NULL, base_version INTEGER, kernel_version INTEGER, kernel_id INTEGER, resume_from TEXT,
        resume_sha256 TEXT, resume_step INTEGER, best_sha256 TEXT, resume_retries INTEGER NOT NULL DEFAULT 0,
        push_attempted_at REAL, pushed_at REAL, running_at REAL, session_id TEXT, kaggle_status TEXT,
        failure_message TEXT, global_step INTEGER, total_steps INTEGER, epoch INTEGER, run_state_json TEXT,
        train_loss REAL, val_loss REAL, dataset_version_before INTEGER, dataset_version INTEGER,
        dataset_reuploads INTEGER NOT NULL DEFAULT 0, settle_until REAL, resume_proven INTEGER NOT NULL DEFAULT 0,
        bytes_downloaded INTEGER NOT NULL DEFAULT 0, bytes_uploaded INTEGER NOT NULL DEFAULT 0, upload_seconds REAL,
        ended_at REAL,
        PRIMARY KEY (run, idx)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run TEXT NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE TABLE drivers (
        run TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat REAL NOT NULL,
        token TEXT NOT NULL DEFAULT '',
        pid_ns TEXT NOT NULL DEFAULT ''
    );
    """,
    # 2: names that say which dataset they hold; each segment names its own kernel; a phase's wait is recorded
    # (so `watch --once` and a restarted driver continue it rather than start it over); the resume routes.
    """
    ALTER TABLE runs RENAME COLUMN dataset_ref TO checkpoint_dataset_ref;
    ALTER TABLE runs ADD COLUMN resume_via TEXT NOT NULL DEFAULT 'dataset';
    ALTER TABLE runs ADD COLUMN alternate_kernel_ref TEXT;
    ALTER TABLE segments RENAME COLUMN dataset_version_before TO checkpoint_version_before;
    ALTER TABLE segments RENAME COLUMN dataset_version TO checkpoint_version;
    ALTER TABLE segments RENAME COLUMN dataset_reuploads TO checkpoint_reuploads;
    ALTER TABLE segments RENAME COLUMN settle_until TO next_try_at;
    ALTER TABLE segments ADD COLUMN kernel_ref TEXT NOT NULL DEFAULT '';
    UPDATE segments SET kernel_ref = (SELECT kernel_ref FROM runs WHERE runs.name = segments.run);
    ALTER TABLE segments ADD COLUMN waiting_since REAL;
    ALTER TABLE segments ADD COLUMN wait_reason TEXT;
    ALTER TABLE segments ADD COLUMN push_refusals INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE segments ADD COLUMN uncertain_pushes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE segments ADD COLUMN torn_reads INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE segments ADD COLUMN overrun_cancelled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE segments ADD COLUMN resume_via TEXT;
    ALTER TABLE segments ADD COLUMN resume_source_ref TEXT;
    ALTER TABLE segments ADD COLUMN resume_source_version INTEGER;
    ALTER TABLE segments ADD COLUMN handoff_segment INTEGER;
    ALTER TABLE runs ADD COLUMN cleaned_at REAL;
    """,
)

# The columns release 0.1.0 made: a user_version-0 store is taken as migration 1 only if it has exactly these.
RELEASE_0_1_0_COLUMNS = {
    "runs": ["name", "config_json", "username", "kernel_ref", "dataset_ref", "endpoint", "local", "state", "reason",
             "max_segments", "created_at", "updated_at"],
    "segments": ["run", "idx", "phase", "base_version", "kernel_version", "kernel_id", "resume_from", "resume_sha256",
                 "resume_step", "best_sha256", "resume_retries", "push_attempted_at", "pushed_at", "running_at",
                 "session_id", "kaggle_status", "failure_message", "global_step", "total_steps", "epoch",
                 "run_state_json", "train_loss", "val_loss", "dataset_version_before", "dataset_version",
                 "dataset_reuploads", "settle_until", "resume_proven", "bytes_downloaded", "bytes_uploaded",
                 "upload_seconds", "ended_at"],
    "drivers": ["run", "pid", "host", "started_at", "heartbeat", "token", "pid_ns"],
}
SCHEMA_VERSION = len(MIGRATIONS)
