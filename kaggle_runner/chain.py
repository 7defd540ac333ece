"""The resume chain's decisions, as pure functions of what the store and Kaggle say.

A segment is one kernel version. When it ends, `decide` says what happens next: the run is complete,
the chain resumes in a new segment, the same resume is pushed again, or it stops with a reason and what to do.
Every stop reason the kernel declares (contract.STOP_REASONS) has its class here; tests/test_contract.py fails
when the kernel declares one this module does not classify.
"""

from __future__ import annotations

from dataclasses import dataclass

from kaggle_runner import untrusted
from kaggle_runner.states import RunState

COMPLETE = "complete"
# The session saved a checkpoint and can go on in a new one. The words are the resume message's.
RESUMABLE_KERNEL_REASONS = {
    "step_budget": "ended after its segment_steps",
    "time_budget": "stopped at its time budget",
    "interrupted": "was interrupted",
    "error": None,  # an unexpected error after progress: "ended <Kaggle's status>"
    "job_resume": "saved and asked for a new session",  # a [job]'s script: exit 75
}
# The kernel did not find the checkpoint it was told to resume from: push the same resume again.
RESUME_MISSING = "resume_missing"
# Relaunching cannot fix these.
FATAL_KERNEL_REASONS = {
    "data_error": "the kernel could not load its data",
    "config_error": "the configuration is wrong for the kernel",
    "out_of_memory": "the model does not fit even at micro-batch 1",
    "resume_error": "the checkpoint could not be read",
    "diverged": "training diverged (the loss stayed NaN or infinite); the last finite checkpoint is kept",
    "job_failed": "the script failed",  # a [job]'s script exited with neither 0 nor 75
    "output_budget": "the checkpoint directory does not fit beside the outputs under output_budget_gb",
}
# These stop the chain without anything to fix in the configuration: try again later.
STOPPING_KERNEL_REASONS = {
    "no_gpu": "the session came without a usable GPU",
}
CLASSIFIED = {COMPLETE, RESUME_MISSING, *RESUMABLE_KERNEL_REASONS, *FATAL_KERNEL_REASONS, *STOPPING_KERNEL_REASONS}
# The outputs route tries a resume this many times before that resume goes through the checkpoint dataset.
OUTPUTS_TRIES = 2


@dataclass(frozen=True)
class SegmentOutcome:
    """What one ended segment left behind."""

    kaggle_status: str
    failure_message: str | None
    run_state: dict | None  # the kernel's run_state.json, if it wrote one
    has_checkpoint: bool  # a verified checkpoint exists to resume from


@dataclass(frozen=True)
class Decision:
    action: str  # "complete" | "resume" | "repush" | "stop" | "fail"
    reason: str

    @property
    def final_state(self) -> RunState | None:
        return {"complete": RunState.COMPLETE, "stop": RunState.STOPPED, "fail": RunState.FAILED}.get(self.action)


def step_of(outcome: SegmentOutcome) -> int:
    return untrusted.whole((outcome.run_state or {}).get("global_step")) or 0


def decide(outcome: SegmentOutcome, previous_steps: list[int], segments_so_far: int, max_segments: int,
           max_stalled: int, quota_left_hours: float | None, min_quota_hours: float, run_name: str = "RUN",
           resume_retries: int = 0, max_resume_retries: int = 3) -> Decision:
    """The next move after a segment ended. `previous_steps`: global steps of earlier segments, oldest first."""
    state = outcome.run_state or {}
    step = step_of(outcome)
    if state.get("status") == "complete":
        return Decision("complete", f"training complete at step {step}")
    reason = state.get("reason") if state.get("reason") in CLASSIFIED else "error"
    said = str(untrusted.text(state.get("message")) or reason).rstrip(". ")  # the kernel's words, no final period
    if reason == RESUME_MISSING:
        if resume_retries < max_resume_retries:
            return Decision("repush", f"the kernel did not find its checkpoint ({said}); "
                                      "Kaggle attached an older version")
        return Decision("stop", f"the kernel did not find its checkpoint after {resume_retries + 1} pushes "
                                f"({said}); Kaggle keeps attaching an older dataset "
                                f"version. Raise dataset_settle_seconds, then `kaggle-runner resume {run_name}`")
    if reason in FATAL_KERNEL_REASONS:
        return Decision("fail", f"{FATAL_KERNEL_REASONS[reason]}: {said}. "
                                f"Fix the configuration, then `kaggle-runner resume {run_name}`")
    if reason in STOPPING_KERNEL_REASONS:
        return Decision("stop", f"{STOPPING_KERNEL_REASONS[reason]}: {said}. "
                                f"Set allow_cpu = true to accept one, or `kaggle-runner resume {run_name}` later")
    if not outcome.has_checkpoint:
        detail = outcome.failure_message or untrusted.text(state.get("message")) or outcome.kaggle_status
        if not previous_steps or max(previous_steps) == 0:
            return Decision("fail", f"the kernel failed before its first training step ({detail}); relaunching "
                                    f"would burn GPU quota on a broken script. See `kaggle-runner logs {run_name}`")
        return Decision("fail", f"the segment left no checkpoint to resume from ({detail})")
    stalled = 0
    for earlier in reversed(previous_steps):
        if earlier < step:
            break
        stalled += 1
    if stalled >= max_stalled:
        return Decision("stop", f"{stalled + 1} segments in a row ended at step {step} without progress; see "
                                f"`kaggle-runner logs {run_name}`, then `kaggle-runner resume {run_name}`")
    if segments_so_far >= max_segments:
        return Decision("stop", f"reached max_segments ({max_segments}) at step {step}; continue with "
                                f"`kaggle-runner resume {run_name} --max-segments {max_segments + 2}`")
    if quota_left_hours is not None and quota_left_hours < min_quota_hours:
        return Decision("stop", f"only {quota_left_hours:.1f} GPU hours of quota left this week (min_quota_hours "
                                f"= {min_quota_hours}); resume after the weekly reset")
    why = RESUMABLE_KERNEL_REASONS.get(reason) or f"ended {outcome.kaggle_status.lower()}"
    return Decision("resume", f"segment {segments_so_far} {why} at step {step}")


def retry_route(resume_via: str | None, tries_so_far: int) -> str:
    """How the next push of a resume that was not found attaches the checkpoint: the outputs route gets
    OUTPUTS_TRIES tries, then that resume goes through the checkpoint dataset (the laptop carries it once)."""
    if resume_via == "outputs" and tries_so_far < OUTPUTS_TRIES:
        return "outputs"
    return "dataset"


def overran(running_at: float, now: float, session_timeout: float, grace: float) -> bool:
    """Kaggle's own time limit is unreliable: the launcher's deadline per segment, from its first RUNNING status
    (time in the queue is not session time)."""
    return now - running_at > session_timeout + grace
