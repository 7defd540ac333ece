"""Reads a running kernel version's log in the background and hands each kernel JSON event on once, checked.

An event is a line `{"event": <name>, ...}` the kernel printed (contract.EVENTS). Only the fields the launcher
uses are kept, each in the shape it expects (untrusted.py): a malformed value is dropped, never stored or shown.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable

from kaggle_runner import contract, untrusted
from kaggle_runner.kaggle_api import KaggleGateway

WHOLE_FIELDS = ("global_step", "total_steps", "epoch", "step", "micro_batch_size", "accumulation")
NUMBER_FIELDS = ("loss", "lr", "tokens_per_second", "eta_seconds", "val_loss", "perplexity", "gpu_memory_mb")
TEXT_FIELDS = ("text", "container", "reason", "status", "path")


def session_id_from(container: str | None) -> str | None:
    """Kaggle's session id, read from the container name a kernel reports (its only run of digits)."""
    runs = re.findall(r"\d+", container or "")
    return runs[0] if len(runs) == 1 and len(runs[0]) <= 18 else None


def log_text(answer: str) -> str:
    """What a version printed, from the log Kaggle answers: a finished session's comes as one JSON array of
    {stream_name, time, data}; anything else is taken as the text itself."""
    try:
        events = json.loads(answer)
    except (ValueError, RecursionError):
        return answer
    if not isinstance(events, list):
        return answer
    return "".join(str(e.get("data", "")) for e in events if isinstance(e, dict))


def events_in(answer: str) -> list[dict]:
    """Every checked event in a version's whole log, as Kaggle answers it (see log_text), in order."""
    return [event for line in log_text(answer or "").splitlines() if (event := checked_event(line.strip())) is not None]


def session_in(events: list[dict]) -> str | None:
    """The session id the kernel's session event names, if it printed one."""
    return next((sid for e in events if e["event"] == "session" and (sid := session_id_from(e.get("container")))),
                None)


def checked_event(line: str) -> dict | None:
    """The event a log line holds, with only well-formed fields; None when the line is not one of ours."""
    if not line.startswith('{"event"'):
        return None
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict) or raw.get("event") not in contract.EVENTS:
        return None
    event: dict = {"event": raw["event"]}
    for key in WHOLE_FIELDS:
        if (value := untrusted.whole(raw.get(key))) is not None:
            event[key] = value
    for key in NUMBER_FIELDS:
        if (value := untrusted.finite(raw.get(key))) is not None:
            event[key] = value
    for key in TEXT_FIELDS:
        if (value := untrusted.text(raw.get(key), 2000)) is not None:
            event[key] = value
    resumed = raw.get("resumed_from")
    if isinstance(resumed, dict) and untrusted.whole(resumed.get("global_step")) is not None:
        event["resumed_from"] = {"global_step": resumed["global_step"]}
    return event


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
            for record in self.gateway.log_stream(self.ref, self.version):
                count += 1
                if count <= self.seen:
                    continue  # the stream replays from the start after a reconnect
                self.seen = count
                for line in str(record.get("data", "")).splitlines():
                    event = checked_event(line)
                    if event is not None:
                        with contextlib.suppress(Exception):  # one event's trouble must not end the stream
                            self.on_event(event)
        except Exception:  # noqa: S110 - a dropped stream is reopened by the next poll
            return
