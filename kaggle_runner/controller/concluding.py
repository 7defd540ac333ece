"""Phases `ended` and `repush`: decide what an ended segment leads to, and push a resume again after a wait.

The decision itself is chain.decide, a pure function; this room gathers what it needs (the segments that count,
the manifest, the quota) and acts on it: complete (fetch every output), resume (through the run's route),
push the same resume again (the kernel did not find its checkpoint), or end the run failed or stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from kaggle_runner import artifacts, chain
from kaggle_runner.controller.context import ChainContext, Wait, config_of, end_run
from kaggle_runner.controller.transfers import fetch_outputs
from kaggle_runner.kaggle_api import KaggleApiError, KaggleGateway
from kaggle_runner.states import Phase, RunState
from kaggle_runner.store import Run, Segment


def quota_left_hours(gateway: KaggleGateway, note: Callable[[str], None]) -> float | None:
    """GPU hours left this week; None when Kaggle does not say (a failed read warns and goes on)."""
    try:
        quota = gateway.quota()
    except KaggleApiError as exc:
        note(f"warning: could not read the GPU quota ({exc}); going on without it")
        return None
    if quota["used_seconds"] is None or quota["total_seconds"] is None:
        return None
    return (quota["total_seconds"] - quota["used_seconds"]) / 3600


def counted(segments: list[Segment]) -> list[Segment]:
    """Segments that count towards max_segments and progress: not the quick re-pushes of a resume not found."""
    return [s for s in segments if (s.run_state or {}).get("reason") != chain.RESUME_MISSING]


def conclude_segment(ctx: ChainContext, run: Run, segment: Segment) -> Wait | None:
    config = config_of(run)
    earlier = counted(ctx.store.segments(run.name)[:-1])
    manifest = artifacts.read_manifest(ctx.segment_dir(segment.idx))
    outcome = chain.SegmentOutcome(segment.kaggle_status or "ERROR", segment.failure_message, segment.run_state,
                                   has_checkpoint=bool(artifacts.checkpoints_newest_first(manifest)))
    quota_left = quota_left_hours(ctx.gateway, ctx.console.note) if config.min_quota_hours > 0 else None
    decision = chain.decide(outcome, [s.global_step or 0 for s in earlier], len(earlier) + 1, run.max_segments,
                            config.max_stalled_segments, quota_left, config.min_quota_hours, run.name,
                            segment.resume_retries, config.max_resume_retries)
    if decision.action == "resume":
        if run.resume_via == "outputs":
            ctx.store.transition(run.name, segment.idx, Phase.ENDED, Phase.OUTPUTS_SETTLING)
        else:
            ctx.store.transition(run.name, segment.idx, Phase.ENDED, Phase.ENDED_RESUME, handoff_segment=segment.idx)
        ctx.store.set_state(run.name, RunState.RESUMING, decision.reason)
        ctx.console.say(f"Resuming: {decision.reason}")
        return None
    if decision.action == "repush":
        source = _source_segment(ctx, run, segment)
        if segment.resume_via == "outputs" and source is not None \
                and chain.retry_route(segment.resume_via, segment.resume_retries + 1) == "dataset":
            # The checkpoint is in the source kernel's newest outputs, which Kaggle did not attach twice: this
            # once, it goes through this machine and the checkpoint dataset.
            ctx.console.note(f"note: {decision.reason}, {chain.OUTPUTS_TRIES} times; this resume goes through the "
                             f"checkpoint dataset {run.checkpoint_dataset_ref} instead")
            ctx.store.transition(run.name, segment.idx, Phase.ENDED, Phase.ENDED_RESUME, handoff_segment=source.idx)
            ctx.store.set_state(run.name, RunState.RESUMING, decision.reason)
            return None
        ctx.store.transition(run.name, segment.idx, Phase.ENDED, Phase.REPUSH)
        ctx.console.note(f"note: {decision.reason}; waiting, then pushing again "
                         f"({segment.resume_retries + 1} of {config.max_resume_retries})")
        return None
    if decision.action == "complete":
        target = fetch_outputs(ctx, run, segment, Path("outputs") / run.name)
        ctx.console.say(f"Training complete. Outputs in {target}")
        ctx.store.end_run(run.name, segment.idx, Phase.ENDED, RunState.COMPLETE, decision.reason)
        ctx.notify("completed", RunState.COMPLETE, decision.reason, segment.idx)
        return None
    end_run(ctx, run, segment, Phase.ENDED, decision.final_state or RunState.FAILED, decision.reason)
    return None


def repush_segment(ctx: ChainContext, run: Run, segment: Segment) -> Wait | None:
    """The kernel did not find its checkpoint (Kaggle attached an older version): wait longer, push again."""
    if segment.next_try_at is None:
        settle = max(settle_seconds(ctx, run), ctx.pace.repush_wait) * 2 ** segment.resume_retries
        segment.next_try_at = time.time() + settle
        ctx.store.update_segment(run.name, segment.idx, next_try_at=segment.next_try_at)
        ctx.console.say(f"Pushing the same resume again in {settle:.0f}s")
    if time.time() < segment.next_try_at:
        return Wait("waiting before pushing the same resume again", until=segment.next_try_at)
    ctx.store.advance_segment(run.name, segment.idx, Phase.REPUSH, same_resume(segment, segment.resume_retries + 1))
    return None


def same_resume(segment: Segment, retries: int) -> Segment:
    """The next segment, pushing again exactly what `segment` was handed, on the same kernel."""
    return Segment(run=segment.run, idx=segment.idx + 1, phase=Phase.PUSHING, kernel_ref=segment.kernel_ref,
                   resume_from=segment.resume_from, resume_sha256=segment.resume_sha256,
                   resume_step=segment.resume_step, best_sha256=segment.best_sha256, resume_retries=retries,
                   resume_via=segment.resume_via, resume_source_ref=segment.resume_source_ref,
                   resume_source_version=segment.resume_source_version)


def _source_segment(ctx: ChainContext, run: Run, segment: Segment) -> Segment | None:
    """The segment whose version's outputs hold the checkpoint `segment` was told to resume from."""
    return next((s for s in ctx.store.segments(run.name) if s.kernel_ref == segment.resume_source_ref
                 and s.kernel_version == segment.resume_source_version), None)


# The longest settle a --local run waits: the background emulator's windows are 2 s (Realism defaults).
LOCAL_SETTLE_SECONDS = 5.0


def settle_seconds(ctx: ChainContext, run: Run) -> float:
    """The configured settle time, or longer if `doctor` measured a longer pin delay on this account."""
    settle = float(config_of(run).dataset_settle_seconds)
    if run.local:  # the local emulator mounts a new version 2 s after it is made (its pin_window)
        return min(settle, LOCAL_SETTLE_SECONDS)
    measured = artifacts.read_json_file(ctx.store.workspace / "doctor.json")
    if isinstance(measured, dict) and isinstance(measured.get("pin_delay_seconds"), int | float):
        settle = max(settle, float(measured["pin_delay_seconds"]))
    return settle
