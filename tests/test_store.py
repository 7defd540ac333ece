"""The run store: numbered migrations from a store release 0.1.0 made, reads that never wait for a writer,
values checked against their columns, and "damaged" only when SQLite says the file is."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest

from kaggle_runner.store import Run, Segment, Store, StoreError
from kaggle_runner.store_migrations import SCHEMA_VERSION

RELEASE_0_1_0 = Path(__file__).with_name("data") / "store-0.1.0.sqlite"


def _columns(path: Path, table: str) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    finally:
        db.close()


def test_a_store_made_by_release_0_1_0_is_migrated_with_its_runs_intact(tmp_path):
    (tmp_path / "ws").mkdir()
    shutil.copy(RELEASE_0_1_0, tmp_path / "ws/runs.sqlite")  # a finished two-segment run and a detached one
    store = Store(tmp_path / "ws")
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    assert _columns(store.path, "runs") == [f.name for f in fields(Run)]
    assert _columns(store.path, "segments") == [f.name for f in fields(Segment)]
    done = store.get_run("done-run")
    assert (done.state, done.checkpoint_dataset_ref, done.resume_via) == \
        ("complete", "alice/kaggle-runner-tiny-ckpt", "dataset")
    first, last = store.segments("done-run")
    assert (first.phase, first.checkpoint_version, first.kernel_ref) == ("done", 1, "alice/kaggle-runner-tiny")
    assert (last.phase, last.resume_from) == ("final", "checkpoints/checkpoint_epoch1_step10.pt")
    detached = store.last_segment("detached-run")
    assert (detached.phase, detached.kernel_version, detached.kernel_ref) == \
        ("running", 1, "alice/other-runner-tiny")
    assert len(store.events("done-run")) > 5
    Store(tmp_path / "ws")  # opening it again changes nothing
    assert store.get_run("detached-run").state == "running"


def test_a_fresh_store_has_the_newest_schema(tmp_path):
    store = Store(tmp_path / "ws")
    assert _columns(store.path, "segments") == [f.name for f in fields(Segment)]


def test_a_store_older_than_the_first_release_is_refused_not_guessed(tmp_path):
    (tmp_path / "ws").mkdir()
    db = sqlite3.connect(tmp_path / "ws/runs.sqlite")
    db.executescript("CREATE TABLE runs (name TEXT PRIMARY KEY, config_json TEXT); CREATE TABLE segments (run TEXT);")
    db.close()
    with pytest.raises(StoreError, match="older than 0.1.0"):
        Store(tmp_path / "ws")
    assert (tmp_path / "ws/runs.sqlite").exists()  # left as it is: nothing lost


def test_reads_do_not_wait_for_a_writer(tmp_path):
    store = Store(tmp_path / "ws")
    store.create_run(Run("r", "{}", "alice", "alice/k", "alice/k-ckpt", None, 1, "running", "", 3, 0.0, 0.0))
    writer = sqlite3.connect(store.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a driver in the middle of a write transaction
    writer.execute("UPDATE runs SET reason = 'writing' WHERE name = 'r'")
    answers = []
    reader = threading.Thread(target=lambda: answers.append((store.get_run("r").reason, len(store.list_runs()))))
    reader.start()
    reader.join(timeout=5)  # a read that took the write lock would wait out SQLite's 10 s busy timeout
    finished = not reader.is_alive()
    writer.execute("COMMIT")
    writer.close()
    reader.join()
    assert finished and answers == [("", 1)]  # the snapshot before the write, at once


def test_values_are_checked_against_their_columns_and_a_refused_value_is_no_damage(tmp_path):
    store = Store(tmp_path / "ws")
    store.create_run(Run("r", "{}", "alice", "alice/k", "alice/k-ckpt", None, 1, "running", "", 3, 0.0, 0.0))
    store.add_segment(Segment(run="r", idx=1, phase="running", kernel_ref="alice/k"))
    for bad in ([1, 2], {"n": 5}, "five", 10**30, True, float("nan")):
        with pytest.raises(StoreError):
            store.update_segment("r", 1, global_step=bad)
    with pytest.raises(StoreError):
        store.update_segment("r", 1, train_loss=float("inf"))
    assert store.path.exists() and store.get_run("r").name == "r"  # not moved aside: nothing is damaged


def test_a_store_that_is_not_sqlite_is_moved_aside_in_one_line(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws/runs.sqlite").write_bytes(b"not a database at all, just bytes" * 10)
    with pytest.raises(StoreError, match="is damaged"):
        Store(tmp_path / "ws")
    assert list((tmp_path / "ws").glob("runs.damaged-*.sqlite"))


def test_a_text_cell_that_is_not_utf8_reads_as_text(tmp_path):
    store = Store(tmp_path / "ws")
    store.create_run(Run("r", "{}", "alice", "alice/k", "alice/k-ckpt", None, 1, "running", "", 3, 0.0, time.time()))
    db = sqlite3.connect(store.path)
    db.execute("UPDATE runs SET reason = CAST(X'66ff6f' AS TEXT) WHERE name = 'r'")  # hand-edited by another tool
    db.commit()
    db.close()
    assert store.get_run("r").reason == "f\ufffdo"
