"""Tell the user, somewhere else, when a chain needs no babysitting any more: an HTTP POST per event.

The body is JSON; with `notify_format = "text"` it is one plain line, which ntfy-style services show as
the message. Posts go from background threads with a short timeout, so an unreachable URL never blocks the
chain; the driver waits for posts still under way before it returns (`wait_for_pending`), so the last one
("completed", "failed", "stopped") is not lost when the process exits. Redirects are not followed, and the
URL (often a secret topic) is never printed whole.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import requests

TIMEOUT_SECONDS = 5.0
_pending: list[threading.Thread] = []
_lock = threading.Lock()


def message(event: str, run: str, state: str, reason: str = "", segment: int | None = None) -> str:
    where = f" (segment {segment})" if segment else ""
    return f"kaggle-runner: run {run} {event}{where}: {state}" + (f" - {reason}" if reason else "")


def shown(url: str) -> str:
    """The URL as notes print it: scheme and host only (its path is often the secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/…"


def post(url: str, payload: dict, text_form: bool, on_error: Callable[[str], None]) -> threading.Thread:
    """POST in the background; a failure is one note, never an exception."""

    def send() -> None:
        try:
            if text_form:
                line = message(payload["event"], payload["run"], payload["state"], payload.get("reason", ""),
                               payload.get("segment"))
                response = requests.post(url, data=line.encode(), timeout=TIMEOUT_SECONDS, allow_redirects=False,
                                         headers={"Content-Type": "text/plain; charset=utf-8",
                                                  "Title": f"kaggle-runner {payload['run']}"})
            else:
                response = requests.post(url, data=json.dumps(payload), timeout=TIMEOUT_SECONDS,
                                         allow_redirects=False, headers={"Content-Type": "application/json"})
            if response.status_code >= 300:
                on_error(f"note: the notification to {shown(url)} was refused (HTTP {response.status_code})")
        except requests.RequestException as exc:
            on_error(f"note: could not send the notification to {shown(url)} ({type(exc).__name__})")

    thread = threading.Thread(target=send, daemon=True)
    with _lock:
        _pending.append(thread)
    thread.start()
    return thread


def wait_for_pending(timeout: float = TIMEOUT_SECONDS + 1) -> None:
    """Let posts under way finish (each is bounded by its own timeout; all together by `timeout`)."""
    deadline = time.monotonic() + timeout
    with _lock:
        threads = list(_pending)
        _pending.clear()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
