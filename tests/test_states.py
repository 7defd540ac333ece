"""The phase graph and the run's states, declared once in kaggle_runner/states.py: the store refuses any other
move, every phase the chain can be in has a handler, and docs/chain.md draws exactly these tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kaggle_runner.controller import PHASES
from kaggle_runner.states import PHASE_MOVES, RUN_MOVES, Actor, Phase, RunState, diagrams
from kaggle_runner.store import IllegalMove, Run, Segment, Store, TransitionError


def _store_with(tmp_path, phase: Phase, state: RunState = RunState.RUNNING) -> Store:
    store = Store(tmp_path / "ws")
    store.create_run(Run("r", "{}", "alice", "alice/k", "alice/k-ckpt", None, 1, state, "", 3, 0.0, 0.0))
    store.add_segment(Segment(run="r", idx=1, phase=phase, kernel_ref="alice/k"))
    return store


def test_the_docs_draw_exactly_the_declared_moves():
    text = Path("docs/chain.md").read_text()
    block = re.search(r"<!-- states:begin[^\n]*-->\n(.*?)<!-- states:end -->", text, re.S)
    assert block is not None, "docs/chain.md lost its generated states block"
    assert block.group(1) == diagrams(), "run `python -m kaggle_runner.states` and paste its output into docs/chain.md"
    assert "cancel: " in block.group(1) and "resume: " in block.group(1)


def test_every_phase_is_reachable_and_every_phase_that_waits_has_a_handler():
    targets = {m.target for m in PHASE_MOVES} | {Phase.PUSHING}  # a run starts in pushing
    assert targets == set(Phase)
    sources = {m.source for m in PHASE_MOVES if m.actor == Actor.CHAIN}
    assert set(PHASES) == sources, "a phase the chain leaves needs a handler, and a handler a phase it leaves"
    assert {m.target for m in RUN_MOVES} | {RunState.RUNNING} == set(RunState)


def test_the_store_refuses_a_move_the_table_does_not_allow(tmp_path):
    store = _store_with(tmp_path, Phase.PUSHING)
    with pytest.raises(IllegalMove, match="never moves a segment from pushing to ended"):
        store.transition("r", 1, Phase.PUSHING, Phase.ENDED)
    assert store.last_segment("r").phase == "pushing"  # refused before anything changed
    with pytest.raises(IllegalMove):  # resume's moves are not the chain's
        store.transition("r", 1, Phase.PUSHING, Phase.RUNNING, by=Actor.RESUME)
    store.transition("r", 1, Phase.PUSHING, Phase.RUNNING)
    with pytest.raises(TransitionError):  # allowed, but the segment is no longer where the caller thought
        store.transition("r", 1, Phase.PUSHING, Phase.RUNNING)
    with pytest.raises(IllegalMove):
        store.update_segment("r", 1, phase="ended")  # facts only; phases go through the guarded move


def test_a_run_leaves_a_final_state_only_by_resume_and_a_cancel_wins(tmp_path):
    store = _store_with(tmp_path, Phase.RUNNING)
    assert store.set_state("r", RunState.CANCELLED, "cancelled by the user", by=Actor.CANCEL)
    assert not store.set_state("r", RunState.RESUMING, "the chain went on")  # the driver's late move: refused
    assert store.get_run("r").state == "cancelled"
    with pytest.raises(IllegalMove):
        store.set_state("r", RunState.CANCELLED, "x", by=Actor.CHAIN)  # only `cancel` cancels
    assert store.set_state("r", RunState.RUNNING, "resumed by hand", by=Actor.RESUME)
    assert store.get_run("r").state == "running"
    assert store.set_state("r", RunState.COMPLETE, "done")
    assert not store.set_state("r", RunState.RUNNING, "resumed by hand", by=Actor.RESUME)  # complete is complete


def test_a_phase_that_may_wait_starts_its_wait_afresh(tmp_path):
    store = _store_with(tmp_path, Phase.RUNNING)
    store.update_segment("r", 1, waiting_since=5.0, wait_reason="Kaggle does not show version 1 yet")
    store.transition("r", 1, Phase.RUNNING, Phase.ENDING)
    segment = store.last_segment("r")
    assert (segment.waiting_since, segment.wait_reason) == (None, None)
