"""The one way to wait: a backoff schedule, a sleep that notices a cancel, and a poll built on the two.

Every loop that waits for Kaggle uses these: the chain's driver between looks at a phase, `doctor` while its
probes run, `launch` while a corpus upload processes, the gateway before it pushes again. A sleep is cut into
steps of at most a second and asks `stop` before each, so a cancel from another process ends any wait promptly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
STEP = 1.0  # the longest a wait goes without asking whether to stop


class WaitTimedOut(Exception):
    """`poll` looked until its timeout without an answer."""

    def __init__(self, elapsed: float):
        super().__init__(f"no answer after {elapsed:.0f}s")
        self.elapsed = elapsed


class Backoff:
    """Intervals that grow by `factor` from `first` up to `cap`; `reset` starts over."""

    def __init__(self, first: float, cap: float, factor: float = 1.5):
        self.first, self.cap, self.factor = first, max(first, cap), factor
        self.current = first

    def next(self) -> float:
        interval = self.current
        self.current = min(self.cap, self.current * self.factor)
        return interval

    def reset(self) -> None:
        self.current = self.first


def never() -> bool:
    return False


def sleep(seconds: float, stop: Callable[[], bool] = never) -> bool:
    """Sleep `seconds`; False as soon as `stop()` says so (asked first, then at least once a second)."""
    deadline = time.monotonic() + max(0.0, seconds)
    while True:
        if stop():
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(STEP, left))


def poll(look: Callable[[], T | None], first: float, cap: float, timeout: float | None = None,
         stop: Callable[[], bool] = never, factor: float = 1.5) -> T | None:
    """Call `look` until it returns something other than None, with a Backoff between calls.

    None when `stop()` said to stop; WaitTimedOut once `timeout` seconds passed without an answer (`look` is
    always called at least once, and once more at the deadline).
    """
    started = time.monotonic()
    backoff = Backoff(first, cap, factor)
    while True:
        found = look()
        if found is not None:
            return found
        elapsed = time.monotonic() - started
        if timeout is not None and elapsed >= timeout:
            raise WaitTimedOut(elapsed)
        interval = backoff.next()
        if timeout is not None:
            interval = min(interval, timeout - elapsed)
        if not sleep(interval, stop):
            return None
