"""Phase `pushing`: render the segment's kernel and push it, exactly once.

Before a push, the kernel's current version is recorded (`base_version`) and so is the moment the push is sent
(`push_attempted_at`): a version newer than the base is followed, never pushed again, and a push that may have
landed unseen is looked for until Kaggle's status-visible window has passed. Refusals have their policies
here: both GPU sessions busy (wait, with backoff), the chain's own dataset not seen yet (a bounded number of
pushes, each after a longer wait), the weekly quota (stop), anything else (fail). Nothing here sleeps: each
wait is a `Wait` with its moment recorded first.
"""

from __future__ import annotations

import time
from pathlib import Path

from kaggle_runner.controller.context import (
    ChainContext,
    Wait,
    chain_datasets,
    config_of,
    end_run,
    kill_point,
    still_driving,
    token_dataset_ref,
)
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.job_files import load_snapshot
from kaggle_runner.kaggle_api import (
    GpuSessionsBusy,
    KaggleApiError,
    PushRefused,
    PushResult,
    PushUncertain,
    QuotaExhausted,
    QuotaProjected,
    SourcesNotAttached,
)
from kaggle_runner.render import render_kernel
from kaggle_runner.states import Phase, RunState
from kaggle_runner.store import Run, Segment

# Pushes refused because Kaggle does not see the chain's own dataset yet, pushed again after a wait that
# doubles from the pace's repush_wait (against Kaggle 2+4+8+16 minutes in all).
MAX_ATTACH_RETRIES = 4
# Pushes that failed after they may have landed, each followed by a look for the version, before giving up.
MAX_UNCERTAIN_PUSHES = 3


def push_segment(ctx: ChainContext, run: Run, segment: Segment) -> Wait | None:
    ref = segment.kernel_ref
    pushed_before = any(s.kernel_version for s in ctx.store.segments(run.name) if s.kernel_ref == ref) \
        or bool(segment.base_version)
    current = ctx.gateway.current_version(ref, pushed_before=pushed_before)
    if segment.base_version is None:
        segment.base_version = current[0] if current else 0
        ctx.store.update_segment(run.name, segment.idx, base_version=segment.base_version)
    elif current and current[0] > segment.base_version:
        # An earlier launcher pushed, then died before recording it (or the push failed after it landed): follow
        # that version, don't push again.
        if not segment.uncertain_pushes:
            ctx.console.note(f"note: version {current[0]} of {ref} was pushed before an interruption; following it")
        _record_push(ctx, run, segment, PushResult(current[0], current[1], ""))
        return None
    elif segment.push_attempted_at is not None:
        landed = _look_for_earlier_push(ctx, segment, pushed_before)
        if landed is not None:
            if not segment.uncertain_pushes:
                ctx.console.note(f"note: version {landed.version} of {ref} was pushed before an interruption; "
                                 "following it")
            _record_push(ctx, run, segment, landed)
            return None
        until = segment.push_attempted_at + ctx.pace.status_visible
        if time.time() < until:
            if not segment.uncertain_pushes:
                ctx.note_once(f"look-{segment.idx}-{segment.push_attempted_at}",
                              f"note: a push of {ref} was sent before an interruption and Kaggle does not show it "
                              f"yet; looking for up to {max(0.0, until - time.time()) / 60:.0f} more minute(s) "
                              "before pushing again")
            return Wait(f"looking for the version of {ref} an earlier push may have made")
        ctx.console.note(f"note: Kaggle shows no version of {ref} from the push before the interruption; "
                         "pushing now")
    if segment.next_try_at is not None and time.time() < segment.next_try_at:
        return Wait(segment.wait_reason or "waiting to push again", until=segment.next_try_at)
    if ctx.cancelled():  # `cancel` found nothing running: nothing may start now
        return None
    return _push(ctx, run, segment, pushed_before)


def _push(ctx: ChainContext, run: Run, segment: Segment, pushed_before: bool) -> Wait | None:
    config = config_of(run)
    if segment.idx > 1:  # later segments resume from the chain's checkpoint, never from a fixed path
        config = config.model_copy(update={"resume_from_checkpoint": None})
    via_outputs = segment.resume_via == "outputs" and bool(segment.resume_from)
    datasets = [run.checkpoint_dataset_ref] if segment.resume_from and not via_outputs else []
    kernels = [segment.resume_source_ref] if via_outputs and segment.resume_source_ref else []
    if segment.idx > 1 and not via_outputs and ctx.gateway.dataset_status(token_dataset_ref(run)) == "ready":
        datasets.append(token_dataset_ref(run))  # the token dataset, only when mountable
    job_files = load_snapshot(ctx.run_dir()) if config.is_job else None
    folder = render_kernel(config, ctx.run_dir() / f"kernel-{segment.idx}", run.username, datasets,
                           chain_checkpoint=chain_checkpoint(run, segment), kernel_sources=kernels,
                           alternate=segment.kernel_ref == run.alternate_kernel_ref, job_files=job_files,
                           segment=segment.idx).folder
    kill_point(ctx.store, "before_push")
    still_driving(ctx)
    # Recorded before the push: a launcher killed from here on must look for the version before pushing.
    segment.push_attempted_at = time.time()
    ctx.store.update_segment(run.name, segment.idx, push_attempted_at=segment.push_attempted_at)
    try:
        result = ctx.gateway.push(folder, config.session_timeout_seconds, segment.base_version)
    except PushUncertain as exc:
        tries = segment.uncertain_pushes + 1
        if tries > MAX_UNCERTAIN_PUSHES:
            raise KaggleRunnerError(f"{exc}, {tries} times; `kaggle-runner watch {run.name}` looks again "
                                    "before pushing") from None
        ctx.store.update_segment(run.name, segment.idx, uncertain_pushes=tries)
        ctx.console.note(f"note: {exc}; looking for it before pushing again")
        return Wait(f"looking for the version of {segment.kernel_ref} the failed push may have made")
    except (GpuSessionsBusy, QuotaProjected) as exc:
        return _wait_for_a_free_session(ctx, run, segment, exc)
    except SourcesNotAttached as exc:
        if exc.landed is not None:
            # A version runs without a dataset it asked for. Pushing another would start a second session:
            # follow it (and so `cancel` reaches it). Without the chain's checkpoint the kernel ends
            # `resume_missing` at once and the same resume is pushed again after a longer wait; without
            # the user's data it fails saying so.
            ctx.console.note(f"note: {exc}; following that version")
            result = exc.landed
        else:
            return _refused_for_an_unseen_dataset(ctx, run, segment, exc)
    except QuotaExhausted as exc:
        refresh = _quota_refresh(ctx)
        end_run(ctx, run, segment, Phase.PUSHING, RunState.STOPPED,
                f"{exc}; nothing runs until the weekly quota resets" + (f" ({refresh} UTC)" if refresh else "")
                + f", then `kaggle-runner resume {run.name}`", push_attempted_at=None)
        return None
    except PushRefused as exc:
        end_run(ctx, run, segment, Phase.PUSHING, RunState.FAILED,
                f"{exc}; fix it, then `kaggle-runner resume {run.name}`", push_attempted_at=None)
        return None
    kill_point(ctx.store, "after_push")
    _record_push(ctx, run, segment, result)
    return None


def _wait_for_a_free_session(ctx: ChainContext, run: Run, segment: Segment, exc: PushRefused) -> Wait:
    """Both GPU sessions are taken (the user's other notebooks), or running sessions hold back the rest of the
    week's quota: nothing landed. Push again later, with a backoff that grows to five minutes against Kaggle
    (every retry is a push: never a tight re-push loop)."""
    now = time.time()
    since = segment.waiting_since or now
    ctx.note_once(f"busy-{segment.idx}", f"note: {exc} Waiting for one of your GPU sessions to end; "
                                         f"`kaggle-runner cancel {run.name}` stops waiting.")
    interval = min(ctx.pace.max_poll * 5, max(ctx.pace.poll, (now - since) / 2))
    reason = "both GPU sessions are busy" if isinstance(exc, GpuSessionsBusy) else \
        "running sessions hold back the week's GPU quota"
    ctx.store.update_segment(run.name, segment.idx, push_attempted_at=None, waiting_since=since,
                             next_try_at=now + interval, wait_reason=f"{reason}: pushing again")
    return Wait(f"{reason}: pushing again", until=now + interval)


def _refused_for_an_unseen_dataset(ctx: ChainContext, run: Run, segment: Segment,
                                   exc: SourcesNotAttached) -> Wait | None:
    """Kaggle refused the push naming a dataset it does not see: the chain's own (just uploaded) is worth
    waiting for, a bounded number of times; one of the user's configuration only the user can fix."""
    if not set(exc.sources) <= chain_datasets(run):
        ctx.store.update_segment(run.name, segment.idx, push_attempted_at=None)
        raise exc  # a dataset of the user's configuration
    refusals = segment.push_refusals + 1
    if refusals > MAX_ATTACH_RETRIES:
        end_run(ctx, run, segment, Phase.PUSHING, RunState.STOPPED,
                f"Kaggle refused {refusals} pushes of {segment.kernel_ref} because it did not see dataset "
                f"{', '.join(exc.sources)} ({exc}); check https://www.kaggle.com/datasets/{exc.sources[0]}, "
                f"then `kaggle-runner resume {run.name}`", push_attempted_at=None)
        return None
    wait = ctx.pace.repush_wait * 2 ** (refusals - 1)
    ctx.console.note(f"note: {exc}; Kaggle does not see it yet, pushing again in {wait:.0f}s "
                     f"({refusals} of {MAX_ATTACH_RETRIES})")
    reason = f"Kaggle does not see {', '.join(exc.sources)} yet: pushing again"
    ctx.store.update_segment(run.name, segment.idx, push_attempted_at=None, push_refusals=refusals,
                             next_try_at=time.time() + wait, wait_reason=reason)
    return Wait(reason, until=time.time() + wait)


def _look_for_earlier_push(ctx: ChainContext, segment: Segment, pushed_before: bool) -> PushResult | None:
    """One look for the version a push sent earlier would have made: at the kernel, and at that version's status
    (straight after a push Kaggle can answer 404, or 403 for a kernel's first version, for a while)."""
    ref, expected = segment.kernel_ref, (segment.base_version or 0) + 1
    try:
        current = ctx.gateway.current_version(ref, pushed_before=pushed_before)
        if current and current[0] > (segment.base_version or 0):
            return PushResult(current[0], current[1], "")
        if ctx.gateway.status(ref, expected) is not None:
            return PushResult(expected, current[1] if current else 0, "")
    except KaggleApiError:
        pass  # not shown (yet), however Kaggle words it: only the window decides
    return None


def _quota_refresh(ctx: ChainContext) -> str | None:
    try:
        return ctx.gateway.quota()["refresh"]
    except KaggleApiError:
        return None


def chain_checkpoint(run: Run, segment: Segment) -> dict | None:
    """What the kernel must resume from: the exact file, by name and checksum, in the chain's checkpoint dataset
    (flat names there) or in the source kernel's outputs (its path there)."""
    if not segment.resume_from:
        return None
    where = {"kernel": segment.resume_source_ref} if segment.resume_via == "outputs" else \
        {"dataset": run.checkpoint_dataset_ref}
    return {"file": segment.resume_from if "kernel" in where else Path(segment.resume_from).name,
            "sha256": segment.resume_sha256, "global_step": segment.resume_step, "best_sha256": segment.best_sha256,
            **where}


def _record_push(ctx: ChainContext, run: Run, segment: Segment, result: PushResult) -> None:
    ctx.store.transition(run.name, segment.idx, Phase.PUSHING, Phase.RUNNING, kernel_version=result.version,
                         kernel_id=result.kernel_id or None, pushed_at=time.time())
    ctx.console.say(f"Segment {segment.idx}: pushed {segment.kernel_ref} version {result.version}"
                    + (f", resuming from {Path(segment.resume_from).name}" if segment.resume_from else ""))
    ctx.notify("segment started", RunState.RUNNING, f"version {result.version}", segment.idx)
