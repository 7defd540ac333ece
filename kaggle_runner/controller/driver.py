"""The driver: one process per run holds its lease and moves its segments through their phases.

The loop asks the phase's handler (controller/phases.py) to move the segment on; a handler that cannot move
yet returns a `Wait`, and the loop sleeps until the wait's moment or for the next backoff interval, through
waits.sleep, which notices a cancel. With `once` (`watch --once`) the loop returns at the first wait instead:
one pass that moves every phase that can move now, safe to run from cron. A second process that finds a live
driver follows read-only (or, with `once`, skips the run).
"""

from __future__ import annotations

import threading
import time

from kaggle_runner import notify, waits
from kaggle_runner.controller.context import ChainContext, Wait
from kaggle_runner.controller.phases import PHASES
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.states import Phase, RunState
from kaggle_runner.store import Driver, Run, TransitionError

HEARTBEAT_SECONDS = 10.0


class Heartbeat:
    """Renews the run's driver lease in the background while this process drives it."""

    def __init__(self, ctx: ChainContext):
        self.store, self.run = ctx.store, ctx.run_name
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


def drive(ctx: ChainContext, detach: bool = False) -> Run:
    """Drive the run until it ends (or, detached, until its push landed; with ctx.once, until it must wait), or
    follow it read-only while another live process drives it."""
    try:
        while True:
            holder = ctx.store.acquire_driver(ctx.run_name)
            if holder is None:
                try:
                    return _drive_with_lease(ctx, detach)
                finally:
                    ctx.store.release_driver(ctx.run_name)
            if ctx.once:
                ctx.console.say(f"Run {ctx.run_name} is driven by {holder.describe()}; left to it.")
                return ctx.run
            run = follow_read_only(ctx, holder)
            if run.final:
                return run
    finally:
        for follower in ctx.followers.values():
            follower.join(timeout=1)
        notify.wait_for_pending()


def follow_read_only(ctx: ChainContext, holder: Driver) -> Run:
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
        waits.sleep(ctx.pace.poll)


def _drive_with_lease(ctx: ChainContext, detach: bool) -> Run:
    backoff = waits.Backoff(ctx.pace.poll, ctx.pace.max_poll)
    waiting_in: tuple[int, str] | None = None
    with Heartbeat(ctx) as heartbeat:
        while True:
            run = ctx.run
            if run.final:
                if run.state == RunState.CANCELLED:  # by `kaggle-runner cancel` in another process
                    ctx.console.say(f"Run {run.name} was cancelled.")
                return run
            if heartbeat.lost:
                raise KaggleRunnerError(f"run {run.name} was taken over by another process while this one stalled")
            segment = ctx.store.last_segment(run.name)
            step = PHASES.get(Phase(segment.phase)) if segment.phase in Phase._value2member_map_ else None
            if step is None:
                raise KaggleRunnerError(f"run {run.name} segment {segment.idx} is in phase {segment.phase!r}, which "
                                        "has no next step; `kaggle-runner resume` restarts a stopped chain")
            try:
                wait = step.handler(ctx, run, segment)
            except TransitionError as exc:
                ctx.console.note(f"note: {exc}")
                continue
            if wait is None:
                backoff.reset()
                waiting_in = None
                if detach and segment.phase == Phase.PUSHING and not ctx.run.final:
                    ctx.console.say(f"Detached. Follow it with `kaggle-runner watch {run.name}`.")
                    return ctx.run
                continue
            if waiting_in != (segment.idx, segment.phase):
                backoff.reset()
                waiting_in = (segment.idx, segment.phase)
            _record_wait(ctx, segment.idx, segment.wait_reason, wait)
            if ctx.once:
                return ctx.run
            delay = max(0.0, wait.until - time.time()) if wait.until is not None else backoff.next()
            waits.sleep(delay, stop=ctx.cancelled)


def _record_wait(ctx: ChainContext, idx: int, recorded: str | None, wait: Wait) -> None:
    """What the segment waits for, for `status` (written when it changes, not at every look)."""
    if wait.reason != recorded:
        ctx.store.update_segment(ctx.run_name, idx, wait_reason=wait.reason)
