"""The chain's controller: one driver per run moves each segment through its phases.

A run is a sequence of segments, one kernel version each. Each phase is recorded in the store before its
side effect and left by a guarded transition, so a launcher killed at any moment continues with `watch`
without pushing twice, losing a checkpoint, or uploading again what already landed; and a second process
finds the live driver's lease and follows read-only instead of acting. docs/chain.md draws the phases:

    pushing -> running -> ended -> ended_resume -> resume_downloaded -> resume_uploaded -> done
                            |  \\-> repush -> done (the same resume pushed again)
                            \\-> final (complete, failed, stopped)
    resume_uploaded -> resume_downloaded (the version failed processing or never got ready: upload again)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaggle_runner import artifacts, chain, notify
from kaggle_runner.config import RunConfig
from kaggle_runner.display import Console
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.kaggle_api import (
    GpuSessionsBusy,
    KaggleApiError,
    KaggleGateway,
    PushRefused,
    PushResult,
    PushUncertain,
    QuotaExhausted,
    SourcesNotAttached,
)
from kaggle_runner.logfollow import LogFollower, session_id_from
from kaggle_runner.render import render_kernel
from kaggle_runner.states import KaggleStatus, Phase, RunState
from kaggle_runner.store import Driver, Run, Segment, Store, TransitionError

DATASET_READY_TIMEOUT = 1800.0
HEARTBEAT_SECONDS = 10.0
# A checkpoint version that failed processing, or never became ready, is uploaded again this many times at
# most; then the chain stops and says so. Each try costs an upload, never GPU time.
MAX_DATASET_REUPLOADS = 2
# Pushes refused because Kaggle does not see the chain's own dataset yet, pushed again after a wait that
# doubles from the pace's repush_wait (against Kaggle 2+4+8+16 minutes in all).
MAX_ATTACH_RETRIES = 4
# Pushes that failed after they may have landed, each followed by a wait for the version, before giving up.
MAX_UNCERTAIN_PUSHES = 3
# Kaggle's statuses of a dataset version that will never become ready (kagglesdk DatabundleVersionStatus).
DATASET_FAILED_STATUSES = ("failed", "deleted")


class DatasetNotReady(KaggleRunnerError):
    """A dataset version failed processing, or was still not ready at the deadline."""

    def __init__(self, message: str, ref: str, version: int | None, status: str | None, failed: bool):
        super().__init__(message)
        self.ref, self.version, self.status, self.failed = ref, version, status, failed


class DatasetNotVisible(KaggleRunnerError):
    """Pushes kept being refused because Kaggle did not see the chain's own dataset."""


@dataclass(frozen=True)
class Pace:
    """How often to ask Kaggle, and how long to wait for what it is slow to show. One place for all of it."""

    poll: float  # first interval between status polls
    max_poll: float  # backoff cap (against Kaggle: 60 s, about one status request a minute)
    status_visible: float  # how long a pushed version may answer 404 "No runs found" before we give up
    output_wait: float  # how long outputs may take to be listed after the terminal status
    repush_wait: float  # least wait before pushing a resume again that found no checkpoint; doubles each time
    dataset_ready: float = DATASET_READY_TIMEOUT  # how long a new checkpoint version may take to become ready

    @classmethod
    def for_run(cls, run: Run) -> Pace:
        if run.local or run.endpoint:  # an emulator or a hand-picked host: brisk
            return cls(poll=1.0, max_poll=2.0, status_visible=30.0, output_wait=60.0, repush_wait=3.0,
                       dataset_ready=120.0)
        return cls(poll=5.0, max_poll=60.0, status_visible=900.0, output_wait=600.0, repush_wait=120.0,
                   dataset_ready=DATASET_READY_TIMEOUT)


@dataclass
class Context:
    store: Store
    run_name: str
    gateway: KaggleGateway
    console: Console
    pace: Pace
    notify_url: str | None = None  # --notify, over the config's notify_url

    @property
    def run(self) -> Run:
        return self.store.get_run(self.run_name)

    def run_dir(self) -> Path:
        path = self.store.workspace / "runs" / self.run_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def segment_dir(self, idx: int) -> Path:
        path = self.run_dir() / f"segment-{idx}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def notify(self, event: str, state: str, reason: str = "", segment: int | None = None) -> None:
        """POST the event where the user asked (--notify or notify_url); never blocks, never raises."""
        run = self.run
        config = config_of(run)
        url = self.notify_url or config.notify_url
        if url:
            notify.post(url, {"event": event, "run": run.name, "state": str(state), "reason": reason,
                              "segment": segment, "kernel": run.kernel_ref},
                        config.notify_format == "text", self.console.note)

    def cancelled(self) -> bool:
        return self.run.state == RunState.CANCELLED

    def sleep(self, seconds: float) -> bool:
        """Sleep in short steps; False as soon as the run was cancelled by another process."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.cancelled():
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.time())))
        return not self.cancelled()


def config_of(run: Run) -> RunConfig:
    return RunConfig.model_validate_json(run.config_json)


def data_ref(run: Run) -> str:
    """The dataset holding the chain's token arrays, uploaded once so later segments skip tokenizing."""
    return f"{run.username}/{config_of(run).data_dataset_slug}"


# -- test hook -------------------------------------------------------------------------------------------
def kill_point(store: Store, name: str) -> None:
    """KAGGLE_RUNNER_TEST_KILL_AT=a,b: SIGKILL this process once at each named chain transition."""
    wanted = os.environ.get("KAGGLE_RUNNER_TEST_KILL_AT", "").split(",")
    if name not in wanted:
        return
    fired = store.workspace / "kill-points-fired"
    done = fired.read_text().split() if fired.exists() else []
    if name in done:
        return
    with open(fired, "a") as handle:
        handle.write(name + "\n")
    os.kill(os.getpid(), signal.SIGKILL)


# -- one driver per run ------------------------------------------------------------------------------------
class Heartbeat:
    """Renews the run's driver lease in the background while this process drives it."""

    def __init__(self, store: Store, run: str):
        self.store, self.run = store, run
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if not self.store.heartbeat(self.run):
                    self.lost = True
                    return
            except KaggleRunnerError:
                continue  # a busy store: try again at the next beat

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def drive(ctx: Context, detach: bool = False) -> Run:
    """Drive the run to its end, or follow it read-only while another live process drives it."""
    while True:
        holder = ctx.store.acquire_driver(ctx.run_name)
        if holder is None:
            try:
                return _drive_with_lease(ctx, detach)
            finally:
                ctx.store.release_driver(ctx.run_name)
        run = follow_read_only(ctx, holder)
        if run.final:
            return run


def follow_read_only(ctx: Context, holder: Driver) -> Run:
    """Show the run's progress from the store until it ends or its driver goes away."""
    ctx.console.say(f"Run {ctx.run_name} is driven by {holder.describe()}; following it read-only.")
    shown = None
    while True:
        run = ctx.run
        segment = ctx.store.last_segment(run.name)
        now = (segment.idx, segment.phase, segment.global_step)
        if now != shown:
            shown = now
            ctx.console.say(f"  segment {segment.idx}: {segment.phase}"
                            + (f", step {segment.global_step}" if segment.global_step else ""))
        if run.final:
            ctx.console.say(f"Run {run.name} is {run.state}: {run.reason}")
            return run
        if ctx.store.driver(run.name) is None:
            ctx.console.say(f"The driver of run {run.name} stopped; this process takes over.")
            return run
        time.sleep(ctx.pace.poll)


def _drive_with_lease(ctx: Context, detach: bool) -> Run:
    with Heartbeat(ctx.store, ctx.run_name) as heartbeat:
        while True:
            run = ctx.run
            if run.final:
                if run.state == RunState.CANCELLED:  # by `kaggle-runner cancel` in another process
                    ctx.console.say(f"Run {run.name} was cancelled.")
                return run
            if heartbeat.lost:
                raise KaggleRunnerError(f"run {run.name} was taken over by another process while this one stalled")
            segment = ctx.store.last_segment(run.name)
            if segment.phase == Phase.FINAL:  # ended by a launcher of an older version, killed in between
                ctx.store.update_run(run.name, only_if_active=True, state=RunState.STOPPED,
                                     reason=f"the launcher stopped while ending the run; `kaggle-runner resume "
                                            f"{run.name}` continues it")
                continue
            step = PHASES.get(Phase(segment.phase)) if segment.phase in Phase._value2member_map_ else None
            if step is None:
                raise KaggleRunnerError(f"run {run.name} segment {segment.idx} is in phase {segment.phase!r}, which "
                                        "has no next step; `kaggle-runner resume` restarts a stopped chain")
            try:
                step.handler(ctx, run, segment)
            except TransitionError as exc:
                ctx.console.note(f"note: {exc}")
                continue
            if detach and segment.phase == Phase.PUSHING and not ctx.run.final:
                ctx.console.say(f"Detached. Follow it with `kaggle-runner watch {run.name}`.")
                return ctx.run


# -- pushing -----------------------------------------------------------------------------------------------
def still_driving(ctx: Context) -> None:
    """Right before a side effect: renew the lease, and stop if another process took the run over meanwhile
    (this one may have been suspended past the heartbeat's limit)."""
    if not ctx.store.heartbeat(ctx.run_name):
        raise KaggleRunnerError(f"run {ctx.run_name} is now driven by another process; this one stops without "
                                "pushing or uploading")


def chain_checkpoint(run: Run, segment: Segment) -> dict | None:
    """What the kernel must resume from: the exact file, by name and checksum, in the chain's own dataset."""
    if not segment.resume_from:
        return None
    return {"file": Path(segment.resume_from).name, "sha256": segment.resume_sha256,
            "global_step": segment.resume_step, "dataset": run.dataset_ref, "best_sha256": segment.best_sha256}


def push_segment(ctx: Context, run: Run, segment: Segment) -> None:
    ref = run.kernel_ref
    pushed_before = any(s.kernel_version for s in ctx.store.segments(run.name)) or bool(segment.base_version)
    current = ctx.gateway.current_version(ref, pushed_before=pushed_before)
    if segment.base_version is None:
        segment.base_version = current[0] if current else 0
        ctx.store.update_segment(run.name, segment.idx, base_version=segment.base_version)
    elif current and current[0] > segment.base_version:
        # An earlier launcher pushed, then died before recording it: follow that version, don't push again.
        ctx.console.note(f"note: version {current[0]} of {ref} was pushed before an interruption; following it")
        _record_push(ctx, run, segment, PushResult(current[0], current[1], ""))
        return
    elif segment.push_attempted_at is not None:
        landed = _await_earlier_push(ctx, run, segment, pushed_before)
        if ctx.cancelled():
            return
        if landed is not None:
            ctx.console.note(f"note: version {landed.version} of {ref} was pushed before an interruption; "
                             "following it")
            _record_push(ctx, run, segment, landed)
            return
    config = config_of(run)
    if segment.idx > 1:  # later segments resume from the chain's dataset, never from a fixed path
        config = config.model_copy(update={"resume_from_checkpoint": None})
    sources = [run.dataset_ref] if segment.resume_from else []
    if segment.idx > 1 and ctx.gateway.dataset_status(data_ref(run)) == "ready":  # optional: only when mountable
        sources.append(data_ref(run))
    folder = render_kernel(config, ctx.run_dir() / f"kernel-{segment.idx}", run.username, sources,
                           chain_checkpoint=chain_checkpoint(run, segment)).folder
    kill_point(ctx.store, "before_push")
    try:
        result = _push_when_a_gpu_session_is_free(ctx, run, segment, folder, config.session_timeout_seconds,
                                                  pushed_before)
    except DatasetNotVisible as exc:
        ctx.store.update_segment(run.name, segment.idx, push_attempted_at=None)  # refused: nothing landed
        _end_run(ctx, run, segment, Phase.PUSHING, RunState.STOPPED, str(exc))
        return
    except QuotaExhausted as exc:
        ctx.store.update_segment(run.name, segment.idx, push_attempted_at=None)  # refused: nothing landed
        refresh = _quota_refresh(ctx)
        _end_run(ctx, run, segment, Phase.PUSHING, RunState.STOPPED,
                 f"{exc}; nothing runs until the weekly quota resets" + (f" ({refresh} UTC)" if refresh else "")
                 + f", then `kaggle-runner resume {run.name}`")
        return
    except PushRefused as exc:
        ctx.store.update_segment(run.name, segment.idx, push_attempted_at=None)  # refused: nothing landed
        _end_run(ctx, run, segment, Phase.PUSHING, RunState.FAILED, f"{exc}; fix it, then `kaggle-runner resume "
                                                                      f"{run.name}`")
        return
    if result is None:
        return
    kill_point(ctx.store, "after_push")
    _record_push(ctx, run, segment, result)


def _await_earlier_push(ctx: Context, run: Run, segment: Segment, pushed_before: bool) -> PushResult | None:
    """A push was sent before an interruption and Kaggle shows nothing newer: it may still have landed.

    Straight after a push Kaggle can answer 404 (or 403 for a kernel's first version) for a while, so keep
    looking, at the kernel and at the status of the version the push would have made, until the pace's
    status-visible window since that push has passed. Pushing sooner could start a second session.
    """
    ref, expected = run.kernel_ref, (segment.base_version or 0) + 1
    until = (segment.push_attempted_at or 0.0) + ctx.pace.status_visible
    interval, noted = ctx.pace.poll, False
    while True:
        try:
            current = ctx.gateway.current_version(ref, pushed_before=pushed_before)
            if current and current[0] > (segment.base_version or 0):
                return PushResult(current[0], current[1], "")
            if ctx.gateway.status(ref, expected) is not None:
                return PushResult(expected, current[1] if current else 0, "")
        except KaggleApiError:
            pass  # not shown (yet), however Kaggle words it: only the window decides
        if time.time() >= until:
            ctx.console.note(f"note: Kaggle shows no version of {ref} from the push before the interruption; "
                             "pushing now")
            return None
        if not noted:
            ctx.console.note(f"note: a push of {ref} was sent before an interruption and Kaggle does not show it "
                             f"yet; looking for up to {max(0.0, until - time.time()) / 60:.0f} more minute(s) "
                             "before pushing again")
            noted = True
        if not ctx.sleep(min(interval, max(0.0, until - time.time()) + 0.1)):
            return None
        interval = min(ctx.pace.max_poll, interval * 1.5)


def _quota_refresh(ctx: Context) -> str | None:
    try:
        return ctx.gateway.quota()["refresh"]
    except KaggleApiError:
        return None


def _push_when_a_gpu_session_is_free(ctx: Context, run: Run, segment: Segment, folder: Path,
                                     timeout: int, pushed_before: bool) -> PushResult | None:
    """Push; while both GPU sessions are taken (by the user's other notebooks), wait rather than end the chain.
    Likewise, a bounded number of times, while Kaggle refuses the push for not seeing the chain's own dataset.

    None when the run was cancelled while waiting.
    """
    interval, waiting, unseen, uncertain = ctx.pace.poll, False, 0, 0
    while True:
        if ctx.cancelled():  # `cancel` found nothing running: nothing may start now
            return None
        still_driving(ctx)
        # Recorded before the push: a launcher killed from here on must look for the version before pushing.
        segment.push_attempted_at = time.time()
        ctx.store.update_segment(run.name, segment.idx, push_attempted_at=segment.push_attempted_at)
        try:
            return ctx.gateway.push(folder, timeout, segment.base_version)
        except PushUncertain as exc:
            uncertain += 1
            if uncertain > MAX_UNCERTAIN_PUSHES:
                raise KaggleRunnerError(f"{exc}, {uncertain} times; `kaggle-runner watch {run.name}` looks again "
                                        "before pushing") from None
            ctx.console.note(f"note: {exc}; looking for it before pushing again")
            landed = _await_earlier_push(ctx, run, segment, pushed_before)
            if landed is not None or ctx.cancelled():
                return landed
            continue
        except GpuSessionsBusy as exc:
            ctx.store.update_segment(run.name, segment.idx, push_attempted_at=None)  # refused: nothing landed
            if not waiting:
                ctx.console.note(f"note: {exc} Waiting for one of your GPU sessions to end; "
                                 f"`kaggle-runner cancel {run.name}` stops waiting.")
                waiting = True
            wait = interval
            # Every retry is a push: against Kaggle at most one each 5 minutes, never a tight re-push loop.
            interval = min(ctx.pace.max_poll * 5, interval * 1.5)
        except SourcesNotAttached as exc:
            if exc.landed is not None:
                # A version runs without a dataset it asked for. Pushing another would start a second session:
                # follow it (and so `cancel` reaches it). Without the chain's checkpoint the kernel ends
                # `resume_missing` at once and the same resume is pushed again after a longer wait; without
                # the user's data it fails saying so.
                ctx.console.note(f"note: {exc}; following that version")
                return exc.landed
            if not set(exc.sources) <= chain_datasets(run):
                ctx.store.update_segment(run.name, segment.idx, push_attempted_at=None)  # refused: nothing landed
                raise  # a dataset of the user's configuration: only the user can fix it
            ctx.store.update_segment(run.name, segment.idx, push_attempted_at=None)  # refused: nothing landed
            unseen += 1
            if unseen > MAX_ATTACH_RETRIES:
                raise DatasetNotVisible(
                    f"Kaggle refused {unseen} pushes of {run.kernel_ref} because it did not see dataset "
                    f"{', '.join(exc.sources)} ({exc}); check https://www.kaggle.com/datasets/{exc.sources[0]}, "
                    f"then `kaggle-runner resume {run.name}`") from None
            wait = ctx.pace.repush_wait * 2 ** (unseen - 1)
            ctx.console.note(f"note: {exc}; Kaggle does not see it yet, pushing again in {wait:.0f}s "
                             f"({unseen} of {MAX_ATTACH_RETRIES})")
        if not ctx.sleep(wait):
            return None


def chain_datasets(run: Run) -> set[str]:
    """The datasets the chain itself uploads: Kaggle not seeing one yet is worth waiting for."""
    config = config_of(run)
    return {run.dataset_ref, data_ref(run)} | ({f"{run.username}/{config.corpus_dataset_slug}"}
                                               if config.data_dir else set())


def _record_push(ctx: Context, run: Run, segment: Segment, result: PushResult) -> None:
    ctx.store.transition(run.name, segment.idx, Phase.PUSHING, Phase.RUNNING, kernel_version=result.version,
                         kernel_id=result.kernel_id or None, pushed_at=time.time())
    ctx.console.say(f"Segment {segment.idx}: pushed {run.kernel_ref} version {result.version}"
                    + (f", resuming from {Path(segment.resume_from).name}" if segment.resume_from else ""))
    ctx.notify("segment started", RunState.RUNNING, f"version {result.version}", segment.idx)


def _end_run(ctx: Context, run: Run, segment: Segment, expected: Phase, state: RunState, reason: str,
             **values: Any) -> None:
    ctx.store.end_run(run.name, segment.idx, expected, state, reason, **values)
    ctx.console.say(f"The chain {'failed' if state == RunState.FAILED else 'stopped'}: {reason}")
    ctx.notify(str(state), state, reason, segment.idx)


# -- following a running version ------------------------------------------------------------------------
def follow_segment(ctx: Context, run: Run, segment: Segment) -> None:
    config = config_of(run)
    ref, version = run.kernel_ref, segment.kernel_version
    assert version is not None

    def on_event(event: dict) -> None:
        ctx.console.kernel_event(segment.idx, version, event)
        kind = event.get("event")
        if kind == "progress":
            ctx.store.update_segment(run.name, segment.idx, global_step=event.get("global_step"),
                                     total_steps=event.get("total_steps"), epoch=event.get("epoch"),
                                     train_loss=event.get("loss"))
        elif kind == "session" and session_id_from(event.get("container")):
            ctx.store.update_segment(run.name, segment.idx, session_id=session_id_from(event.get("container")))

    follower = LogFollower(ctx.gateway, ref, version, on_event)
    interval, cancel_sent, trouble_noted = ctx.pace.poll, False, False
    running_at = segment.running_at
    unseen_since: float | None = None
    while True:
        if ctx.cancelled():
            return
        try:
            seen = ctx.gateway.status(ref, version)
        except KaggleApiError as exc:
            if not exc.transient:
                raise
            # Rate limits, server errors, dropped connections: never the end of a segment; keep polling.
            if not trouble_noted:
                ctx.console.note(f"note: {exc}; still following version {version}")
                trouble_noted = True
            time.sleep(ctx.pace.max_poll)
            continue
        if seen is None:  # Kaggle does not show the run (yet): "No runs found for this kernel", or a 403
            unseen_since = unseen_since or time.time()
            if running_at is None and time.time() - unseen_since > ctx.pace.status_visible:
                _end_run(ctx, run, segment, Phase.RUNNING, RunState.FAILED,
                         f"Kaggle has not shown a run of {ref} version {version} for "
                         f"{ctx.pace.status_visible / 60:.0f} minutes after the push; look at "
                         f"https://www.kaggle.com/code/{ref}, then `kaggle-runner resume {run.name}`")
                return
            time.sleep(interval)
            continue
        unseen_since = None
        status, message = seen
        if KaggleStatus(status).terminal:
            break
        if status == KaggleStatus.RUNNING:
            if running_at is None:
                running_at = time.time()
                ctx.store.update_segment(run.name, segment.idx, running_at=running_at)
            follower.ensure_running()
        if not cancel_sent and running_at is not None and chain.overran(
                running_at, time.time(), config.session_timeout_seconds, config.segment_grace_seconds):
            ctx.console.note(f"note: version {version} is still {status.lower()} past its session limit; "
                             "cancelling it")
            problem = cancel_version(ctx, run, ctx.store.segments(run.name)[segment.idx - 1])
            if problem:
                ctx.console.note(f"note: Kaggle did not stop it ({problem}); stop it at "
                                 f"https://www.kaggle.com/code/{ref} to save GPU quota")
            cancel_sent = True
        time.sleep(interval)
        interval = min(ctx.pace.max_poll, interval * 1.5)
    follower.join()
    kill_point(ctx.store, "after_end")
    _record_end(ctx, run, segment, status, message)


def small_outputs(ctx: Context, run: Run, segment: Segment, folder: Path) -> int:
    """Download manifest, run_state and history; Kaggle lists outputs only some time after the version ends.

    Lists again with backoff until a whole run_state.json is there (or at least the manifest, for a kernel
    killed before it could write one), or the wait runs out: an empty listing is "not yet", not "nothing".
    """
    deadline = time.time() + ctx.pace.output_wait
    interval, downloaded, torn = ctx.pace.poll, 0, 0
    while True:
        names: set[str] = set()
        try:
            files, _ = ctx.gateway.list_output(run.kernel_ref, segment.kernel_version)
            names = {f.name for f in files}
            small = [n for n in artifacts.SMALL_FILES if n in names]
            if small:
                downloaded += ctx.gateway.download(run.kernel_ref, segment.kernel_version, folder,
                                                   artifacts.exact_pattern(small), force=True)
        except KaggleApiError as exc:
            if not exc.transient:
                raise
        if artifacts.read_run_state(folder) is not None:
            return downloaded
        if (folder / artifacts.MANIFEST).exists() and artifacts.RUN_STATE not in names:
            return downloaded  # listed, but the kernel died before writing run_state.json
        if artifacts.RUN_STATE in names:
            torn += 1
            if torn >= 3:  # listed three times and never whole: a torn file, read as missing
                return downloaded
        if time.time() > deadline:
            return downloaded
        time.sleep(interval)
        interval = min(ctx.pace.max_poll, interval * 2)


def _record_end(ctx: Context, run: Run, segment: Segment, status: str, message: str | None) -> None:
    folder = ctx.segment_dir(segment.idx)
    downloaded = small_outputs(ctx, run, segment, folder)
    run_state = artifacts.read_run_state(folder)
    history = artifacts.read_json_file(folder / "training_history.json")
    val_loss = None
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        val_loss = next((h["val_loss"] for h in reversed(history)  # the last evaluation, not the last log entry
                         if isinstance(h, dict) and isinstance(h.get("val_loss"), int | float)), None)
    resumed = (run_state or {}).get("resumed_from")
    proven = int(bool(segment.resume_sha256) and isinstance(resumed, dict)
                 and resumed.get("sha256") == segment.resume_sha256)

    def number(key: str, fallback):
        value = (run_state or {}).get(key)
        return value if isinstance(value, int) else fallback

    ctx.store.transition(
        run.name, segment.idx, Phase.RUNNING, Phase.ENDED, kaggle_status=status, failure_message=message,
        run_state_json=json.dumps(run_state) if run_state else None,
        global_step=number("global_step", segment.global_step), total_steps=number("total_steps", segment.total_steps),
        epoch=number("epoch", segment.epoch), val_loss=val_loss, resume_proven=proven,
        bytes_downloaded=segment.bytes_downloaded + downloaded, ended_at=time.time())
    detail = ""
    if run_state:
        detail = f" ({run_state.get('reason')}, step {run_state.get('global_step')})"
    elif not (folder / artifacts.MANIFEST).exists():
        detail = " (no outputs listed)"
    ctx.console.say(f"Segment {segment.idx}: version {segment.kernel_version} ended {status}{detail}"
                    + (f": {message}" if message else ""))


# -- deciding -----------------------------------------------------------------------------------------------
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


def _counted(segments: list[Segment]) -> list[Segment]:
    """Segments that count towards max_segments and progress: not the quick re-pushes of a pinned dataset."""
    return [s for s in segments if (s.run_state or {}).get("reason") != chain.RESUME_MISSING]


def conclude_segment(ctx: Context, run: Run, segment: Segment) -> None:
    config = config_of(run)
    counted = _counted(ctx.store.segments(run.name)[:-1])
    manifest = artifacts.read_manifest(ctx.segment_dir(segment.idx))
    outcome = chain.SegmentOutcome(segment.kaggle_status or "ERROR", segment.failure_message, segment.run_state,
                                   has_checkpoint=bool(artifacts.checkpoints_newest_first(manifest)))
    quota_left = quota_left_hours(ctx.gateway, ctx.console.note) if config.min_quota_hours > 0 else None
    decision = chain.decide(outcome, [s.global_step or 0 for s in counted], len(counted) + 1, run.max_segments,
                            config.max_stalled_segments, quota_left, config.min_quota_hours, run.name,
                            segment.resume_retries, config.max_resume_retries)
    if decision.action == "resume":
        ctx.store.transition(run.name, segment.idx, Phase.ENDED, Phase.ENDED_RESUME)
        ctx.store.update_run(run.name, only_if_active=True, state=RunState.RESUMING, reason=decision.reason)
        ctx.console.say(f"Resuming: {decision.reason}")
        return
    if decision.action == "repush":
        ctx.store.transition(run.name, segment.idx, Phase.ENDED, Phase.REPUSH)
        ctx.console.note(f"note: {decision.reason}; waiting, then pushing again "
                         f"({segment.resume_retries + 1} of {config.max_resume_retries})")
        return
    if decision.action == "complete":
        target = fetch_outputs(ctx, run, segment, Path("outputs") / run.name)
        ctx.console.say(f"Training complete. Outputs in {target}")
        ctx.store.end_run(run.name, segment.idx, Phase.ENDED, RunState.COMPLETE, decision.reason)
        ctx.notify("completed", RunState.COMPLETE, decision.reason, segment.idx)
        return
    _end_run(ctx, run, segment, Phase.ENDED, decision.final_state or RunState.FAILED, decision.reason)


def repush_segment(ctx: Context, run: Run, segment: Segment) -> None:
    """The kernel did not find its checkpoint (Kaggle attached an older version): wait longer, push again."""
    settle = max(settle_seconds(ctx, run), ctx.pace.repush_wait) * 2 ** segment.resume_retries
    ctx.console.say(f"Pushing the same resume again in {settle:.0f}s")
    if not ctx.sleep(settle):
        return
    ctx.store.advance_segment(run.name, segment.idx, Phase.REPUSH, Segment(
        run=run.name, idx=segment.idx + 1, phase=Phase.PUSHING, resume_from=segment.resume_from,
        resume_sha256=segment.resume_sha256, resume_step=segment.resume_step, best_sha256=segment.best_sha256,
        resume_retries=segment.resume_retries + 1))


def settle_seconds(ctx: Context, run: Run) -> float:
    """The configured settle time, or longer if `doctor` measured a longer pin delay on this account."""
    settle = float(config_of(run).dataset_settle_seconds)
    measured = artifacts.read_json_file(ctx.store.workspace / "doctor.json")
    if not run.local and isinstance(measured, dict) and isinstance(measured.get("pin_delay_seconds"), int | float):
        settle = max(settle, float(measured["pin_delay_seconds"]))
    return settle


# -- resuming ----------------------------------------------------------------------------------------------
def download_for_resume(ctx: Context, run: Run, segment: Segment) -> None:
    """Only what resuming needs: the newest checkpoint that verifies, and best_model.pt."""
    folder = ctx.segment_dir(segment.idx)
    manifest = artifacts.read_manifest(folder)
    moved = 0
    for rel in artifacts.checkpoints_newest_first(manifest):
        size = manifest["files"][rel]["size"]
        with ctx.console.transfer("downloading", size) as update, \
                _watching_size(folder / rel, lambda done, rel=rel, update=update: update(Path(rel).name, done)):
            moved += ctx.gateway.download(run.kernel_ref, segment.kernel_version, folder,
                                          artifacts.exact_pattern([rel]))
        if artifacts.verified(folder, rel, manifest["files"][rel]):
            break
        ctx.console.note(f"note: {rel} does not match its checksum; trying the previous checkpoint")
        path = artifacts.confined(folder, rel)
        if path is not None:
            path.unlink(missing_ok=True)
    else:
        _end_run(ctx, run, segment, Phase.ENDED_RESUME, RunState.FAILED,
                 f"no checkpoint of the last segment verified; see `kaggle-runner logs {run.name}`")
        return
    kill_point(ctx.store, "mid_download")
    best = manifest["files"].get(artifacts.BEST_MODEL)
    wanted = [artifacts.BEST_MODEL] if best else []
    tokens = artifacts.token_files(manifest)
    if tokens and not _token_dataset_holds(ctx, run, tokens):
        wanted += tokens  # this segment tokenized: its arrays, for the chain's token dataset
    if wanted:
        moved += ctx.gateway.download(run.kernel_ref, segment.kernel_version, folder, artifacts.exact_pattern(wanted))
    info = manifest["files"][rel]
    best_sha = best["sha256"] if best and artifacts.verified(folder, artifacts.BEST_MODEL, best) else None
    ctx.store.transition(run.name, segment.idx, Phase.ENDED_RESUME, Phase.RESUME_DOWNLOADED, resume_from=rel,
                         resume_sha256=info["sha256"], resume_step=info.get("global_step"), best_sha256=best_sha,
                         bytes_downloaded=segment.bytes_downloaded + moved)


def _token_dataset_holds(ctx: Context, run: Run, tokens: list[str]) -> bool | None:
    """Whether the chain's token dataset already has these arrays (by name: the name is their fingerprint);
    None when there is no such dataset yet. True too when Kaggle cannot say: the arrays are an optional
    cache, never worth failing a resume."""
    ref = data_ref(run)
    try:
        if ctx.gateway.dataset_version(ref) is None:
            return None
        held = ctx.gateway.dataset_files(ref)
    except KaggleApiError as exc:
        ctx.console.note(f"note: not caching tokens ({exc})")
        return True
    return held is not None and {Path(rel).name for rel in tokens} <= held


def upload_tokens(ctx: Context, run: Run, segment: Segment) -> int:
    """The token arrays this segment wrote (it tokenized: no attached arrays matched its tokenizer and corpus)
    as the chain's token dataset: created, or a new version when the dataset holds other arrays (an earlier
    chain's, of another corpus). Arrays already there are not uploaded again."""
    source = ctx.segment_dir(segment.idx)
    tokens = [rel for rel in artifacts.token_files(artifacts.read_manifest(source))
              if (path := artifacts.confined(source, rel)) is not None and path.exists()]
    held = _token_dataset_holds(ctx, run, tokens) if tokens else True
    if held:
        return 0
    ref, exists = data_ref(run), held is not None
    folder = ctx.run_dir() / "data-dataset"
    try:
        size = artifacts.build_flat_dataset(source, folder, tokens, ref,
                                            artifacts.dataset_title(config_of(run).slug, "tokens"),
                                            "Token arrays of a kaggle-runner chain, so segments skip tokenizing.")
    except artifacts.ArtifactError as exc:
        ctx.console.note(f"note: not caching tokens ({exc})")
        return 0
    ctx.console.say(f"Uploading the token arrays ({size / 2**20:.1f} MiB) to dataset {ref}"
                    + (" as a new version (it holds other arrays)" if exists else ""))
    try:
        if exists:
            ctx.gateway.create_dataset_version(folder, f"{run.name}: token arrays of its corpus")
        else:
            ctx.gateway.create_dataset(folder)
    except KaggleApiError as exc:
        ctx.console.note(f"note: not caching tokens ({exc})")
        return 0
    return size


def upload_for_resume(ctx: Context, run: Run, segment: Segment) -> None:
    config = config_of(run)
    token_bytes = upload_tokens(ctx, run, segment)
    folder = ctx.run_dir() / "dataset"
    size = artifacts.build_resume_dataset(ctx.segment_dir(segment.idx), folder, segment.resume_from or "",
                                          run.dataset_ref, artifacts.dataset_title(config.dataset_slug))
    current = ctx.gateway.dataset_version(run.dataset_ref)
    if segment.dataset_version_before is None:
        segment.dataset_version_before = current or 0
        ctx.store.update_segment(run.name, segment.idx, dataset_version_before=segment.dataset_version_before)
    elif (current or 0) > segment.dataset_version_before:
        ctx.console.note("note: the checkpoint upload had landed before an interruption; not uploading again")
        ctx.store.transition(run.name, segment.idx, Phase.RESUME_DOWNLOADED, Phase.RESUME_UPLOADED)
        return
    # Older versions go only once this segment proved it resumed from the newest one: until then the older
    # checkpoint may be the only one a session can mount. Nor on a repeated upload: the one before it failed,
    # and this one might too.
    delete_old = bool(segment.resume_proven) and not segment.dataset_reuploads
    ctx.console.say(f"Uploading {Path(segment.resume_from or '').name} and best_model.pt ({size / 2**20:.1f} MiB) "
                    f"to dataset {run.dataset_ref}")
    kill_point(ctx.store, "before_upload")
    still_driving(ctx)
    started = time.time()
    if current is None and segment.dataset_version_before == 0:
        ctx.gateway.create_dataset(folder)
    else:
        try:
            ctx.gateway.create_dataset_version(folder, f"{run.name} segment {segment.idx}: {segment.resume_from}",
                                               delete_old_versions=delete_old)
        except KaggleApiError as exc:
            first_upload = not any(s.dataset_version for s in ctx.store.segments(run.name) if s.idx < segment.idx)
            if not (exc.status == 403 and current == 1 and segment.dataset_reuploads and first_upload):
                raise
            # Kaggle refuses a second version while the first still processes (kagglehub PR #182). That first
            # version holds this very checkpoint: wait for it again, a wait the re-upload count bounds.
            ctx.console.note(f"note: Kaggle refuses a new version of {run.dataset_ref} while its first one is "
                             "still processing; waiting for that one instead")
            ctx.store.transition(run.name, segment.idx, Phase.RESUME_DOWNLOADED, Phase.RESUME_UPLOADED,
                                 dataset_version_before=0)
            return
    took = time.time() - started
    kill_point(ctx.store, "after_upload")
    ctx.console.say(f"Uploaded {size / 2**20:.1f} MiB in {took:.1f}s ({size / 2**20 / max(took, 1e-3):.1f} MiB/s)")
    ctx.store.transition(run.name, segment.idx, Phase.RESUME_DOWNLOADED, Phase.RESUME_UPLOADED,
                         bytes_uploaded=size + token_bytes, upload_seconds=round(took, 3))


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def wait_for_dataset(gateway: KaggleGateway, ref: str, newer_than: int | None, deadline: float,
                     note: Callable[[str], None], then: str, sleep: Callable[[float], bool] = _sleep,
                     first: float = 0.5, cap: float = 30.0) -> bool:
    """Until `ref` shows a version above `newer_than` and says ready (404 meanwhile is "not yet").

    False when the dataset is optional (`newer_than` None) and does not exist, or `sleep` says to stop (a
    cancel). DatasetNotReady, in one line ending with `then` (what the user can do), when that version failed
    processing or is still not ready past `deadline`.
    """
    interval, noted, started = first, False, time.time()
    while True:
        try:
            version = gateway.dataset_version(ref)
            status = gateway.dataset_status(ref) if version else None
        except KaggleApiError as exc:
            if not exc.transient:
                raise
            version, status = None, None
            if not noted:
                note(f"note: {exc}; still waiting for dataset {ref}")
                noted = True
        if newer_than is None and version is None and status is None:
            return False
        newer = bool(version) and version > (newer_than or 0)
        if newer and status == "ready":
            return True
        if newer and status in DATASET_FAILED_STATUSES:
            raise DatasetNotReady(f"dataset {ref} version {version} failed processing on Kaggle (status {status}); "
                                  f"{then}", ref, version, status, failed=True)
        if time.time() > deadline:
            raise DatasetNotReady(f"dataset {ref} is still {status or 'not visible'} (version {version}) after "
                                  f"{_duration(time.time() - started)}; {then}", ref, version, status, failed=False)
        if not sleep(interval):
            return False
        interval = min(cap, interval * 1.5)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds >= 120 else f"{seconds:.0f}s"


def start_next_segment(ctx: Context, run: Run, segment: Segment) -> None:
    """Wait until the new checkpoint version is ready and settled (Kaggle pins versions at push), then open
    the next segment, naming the exact checkpoint it must resume from. A version that failed processing, or
    never became ready, is uploaded again (MAX_DATASET_REUPLOADS times at most)."""
    deadline = time.time() + ctx.pace.dataset_ready
    waiting = {"deadline": deadline, "note": ctx.console.note, "sleep": ctx.sleep, "first": ctx.pace.poll / 2,
               "cap": ctx.pace.max_poll}
    try:
        ready = wait_for_dataset(ctx.gateway, run.dataset_ref, segment.dataset_version_before or 0,
                                 then="uploading it again", **waiting)
    except DatasetNotReady as exc:
        _upload_again(ctx, run, segment, exc)
        return
    if not ready:
        return
    try:
        wait_for_dataset(ctx.gateway, data_ref(run), None, then="segments tokenize on their own", **waiting)
    except DatasetNotReady as exc:  # optional: the kernel tokenizes when it finds no verified arrays
        ctx.console.note(f"note: {exc}")
    if segment.dataset_version is None:
        settle = settle_seconds(ctx, run)
        # The end of the settle is recorded before sleeping: a launcher killed meanwhile sleeps only the rest.
        ctx.store.update_segment(run.name, segment.idx, dataset_version=ctx.gateway.dataset_version(run.dataset_ref),
                                 settle_until=time.time() + settle)
        if settle:
            ctx.console.say(f"Dataset ready; letting it settle {settle:.0f}s before pushing (Kaggle attaches the "
                            "version that is mountable at push time)")
        kill_point(ctx.store, "mid_settle")
        remaining = settle
    elif segment.settle_until is None:  # recorded by a launcher older than settle_until: settle in full
        remaining = settle_seconds(ctx, run)
    else:
        remaining = segment.settle_until - time.time()
        if remaining > 0:
            ctx.console.say(f"Dataset ready; letting it settle {remaining:.0f}s more (the settle was interrupted)")
    if remaining > 0 and not ctx.sleep(remaining):
        return
    ctx.store.advance_segment(run.name, segment.idx, Phase.RESUME_UPLOADED, Segment(
        run=run.name, idx=segment.idx + 1, phase=Phase.PUSHING, resume_from=segment.resume_from,
        resume_sha256=segment.resume_sha256, resume_step=segment.resume_step, best_sha256=segment.best_sha256))
    ctx.store.update_run(run.name, only_if_active=True, state=RunState.RUNNING, reason="")


def _upload_again(ctx: Context, run: Run, segment: Segment, problem: DatasetNotReady) -> None:
    """Back to `resume_downloaded` to upload the checkpoint as a newer version, or stop once that was tried
    MAX_DATASET_REUPLOADS times. Either way the next wait is for a version above the one that let us down."""
    seen = max(problem.version or 0, segment.dataset_version_before or 0)
    what = "failed processing" if problem.failed else f"was still {problem.status or 'not visible'}"
    if segment.dataset_reuploads >= MAX_DATASET_REUPLOADS:
        # `resume` downloads and uploads afresh: forget this resume's upload bookkeeping, with the stop itself.
        _end_run(ctx, run, segment, Phase.RESUME_UPLOADED, RunState.STOPPED,
                 f"the checkpoint dataset {run.dataset_ref} did not become ready after "
                 f"{segment.dataset_reuploads + 1} tries (version {problem.version} {what}); look at "
                 f"https://www.kaggle.com/datasets/{run.dataset_ref}, then `kaggle-runner resume {run.name}` "
                 "uploads it again", dataset_version_before=None, dataset_version=None, settle_until=None,
                 dataset_reuploads=0)
        return
    ctx.console.note(f"note: checkpoint dataset {run.dataset_ref} version {problem.version} {what}; uploading it "
                     f"again ({segment.dataset_reuploads + 1} of {MAX_DATASET_REUPLOADS})")
    ctx.store.transition(run.name, segment.idx, Phase.RESUME_UPLOADED, Phase.RESUME_DOWNLOADED,
                         dataset_version_before=seen, dataset_version=None, settle_until=None,
                         dataset_reuploads=segment.dataset_reuploads + 1)


# -- outputs and cancel, shared with the user commands --------------------------------------------------
def fetch_outputs(ctx: Context, run: Run, segment: Segment, target: Path) -> Path:
    """All outputs of a version into `target`, verified against the manifest; resumable and idempotent.

    Files land in a staging folder beside `target` and move in only once verified: an unverified or
    tampered file never sits in the user's output folder. Files the manifest does not list are skipped.
    """
    try:
        return _fetch_outputs(ctx, run, segment, target)
    except OSError as exc:  # a full or read-only disk, a file where a folder must go: one line, not a traceback
        where = exc.filename or target
        raise KaggleRunnerError(f"cannot write the outputs of {run.name} to {target}: {exc.strerror} ({where}); "
                                f"free space or choose another folder with `kaggle-runner fetch {run.name} -o DIR`"
                                ) from None


def _fetch_outputs(ctx: Context, run: Run, segment: Segment, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.staging"
    staging.mkdir(parents=True, exist_ok=True)
    files, _ = ctx.gateway.list_output(run.kernel_ref, segment.kernel_version)
    ctx.gateway.download(run.kernel_ref, segment.kernel_version, staging,
                         artifacts.exact_pattern([artifacts.MANIFEST]), force=True)
    manifest = artifacts.read_manifest(staging)
    listed = {f.name for f in files}
    wanted, skipped = [], []
    for rel, info in manifest["files"].items():
        if info.get("kind") == "token_cache":  # the chain's, not a training output
            continue
        (wanted if rel in listed else skipped).append(rel)
    unlisted = sorted(n for n in listed - set(manifest["files"]) - {artifacts.MANIFEST, artifacts.RUN_STATE}
                      if not n.startswith("token_cache/") and not n.endswith(".log"))
    if unlisted:
        ctx.console.note(f"note: skipped {len(unlisted)} output file(s) the kernel's manifest does not list "
                         f"(e.g. {unlisted[0]!r})")
    total = sum(manifest["files"][rel]["size"] for rel in wanted)
    done = 0
    with ctx.console.transfer("fetching", total) as update:
        for rel in wanted:
            info = manifest["files"][rel]
            final = artifacts.confined(target, rel)
            if final is None:
                continue
            if artifacts.verified(target, rel, info):
                done += info["size"]
                update(rel, done)
                continue
            with _watching_size(staging / rel, lambda size, rel=rel, base=done: update(rel, base + size)):
                ctx.gateway.download(run.kernel_ref, segment.kernel_version, staging,
                                     artifacts.exact_pattern([rel]), force=True)
            done += info["size"]
            update(rel, done)
            if not artifacts.verified(staging, rel, info):
                (staging / rel).unlink(missing_ok=True)
                raise KaggleRunnerError(f"{rel} does not match the kernel's checksum after downloading; "
                                        f"run `kaggle-runner fetch {run.name}` again")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, final)
    os.replace(staging / artifacts.MANIFEST, target / artifacts.MANIFEST)
    for log in staging.glob("*.log"):
        os.replace(log, target / log.name)
    shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def _watching_size(path: Path, report: Callable[[int], None]):
    """Report a file's size as it grows while the client downloads it (the client itself runs quiet)."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.25):
            with suppress(OSError):
                report(path.stat().st_size)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)


def cancel_version(ctx: Context, run: Run, segment: Segment) -> str | None:
    """Ask Kaggle to stop the segment's session; the problem, if it did not."""
    if not segment.session_id:
        return "the kernel has not reported its session id yet"
    try:
        return ctx.gateway.cancel(int(segment.session_id))
    except KaggleApiError as exc:
        return str(exc)


@dataclass(frozen=True)
class Step:
    handler: Callable[[Context, Run, Segment], None]
    next_action: str  # what `status` says happens next


PHASES: dict[Phase, Step] = {
    Phase.PUSHING: Step(push_segment, "push the next kernel version"),
    Phase.RUNNING: Step(follow_segment, "wait for the kernel version to end"),
    Phase.ENDED: Step(conclude_segment, "decide whether to resume"),
    Phase.ENDED_RESUME: Step(download_for_resume, "download the newest checkpoint"),
    Phase.RESUME_DOWNLOADED: Step(upload_for_resume, "upload it as a dataset version"),
    Phase.RESUME_UPLOADED: Step(start_next_segment, "wait for the dataset to be ready and settled, then push"),
    Phase.REPUSH: Step(repush_segment, "wait, then push the same resume again"),
}
