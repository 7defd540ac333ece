"""Tell the user, somewhere else, when a chain needs no babysitting any more: an HTTP POST per event.

The body is JSON; with `notify_format = "text"` it is one plain line, which ntfy-style services show as
the message. Sent from a daemon thread with a short timeout: an unreachable URL never blocks the chain.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import requests

TIMEOUT_SECONDS = 5.0


def message(event: str, run: str, state: str, reason: str = "", segment: int | None = None) -> str:
    where = f" (segment {segment})" if segment else ""
    return f"kaggle-runner: run {run} {event}{where}: {state}" + (f" - {reason}" if reason else "")


def post(url: str, payload: dict, text_form: bool, on_error: Callable[[str], None]) -> threading.Thread:
    """POST in the background; a failure is one note, never an exception."""

    def send() -> None:
        try:
            if text_form:
                line = message(payload["event"], payload["run"], payload["state"], payload.get("reason", ""),
                               payload.get("segment"))
                response = requests.post(url, data=line.encode(), timeout=TIMEOUT_SECONDS,
                                         headers={"Content-Type": "text/plain; charset=utf-8",
                                                  "Title": f"kaggle-runner {payload['run']}"})
            else:
                response = requests.post(url, data=json.dumps(payload), timeout=TIMEOUT_SECONDS,
                                         headers={"Content-Type": "application/json"})
            if response.status_code >= 400:
                on_error(f"note: the notification to {url} was refused (HTTP {response.status_code})")
        except requests.RequestException as exc:
            on_error(f"note: could not send the notification to {url} ({type(exc).__name__})")

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread
