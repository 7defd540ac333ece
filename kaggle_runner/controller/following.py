"""Phases `running` and `ending`: follow a pushed version until Kaggle says it ended, then read its small outputs.

`running` asks Kaggle for the version's status once per look: a version Kaggle does not show yet is "not yet"
(for the pace's status-visible window after the push), a status this launcher does not know is "not started
yet", and a version running past its session limit is cancelled. While it runs (and the driver is not making
one `--once` pass), a log follower streams its JSON events into the store and onto the terminal.
`ending` lists the outputs until a whole run_state.json is there (Kaggle lists outputs some time after the
end), downloads the small files (contract.SMALL_FILES) and records what the kernel reported, checked.
"""

from __future__ import annotations

import json
import time

from kaggle_runner import artifacts, chain, contract, untrusted
from kaggle_runner.controller.context import ChainContext, Wait, config_of, end_run, kill_point, look_at
from kaggle_runner.kaggle_api import KaggleApiError
from kaggle_runner.logfollow import LogFollower, events_in, session_id_from, session_in
from kaggle_runner.states import KaggleStatus, Phase, RunState
from kaggle_runner.store import Run, Segment


def follow_segment(ctx: ChainContext, run: Run, segment: Segment) -> Wait | None:
    ref, version = segment.kernel_ref, segment.kernel_version
    assert version is not None
    if ctx.cancelled():
        return None
    try:
        seen = ctx.gateway.status(ref, version)
    except KaggleApiError as exc:
        if not exc.transient:
            raise
        # Rate limits, server errors, dropped connections: never the end of a segment; keep polling.
        ctx.note_once(f"trouble-{segment.idx}", f"note: {exc}; still following version {version}")
        return Wait("Kaggle is not answering")
    now = time.time()
    if seen is None:  # Kaggle does not show the run (yet): "No runs found for this kernel", or a 403
        since = segment.waiting_since
        if since is None:
            since = now
            ctx.store.update_segment(run.name, segment.idx, waiting_since=since)
        if segment.running_at is None and now - since > ctx.pace.status_visible:
            end_run(ctx, run, segment, Phase.RUNNING, RunState.FAILED,
                    f"Kaggle has not shown a run of {ref} version {version} for "
                    f"{ctx.pace.status_visible / 60:.0f} minutes after the push; look at "
                    f"{look_at(run, ref)}, then `kaggle-runner resume {run.name}`")
            return None
        return Wait(f"Kaggle does not show version {version} yet")
    name, message = seen
    status = KaggleStatus.read(name)
    if status is None:
        ctx.note_once(f"status-{name}", f"note: Kaggle reports version {version} as {name!r}, a status kaggle-runner "
                                        "does not know; taking it as not started yet")
        status = KaggleStatus.QUEUED
    if status.terminal:
        follower = ctx.followers.pop((ref, version), None)
        if follower is not None:
            follower.join()
        kill_point(ctx.store, "after_end")
        ctx.store.transition(run.name, segment.idx, Phase.RUNNING, Phase.ENDING, kaggle_status=status.value,
                             failure_message=untrusted.text(message), ended_at=now)
        return None
    running_at = segment.running_at
    if status == KaggleStatus.RUNNING:
        if running_at is None:
            running_at = now
            ctx.store.update_segment(run.name, segment.idx, running_at=running_at, waiting_since=None)
        if not ctx.once:
            _follower(ctx, run, segment).ensure_running()
    config = config_of(run)
    if not segment.overrun_cancelled and running_at is not None and chain.overran(
            running_at, now, config.session_timeout_seconds, config.segment_grace_seconds):
        ctx.console.note(f"note: version {version} is still {status.lower()} past its session limit; cancelling it")
        ctx.store.update_segment(run.name, segment.idx, overrun_cancelled=1)
        problem = cancel_version(ctx, ctx.store.segments(run.name)[segment.idx - 1])
        if problem:
            ctx.console.note(f"note: Kaggle did not stop it ({problem}); stop it at {look_at(run, ref)} to save "
                             "GPU quota")
    return Wait(f"version {version} is {status.lower()}")


def _follower(ctx: ChainContext, run: Run, segment: Segment) -> LogFollower:
    key = (segment.kernel_ref, segment.kernel_version or 0)
    if key not in ctx.followers:
        def on_event(event: dict) -> None:
            ctx.console.kernel_event(segment.idx, segment.kernel_version or 0, event)
            kind = event.get("event")
            if kind == "progress":
                ctx.store.update_segment(run.name, segment.idx, global_step=event.get("global_step"),
                                         total_steps=event.get("total_steps"), epoch=event.get("epoch"),
                                         train_loss=event.get("loss"))
            elif kind == "session" and session_id_from(event.get("container")):
                ctx.store.update_segment(run.name, segment.idx, session_id=session_id_from(event.get("container")))

        ctx.followers[key] = LogFollower(ctx.gateway, segment.kernel_ref, segment.kernel_version or 0, on_event)
    return ctx.followers[key]


def cancel_version(ctx: ChainContext, segment: Segment) -> str | None:
    """Ask Kaggle to stop the segment's session; the problem, if it did not."""
    if not segment.session_id:
        return "the kernel has not reported its session id yet"
    try:
        return ctx.gateway.cancel(int(segment.session_id))
    except KaggleApiError as exc:
        return str(exc)


# -- ending: the small outputs -------------------------------------------------------------------------------
def read_outputs(ctx: ChainContext, run: Run, segment: Segment) -> Wait | None:
    """List the outputs (once per look) until a whole run_state.json is there, or at least the manifest of a
    kernel killed before it wrote one, or the wait runs out: an empty listing is "not yet", not "nothing"."""
    now = time.time()
    since = segment.waiting_since
    if since is None:
        since = now
        ctx.store.update_segment(run.name, segment.idx, waiting_since=since)
    found, moved = look_at_small_outputs(ctx, segment)
    if moved:
        segment.bytes_downloaded += moved
        ctx.store.update_segment(run.name, segment.idx, bytes_downloaded=segment.bytes_downloaded)
    if found == "torn":
        segment.torn_reads += 1
        ctx.store.update_segment(run.name, segment.idx, torn_reads=segment.torn_reads)
    if found in ("whole", "no_run_state") or segment.torn_reads >= 3 or now - since > ctx.pace.output_wait:
        _record_end(ctx, run, segment)
        return None
    return Wait(f"Kaggle has not listed the outputs of version {segment.kernel_version} yet")


def look_at_small_outputs(ctx: ChainContext, segment: Segment) -> tuple[str, int]:
    """One listing: ("whole" | "no_run_state" | "torn" | "none", bytes downloaded). A torn run_state.json (listed
    three times and never whole) reads as missing; so does one that is not a JSON object."""
    folder = ctx.segment_dir(segment.idx)
    names: set[str] = set()
    moved = 0
    try:
        files, _ = ctx.gateway.list_output(segment.kernel_ref, segment.kernel_version or 0)
        names = {f.name for f in files}
        small = [n for n in contract.SMALL_FILES if n in names]
        if small:
            moved = ctx.gateway.download(segment.kernel_ref, segment.kernel_version or 0, folder,
                                         artifacts.exact_pattern(small), force=True)
    except KaggleApiError as exc:
        if not exc.transient:
            raise
    if artifacts.read_run_state(folder) is not None:
        return "whole", moved
    if (folder / contract.MANIFEST).exists() and contract.RUN_STATE not in names:
        return "no_run_state", moved  # listed, but the kernel died before writing run_state.json
    return ("torn" if contract.RUN_STATE in names else "none"), moved


def _progress_from_log(ctx: ChainContext, run: Run, segment: Segment) -> None:
    """A version nobody followed while it ran (a `--once` pass, or one that ended before Kaggle showed it
    RUNNING): its last progress event and its session id, read once from the whole log."""
    if segment.train_loss is not None and segment.session_id:
        return
    try:
        text = ctx.gateway.log(segment.kernel_ref, segment.kernel_version or 0)
    except KaggleApiError:
        return  # the log is a nicety here: run_state.json decides
    events = events_in(text)
    progress = [e for e in events if e["event"] == "progress" and e.get("loss") is not None]
    values: dict = {}
    if progress and segment.train_loss is None:
        values["train_loss"] = progress[-1]["loss"]
    session = session_in(events)
    if session and not segment.session_id:
        values["session_id"] = session
    if values:
        ctx.store.update_segment(run.name, segment.idx, **values)


def _record_end(ctx: ChainContext, run: Run, segment: Segment) -> None:
    _progress_from_log(ctx, run, segment)
    folder = ctx.segment_dir(segment.idx)
    run_state = artifacts.read_run_state(folder)
    history = artifacts.read_json_file(folder / contract.HISTORY)
    val_loss = None
    if isinstance(history, list):  # the last evaluation, not the last log entry
        val_loss = next((untrusted.finite(h.get("val_loss")) for h in reversed(history)
                         if isinstance(h, dict) and untrusted.finite(h.get("val_loss")) is not None), None)
    resumed = (run_state or {}).get("resumed_from")
    proven = int(bool(segment.resume_sha256) and isinstance(resumed, dict)
                 and resumed.get("sha256") == segment.resume_sha256)

    def number(key: str, fallback: int | None) -> int | None:
        value = untrusted.whole((run_state or {}).get(key))
        return value if value is not None else fallback

    ctx.store.transition(
        run.name, segment.idx, Phase.ENDING, Phase.ENDED,
        run_state_json=json.dumps(run_state) if run_state else None,
        global_step=number("global_step", segment.global_step), total_steps=number("total_steps", segment.total_steps),
        epoch=number("epoch", segment.epoch), val_loss=val_loss, resume_proven=proven)
    detail = ""
    if run_state:
        reason = untrusted.text(run_state.get("reason"), 60)
        detail = f" ({reason}, step {number('global_step', None)})"
    elif not (folder / contract.MANIFEST).exists():
        detail = " (no outputs listed)"
    message = segment.failure_message
    ctx.console.say(f"Segment {segment.idx}: version {segment.kernel_version} ended {segment.kaggle_status}{detail}"
                    + (f": {message}" if message else ""))
    change = image_change(ctx.store.segments(run.name)[:segment.idx - 1], run_state)
    if change:
        pinning = config_of(run).docker_image_pinning_type
        why = ("docker_image_pinning_type = \"latest\" takes each new image" if pinning == "latest" else
               "Kaggle updated its image in between, and a kernel keeps only the image of its own first version "
               "(the outputs route's second kernel started later)")
        ctx.console.note(f"note: segment {segment.idx} ran on another image than segment {change[0]} ({change[1]}); "
                         f"{why}")


IMAGE_FACTS = ("python", "torch", "transformers", "build_date")


def _image(run_state: dict | None) -> dict[str, str]:
    image = (run_state or {}).get("image")
    if not isinstance(image, dict):
        return {}
    return {key: value for key in IMAGE_FACTS if (value := untrusted.text(image.get(key), 40))}


def image_change(earlier: list[Segment], run_state: dict | None) -> tuple[int, str] | None:
    """How this segment's image differs from the first earlier segment that reported one: (that segment, what
    changed, as "torch 2.5.1 -> 2.6.0"); None when it is the same, or either side did not say."""
    now = _image(run_state)
    first = next(((s.idx, image) for s in earlier if (image := _image(s.run_state))), None)
    if not now or first is None:
        return None
    changed = [f"{key} {first[1][key]} -> {now[key]}" for key in IMAGE_FACTS
               if key in now and key in first[1] and now[key] != first[1][key]]
    return (first[0], ", ".join(changed)) if changed else None
