"""What every phase handler works with: the run's context, the chain's pace, and the answer `Wait`.

A handler is `handler(ctx, run, segment) -> Wait | None`. It performs its phase's side effect and moves the
segment on (None), or finds that it cannot move yet and says what it waits for (a `Wait`). Handlers never sleep:
the driver does (controller/driver.py), through the one wait helper, so every wait notices a cancel, and
`watch --once` stops at the first one.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaggle_runner import notify
from kaggle_runner.config import RunConfig
from kaggle_runner.display import Console
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.kaggle_api import KaggleGateway
from kaggle_runner.states import Phase, RunState
from kaggle_runner.store import Run, Segment, Store

DATASET_READY_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Wait:
    """A phase that cannot move yet, and why. `until`: the moment it may (a settle, a repush, a refused push's
    retry), recorded in the store before the handler returns; None: look again after the driver's backoff."""

    reason: str
    until: float | None = None


@dataclass(frozen=True)
class ChainPace:
    """How often to ask Kaggle, and how long to wait for what it is slow to show. One place for all of it."""

    poll: float  # first interval between looks at a waiting phase
    max_poll: float  # backoff cap (against Kaggle: 60 s, about one status request a minute)
    status_visible: float  # how long a pushed version may answer 404 "No runs found" before we give up
    output_wait: float  # how long outputs may take to be listed after the terminal status
    repush_wait: float  # least wait before pushing again a resume that found no checkpoint; doubles each time
    dataset_ready: float = DATASET_READY_TIMEOUT  # how long a new checkpoint version may take to become ready

    @classmethod
    def for_run(cls, run: Run) -> ChainPace:
        if run.local or run.endpoint:  # an emulator or a hand-picked host: brisk
            return cls(poll=1.0, max_poll=2.0, status_visible=30.0, output_wait=60.0, repush_wait=3.0,
                       dataset_ready=120.0)
        return cls(poll=5.0, max_poll=60.0, status_visible=900.0, output_wait=600.0, repush_wait=120.0,
                   dataset_ready=DATASET_READY_TIMEOUT)


@dataclass
class ChainContext:
    """One run as its driver sees it: the store, the gateway to Kaggle, where to say things, and the pace."""

    store: Store
    run_name: str
    gateway: KaggleGateway
    console: Console
    pace: ChainPace
    notify_url: str | None = None  # --notify, over the config's notify_url
    once: bool = False  # `watch --once`: one pass, no log streaming
    followers: dict[tuple[str, int], Any] = field(default_factory=dict)  # log followers of running versions
    _said: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

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

    def first_time(self, key: str) -> bool:
        """True the first time this process asks about `key` (a waiting phase is looked at many times)."""
        with self._lock:
            if key in self._said:
                return False
            self._said.add(key)
            return True

    def note_once(self, key: str, message: str) -> None:
        """A note this process shows once per `key`."""
        if self.first_time(key):
            self.console.note(message)

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


def config_of(run: Run) -> RunConfig:
    return RunConfig.model_validate_json(run.config_json)


def token_dataset_ref(run: Run) -> str:
    """The chain's token dataset: the token arrays, uploaded once so later segments skip tokenizing."""
    return f"{run.username}/{config_of(run).token_dataset_slug}"


def corpus_dataset_ref(run: Run) -> str:
    """The data_dir corpus, uploaded by launch."""
    return f"{run.username}/{config_of(run).corpus_dataset_slug}"


def chain_datasets(run: Run) -> set[str]:
    """The sources the chain itself makes (its datasets, its kernels' outputs): Kaggle not seeing one yet is worth
    waiting for."""
    return {run.checkpoint_dataset_ref, token_dataset_ref(run), run.kernel_ref} | (
        {corpus_dataset_ref(run)} if config_of(run).data_dir else set()) | (
        {run.alternate_kernel_ref} if run.alternate_kernel_ref else set())


def look_at(run: Run, kernel_ref: str) -> str:
    """Where the user can look at (and stop) a kernel by hand: its page on Kaggle, or the emulator serving it."""
    if run.local:
        return "the local emulator (`kaggle-runner emulator stop` stops every version it runs)"
    if run.endpoint:
        return f"{run.endpoint}, which serves it"
    return f"https://www.kaggle.com/code/{kernel_ref}"


def still_driving(ctx: ChainContext) -> None:
    """Right before a side effect: renew the lease, and stop if another process took the run over meanwhile
    (this one may have been suspended past the heartbeat's limit)."""
    if not ctx.store.heartbeat(ctx.run_name):
        raise KaggleRunnerError(f"run {ctx.run_name} is now driven by another process; this one stops without "
                                "pushing or uploading")


def end_run(ctx: ChainContext, run: Run, segment: Segment, expected: Phase, state: RunState, reason: str,
            **values: Any) -> None:
    """The run to a final state (failed or stopped) with this segment, said once and notified."""
    ctx.store.end_run(run.name, segment.idx, expected, state, reason, **values)
    ctx.console.say(f"The chain {'failed' if state == RunState.FAILED else 'stopped'}: {reason}")
    ctx.notify(str(state), state, reason, segment.idx)


def kill_point(store: Store, name: str) -> None:
    """Test hook: KAGGLE_RUNNER_TEST_KILL_AT=a,b SIGKILLs this process once at each named chain transition."""
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
