"""The resume chain's decisions, as pure functions of what the store and Kaggle say.

A segment is one kernel version. When it ends, `decide` says what happens next: the run is complete,
the chain resumes in a new segment, or it stops with a reason and what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Reasons the kernel writes to run_state.json that relaunching cannot fix.
FATAL_KERNEL_REASONS = {
    "data_error": "the kernel could not load its data",
    "config_error": "the configuration is wrong for the kernel",
    "out_of_memory": "the model does not fit even at micro-batch 1",
    "resume_error": "the checkpoint could not be read",
}
TERMINAL_KAGGLE = {"COMPLETE", "ERROR", "CANCEL_ACKNOWLEDGED"}


@dataclass(frozen=True)
class SegmentOutcome:
    """What one ended segment left behind."""

    kaggle_status: str
    failure_message: str | None
    run_state: dict | None  # the kernel's run_state.json, if it wrote one
    has_checkpoint: bool  # a verified checkpoint exists to resume from


@dataclass(frozen=True)
class Decision:
    action: str  # "complete" | "resume" | "stop" | "fail"
    reason: str

    @property
    def final_state(self) -> str | None:
        return {"complete": "complete", "stop": "stopped", "fail": "failed"}.get(self.action)


def step_of(outcome: SegmentOutcome) -> int:
    return int((outcome.run_state or {}).get("global_step") or 0)


def decide(outcome: SegmentOutcome, previous_steps: list[int], segments_so_far: int, max_segments: int,
           max_stalled: int, quota_left_hours: float | None, min_quota_hours: float) -> Decision:
    """The next move after a segment ended. `previous_steps`: global steps of earlier segments, oldest first."""
    state = outcome.run_state or {}
    if state.get("status") == "complete":
        return Decision("complete", f"training complete at step {state.get('global_step')}")
    reason = state.get("reason")
    if reason in FATAL_KERNEL_REASONS:
        return Decision("fail", f"{FATAL_KERNEL_REASONS[reason]}: {state.get('message') or reason}. "
                                "Fix the configuration, then `kaggle-runner resume RUN`")
    step = step_of(outcome)
    if not outcome.has_checkpoint:
        detail = outcome.failure_message or state.get("message") or outcome.kaggle_status
        if not previous_steps or max(previous_steps) == 0:
            return Decision("fail", f"the kernel failed before its first training step ({detail}); relaunching "
                                    "would burn GPU quota on a broken script. See `kaggle-runner logs RUN`")
        return Decision("fail", f"the segment left no checkpoint to resume from ({detail})")
    stalled = 0
    for earlier in reversed(previous_steps):
        if earlier < step:
            break
        stalled += 1
    if stalled >= max_stalled:
        return Decision("stop", f"{stalled + 1} segments in a row ended at step {step} without progress; see "
                                "`kaggle-runner logs RUN`, then `kaggle-runner resume RUN`")
    if segments_so_far >= max_segments:
        return Decision("stop", f"reached max_segments ({max_segments}) at step {step}; continue with "
                                f"`kaggle-runner resume RUN --max-segments {max_segments + 2}`")
    if quota_left_hours is not None and quota_left_hours < min_quota_hours:
        return Decision("stop", f"only {quota_left_hours:.1f} GPU hours of quota left this week (min_quota_hours "
                                f"= {min_quota_hours}); resume after the weekly reset")
    why = {"time_budget": "stopped at its time budget", "interrupted": "was interrupted"}.get(
        reason or "", f"ended {outcome.kaggle_status.lower()}")
    return Decision("resume", f"segment {segments_so_far} {why} at step {step}")


def overran(pushed_at: float, now: float, session_timeout: float, grace: float) -> bool:
    """Kaggle's own time limit is unreliable: the launcher's deadline per segment."""
    return now - pushed_at > session_timeout + grace
