"""The outputs route: phase `outputs_settling`. The next segment reads this one's outputs on Kaggle.

Segments alternate between two kernels, `<slug>` and `<slug>-b`: each pushes with the other's outputs attached
(`kernel_sources`), so the version it reads is that kernel's newest, and a push that finds its checkpoint not
attached yet (Kaggle attaches a version's outputs some time after it ends) is pushed again on the same kernel
without the source moving on. The launcher reads only the small files it needs to decide (manifest,
run_state.json, history); the checkpoint, best_model.pt and token arrays never leave Kaggle. Older versions'
outputs are never relied on (they may be unreachable, kaggle-cli #525): only the source kernel's newest.
"""

from __future__ import annotations

import time

from kaggle_runner import artifacts
from kaggle_runner.controller.concluding import LOCAL_SETTLE_SECONDS
from kaggle_runner.controller.context import ChainContext, Wait, config_of
from kaggle_runner.states import Phase, RunState
from kaggle_runner.store import Run, Segment


def other_kernel(run: Run, kernel_ref: str) -> str:
    """The kernel the next segment runs on: the other of the run's two."""
    if not run.alternate_kernel_ref:
        return run.kernel_ref
    return run.alternate_kernel_ref if kernel_ref == run.kernel_ref else run.kernel_ref


def outputs_settle_seconds(ctx: ChainContext, run: Run) -> float:
    """The configured wait after a version ends, or longer if `doctor` measured a longer one on this account."""
    settle = float(config_of(run).outputs_settle_seconds)
    if run.local:  # the local emulator attaches a version's outputs 2 s after it ends (kernel_source_window)
        return min(settle, LOCAL_SETTLE_SECONDS)
    measured = artifacts.read_json_file(ctx.store.workspace / "doctor.json")
    delay = measured.get("outputs_attach_delay_seconds") if isinstance(measured, dict) else None
    if isinstance(delay, int | float) and not isinstance(delay, bool):
        settle = max(settle, float(delay))
    return settle


def open_next_via_outputs(ctx: ChainContext, run: Run, segment: Segment) -> Wait | None:
    """Once the ended version's outputs have had time to become attachable (counted from its end), open the next
    segment on the other kernel, naming the checkpoint it must resume from by its path in those outputs."""
    now = time.time()
    if segment.next_try_at is None:
        segment.next_try_at = (segment.ended_at or now) + outputs_settle_seconds(ctx, run)
        ctx.store.update_segment(run.name, segment.idx, next_try_at=segment.next_try_at)
        if segment.next_try_at > now:
            ctx.console.say(f"Letting the outputs of version {segment.kernel_version} settle "
                            f"{segment.next_try_at - now:.0f}s before pushing (Kaggle attaches a version's outputs "
                            "some time after it ends)")
    if now < segment.next_try_at:
        return Wait(f"letting the outputs of {segment.kernel_ref} version {segment.kernel_version} settle",
                    until=segment.next_try_at)
    manifest = artifacts.read_manifest(ctx.segment_dir(segment.idx))
    newest = artifacts.checkpoints_newest_first(manifest)[0]
    info = manifest["files"][newest]
    best = manifest["files"].get(artifacts.BEST_MODEL)
    ctx.store.advance_segment(run.name, segment.idx, Phase.OUTPUTS_SETTLING, Segment(
        run=run.name, idx=segment.idx + 1, phase=Phase.PUSHING, kernel_ref=other_kernel(run, segment.kernel_ref),
        resume_from=newest, resume_sha256=info["sha256"], resume_step=info.get("global_step"),
        best_sha256=best["sha256"] if best else None, resume_via="outputs", resume_source_ref=segment.kernel_ref,
        resume_source_version=segment.kernel_version))
    ctx.store.set_state(run.name, RunState.RUNNING, "")
    return None
