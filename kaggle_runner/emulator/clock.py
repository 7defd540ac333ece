"""The emulator's one clock: every realism window, the runner's session limits and upload lags, the rate limit and
signed URLs read it. `SystemClock` is the wall clock (plus any offset a test added); `ManualClock` stands still
until a test advances it, so a test decides when a window has passed instead of sleeping and hoping.

`clock()` is the time now; `wait_until(moment, stop)` blocks until the clock reaches `moment` (or `stop()` says
to stop: checked every `step` seconds of real time); `advance(seconds)` moves the clock on and wakes waiters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def _never() -> bool:
    return False


class SystemClock:
    """Wall-clock time, moved ahead by `advance` (POST /admin/clock): time jumps, it never goes back."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._changed = threading.Condition()

    def __call__(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> float:
        with self._changed:
            self._offset += max(0.0, seconds)
            self._changed.notify_all()
        return self()

    def wait_until(self, moment: float, stop: Callable[[], bool] = _never, step: float = 0.05) -> bool:
        with self._changed:
            while self() < moment:
                if stop():
                    return False
                self._changed.wait(timeout=min(step, max(0.0, moment - self())))
        return True


class ManualClock(SystemClock):
    """Time that moves only when a test says so; it starts at the wall clock's now."""

    def __init__(self, start: float | None = None) -> None:
        super().__init__()
        self._now = time.time() if start is None else start

    def __call__(self) -> float:
        return self._now + self._offset

    def wait_until(self, moment: float, stop: Callable[[], bool] = _never, step: float = 0.05) -> bool:
        with self._changed:
            while self() < moment:
                if stop():
                    return False
                self._changed.wait(timeout=step)
        return True
