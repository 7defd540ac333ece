"""What the user reads about runs, acting on nothing: status (from the store, and Kaggle when nobody drives),
logs, and the GPU quota. Everything a kernel printed is shown without terminal control sequences.
"""

from __future__ import annotations

import time
from pathlib import Path

from kaggle_runner import untrusted
from kaggle_runner.connect import context_for, gateway_for
from kaggle_runner.controller import PHASES
from kaggle_runner.display import Console
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.logfollow import log_text
from kaggle_runner.states import KaggleStatus, Phase
from kaggle_runner.store import Run, Store
from kaggle_runner.workspace import known_workspaces


def print_logs(workspace: str | Path, name: str, follow: bool = False, console: Console | None = None,
               segment: int | None = None, every: bool = False, raw: bool = False,
               endpoint: str | None = None) -> None:
    """The log of the run's latest kernel version, of segment N (`segment`), or of every segment (`every`):
    what the kernel printed, without terminal control sequences (a title, a clipboard write), and without the
    JSON event lines the launcher reads unless `raw`."""
    store = Store(workspace, create=False)
    run = store.get_run(name)
    ctx = context_for(workspace, run, console, endpoint)
    pushed = [s for s in store.segments(name) if s.kernel_version]
    if not pushed:
        raise KaggleRunnerError(f"run {name} has no kernel version yet")
    if segment is not None:
        chosen = [s for s in pushed if s.idx == segment]
        if not chosen:
            raise KaggleRunnerError(f"run {name} has no segment {segment} with a kernel version (segments: "
                                    f"{', '.join(str(s.idx) for s in pushed)})")
    else:
        chosen = pushed if every else pushed[-1:]
    if follow:
        for event in ctx.gateway.log_stream(chosen[-1].kernel_ref, chosen[-1].kernel_version):
            ctx.console.raw(readable(str(event.get("data", "")), raw))
        return
    for part in chosen:
        if len(chosen) > 1:
            ctx.console.raw(f"===== segment {part.idx}, version {part.kernel_version} =====\n")
        ctx.console.raw(readable(log_text(ctx.gateway.log(part.kernel_ref, part.kernel_version)), raw))


def readable(text: str, raw: bool = False) -> str:
    """A kernel's log text as a terminal may show it: control sequences stripped; its JSON event lines too,
    unless `raw`."""
    lines = text.splitlines(keepends=True)
    if not raw:
        lines = [line for line in lines if not line.startswith('{"event"')]
    return untrusted.printable("".join(lines))


def _hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.2f} h"


def quota_summary(workspace: str | Path, local: bool = False, endpoint: str | None = None) -> str:
    gateway = gateway_for(Path(workspace), local, endpoint, Console().note)
    quota = gateway.quota()
    used, total = quota["used_seconds"], quota["total_seconds"]
    left = None if used is None or total is None else max(0.0, total - used)
    # Kaggle measures a new session against used + held back, so "left" is what a push may still start.
    reserved = f" (of which {_hours(quota['reserved_seconds'])} held back by running sessions)" \
        if quota.get("reserved_seconds") else ""
    return (f"GPU quota: {_hours(used)} used{reserved} of {_hours(total)} this week, {_hours(left)} left; "
            f"resets {quota['refresh'] or 'weekly'} (UTC)")


def run_status(workspace: str | Path, name: str | None = None, refresh: bool = False,
               endpoint: str | None = None) -> dict | list[dict]:
    if name is None and not (Path(workspace) / "runs.sqlite").exists():
        return []  # nothing launched here; the CLI says where runs live, and nothing is created
    store = Store(workspace, create=False)
    if name is None:
        return [_describe(store, run) for run in store.list_runs()]
    description = _describe(store, store.get_run(name), detail=True)
    if refresh:
        description.update(_live(workspace, store, store.get_run(name), endpoint))
    return description


def all_status() -> list[dict]:
    """Runs of every workspace this user launched from (`status --all`)."""
    rows = []
    for workspace in known_workspaces():
        try:
            store = Store(workspace, create=False)
        except KaggleRunnerError:
            continue
        rows += [{**_describe(store, run), "workspace": workspace} for run in store.list_runs()]
    return rows


def _live(workspace: str | Path, store: Store, run: Run, endpoint: str | None = None) -> dict:
    """What Kaggle says now about a run nobody drives, so a detached run does not look stuck at step 0."""
    segment = store.last_segment(run.name)
    if run.final or store.driver(run.name) is not None or segment.phase != Phase.RUNNING:
        return {}
    try:
        ctx = context_for(workspace, run, Console(quiet=True), endpoint)
        seen = ctx.gateway.status(segment.kernel_ref, segment.kernel_version)
    except KaggleRunnerError as exc:
        return {"live": f"could not ask Kaggle ({exc})"}
    if seen is None:
        return {"live": "Kaggle does not show the version yet", "kaggle_status": None}
    status, message = seen
    known = KaggleStatus.read(status)
    hint = f"; `kaggle-runner watch {run.name}` drives it on" if known and known.terminal else ""
    return {"kaggle_status": status, "live": f"Kaggle says {status}" + (f": {message}" if message else "") + hint}


def _describe(store: Store, run: Run, detail: bool = False) -> dict:
    segments = store.segments(run.name)
    last = segments[-1] if segments else None
    gpu_seconds = sum(((s.ended_at or time.time()) - (s.running_at or s.pushed_at)) for s in segments
                      if s.pushed_at)
    step = PHASES.get(Phase(last.phase)) if last and last.phase in Phase._value2member_map_ else None
    driver = store.driver(run.name)
    description = {
        "name": run.name, "state": run.state, "reason": run.reason, "kernel": run.kernel_ref,
        "checkpoint_dataset": run.checkpoint_dataset_ref, "local": bool(run.local), "segment": last.idx if last else 0,
        "kernel_version": last.kernel_version if last else None,
        "kaggle_status": last.kaggle_status if last else None,
        "global_step": max((s.global_step or 0 for s in segments), default=0),
        "total_steps": last.total_steps if last else None, "epoch": last.epoch if last else None,
        "train_loss": next((s.train_loss for s in reversed(segments) if s.train_loss is not None), None),
        "val_loss": next((s.val_loss for s in reversed(segments) if s.val_loss is not None), None),
        "checkpoint": next((s.resume_from for s in reversed(segments) if s.resume_from), None),
        "gpu_hours": round(gpu_seconds / 3600, 4),
        "driver": driver.describe() if driver else None,
        "next_action": step.next_action if step and not run.final else "none",
        "resume_via": run.resume_via,
        "segments": [{"index": s.idx, "kernel": s.kernel_ref, "kernel_version": s.kernel_version,
                      "kaggle_status": s.kaggle_status, "waiting_for": s.wait_reason, "resume_via": s.resume_via,
                      "global_step": s.global_step, "phase": s.phase, "resume_from": s.resume_from,
                      "resume_retries": s.resume_retries, "session_id": s.session_id,
                      "bytes_downloaded": s.bytes_downloaded, "bytes_uploaded": s.bytes_uploaded,
                      "upload_seconds": s.upload_seconds, "failure_message": s.failure_message} for s in segments],
    }
    if detail:
        description["events"] = store.events(run.name)[-20:]
    return description
