"""Reads a running kernel version's log in the background and hands each kernel JSON event on once."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable

from kaggle_runner.kaggle_api import KaggleGateway


def session_id_from(container: str | None) -> str | None:
    """Kaggle's session id, read from the container name a kernel reports (its only run of digits)."""
    runs = re.findall(r"\d+", container or "")
    return runs[0] if len(runs) == 1 else None


class LogFollower:
    """Follows the log stream on a daemon thread; progress display is best effort, polling decides."""

    def __init__(self, gateway: KaggleGateway, ref: str, version: int, on_event: Callable[[dict], None]):
        self.gateway, self.ref, self.version, self.on_event = gateway, ref, version, on_event
        self.seen = 0
        self.thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def join(self, timeout: float = 5.0) -> None:
        if self.thread is not None:
            self.thread.join(timeout=timeout)

    def _read(self) -> None:
        count = 0
        try:
            for event in self.gateway.log_stream(self.ref, self.version):
                count += 1
                if count <= self.seen:
                    continue  # the stream replays from the start after a reconnect
                self.seen = count
                for line in str(event.get("data", "")).splitlines():
                    if line.startswith('{"event"'):
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            parsed = json.loads(line)
                            if isinstance(parsed, dict):
                                self.on_event(parsed)
        except Exception:  # noqa: S110 - a dropped stream is reopened by the next poll
            return
