"""The chain's decisions, without a server: every guardrail and its stated reason."""

from __future__ import annotations

from kaggle_runner.chain import Decision, SegmentOutcome, decide, overran


def outcome(status="COMPLETE", reason="time_budget", step=40, checkpoint=True, run_status="incomplete",
            message=None):
    state = {"status": run_status, "reason": reason, "global_step": step, "message": message or ""}
    return SegmentOutcome(status, None, state, checkpoint)


def choose(result, previous=(), segments=1, max_segments=6, max_stalled=2, quota=None, min_quota=1.0) -> Decision:
    return decide(result, list(previous), segments, max_segments, max_stalled, quota, min_quota)


def test_complete_run_completes():
    assert choose(outcome(run_status="complete", reason="complete")).action == "complete"


def test_time_budget_and_platform_kill_resume():
    assert choose(outcome()).action == "resume"
    killed = SegmentOutcome("CANCEL_ACKNOWLEDGED", "exceeded the max allowed execution duration", None, True)
    assert choose(killed, previous=[10]).action == "resume"


def test_error_after_progress_resumes_but_error_before_first_step_fails():
    crashed = SegmentOutcome("ERROR", "exit code 1", {"status": "incomplete", "reason": "error",
                                                      "global_step": 30}, True)
    assert choose(crashed, previous=[10]).action == "resume"
    broken = SegmentOutcome("ERROR", "SyntaxError", None, False)
    decision = choose(broken)
    assert decision.action == "fail" and "before its first training step" in decision.reason
    assert decision.final_state == "failed"


def test_fatal_kernel_reasons_fail_without_relaunching():
    for reason in ("data_error", "out_of_memory", "config_error", "resume_error"):
        decision = choose(outcome(reason=reason, message="details here"))
        assert decision.action == "fail" and "details here" in decision.reason


def test_segments_without_progress_stop_the_chain():
    assert choose(outcome(step=40), previous=[40], segments=2).action == "resume"
    decision = choose(outcome(step=40), previous=[10, 40, 40], segments=4)
    assert decision.action == "stop" and "without progress" in decision.reason
    assert decision.final_state == "stopped"


def test_max_segments_stops_with_how_to_continue():
    decision = choose(outcome(step=90), previous=[30, 60], segments=3, max_segments=3)
    assert decision.action == "stop" and "--max-segments 5" in decision.reason


def test_low_quota_stops():
    decision = choose(outcome(), quota=0.5, min_quota=1.0)
    assert decision.action == "stop" and "0.5 GPU hours" in decision.reason
    assert choose(outcome(), quota=5.0, min_quota=1.0).action == "resume"


def test_launcher_deadline_past_kaggles_limit():
    assert not overran(running_at=0, now=100, session_timeout=90, grace=30)
    assert overran(running_at=0, now=121, session_timeout=90, grace=30)


def test_the_chain_docs_diagram_names_every_phase():
    from pathlib import Path

    from kaggle_runner.controller import PHASES
    from kaggle_runner.states import Phase

    diagram = Path("docs/chain.md").read_text().split("```")[1]
    assert all(phase.value in diagram for phase in Phase), [p.value for p in Phase if p.value not in diagram]
    assert set(PHASES) == set(Phase) - {Phase.DONE, Phase.FINAL}  # every phase with a next step has a handler


def test_resume_missing_repushes_a_bounded_number_of_times_then_stops():
    missing = outcome(reason="resume_missing", step=0, checkpoint=False)
    assert choose(missing, previous=[10]).action == "repush"
    decision = decide(missing, [10], 2, 6, 2, None, 1.0, "demo", resume_retries=3, max_resume_retries=3)
    assert decision.action == "stop" and "dataset_settle_seconds" in decision.reason and "resume demo" in \
        decision.reason


def test_no_gpu_stops_and_divergence_fails_naming_the_run():
    assert choose(outcome(reason="no_gpu", message="only a CPU")).final_state == "stopped"
    decision = decide(outcome(reason="diverged"), [], 1, 6, 2, None, 1.0, "demo")
    assert decision.action == "fail" and "diverged" in decision.reason and "resume demo" in decision.reason
    assert "RUN" not in decision.reason


def test_ending_a_run_is_one_transaction_and_a_cancel_already_recorded_wins(tmp_path):
    from kaggle_runner.states import Actor, Phase, RunState
    from kaggle_runner.store import Run, Segment, Store

    store = Store(tmp_path / "ws")
    for name in ("ends", "cancelled"):
        store.create_run(Run(name, "{}", "alice", f"alice/{name}", "alice/d", None, 1, RunState.RUNNING, "", 3, 0, 0))
        store.add_segment(Segment(run=name, idx=1, phase=Phase.ENDED))
    store.end_run("ends", 1, Phase.ENDED, RunState.STOPPED, "max_segments")
    assert (store.get_run("ends").state, store.last_segment("ends").phase) == ("stopped", "final")
    store.set_state("cancelled", RunState.CANCELLED, "cancelled by the user", by=Actor.CANCEL)
    store.end_run("cancelled", 1, Phase.ENDED, RunState.FAILED, "late")
    assert store.get_run("cancelled").state == "cancelled" and store.last_segment("cancelled").phase == "final"
