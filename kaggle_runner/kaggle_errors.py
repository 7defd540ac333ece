"""What Kaggle's answers mean: typed errors and push refusals, and which failures are worth trying again.

kaggle_api.py raises these; the controller acts on their types (a refusal to wait out, one to stop on, a push
that may have landed). Nothing here talks to Kaggle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import requests
import urllib3

from kaggle_runner.errors import KaggleRunnerError

RETRY_STATUSES = {429, 500, 502, 503, 504}
MAX_RETRY_DELAY = 60.0


class KaggleApiError(KaggleRunnerError):
    def __init__(self, message: str, status: int | None = None, transient: bool | None = None):
        super().__init__(message)
        self.status = status
        # Worth trying again later: rate limits, server errors and dropped connections; nothing else.
        self.transient = status in RETRY_STATUSES if transient is None else transient


class PushRefused(KaggleApiError):
    """Kaggle answered a push with `error` set (or no version): nothing landed."""


class PushUncertain(KaggleApiError):
    """A push failed in a way that may have landed (a 5xx, a timeout or a connection dropped mid-answer) and
    Kaggle does not show a new version yet: only waiting tells whether it did."""


class GpuSessionsBusy(PushRefused):
    """The account's GPU sessions (two at most) are all in use: wait for one to end."""


class QuotaExhausted(PushRefused):
    """The weekly GPU quota is used up: nothing runs until it resets."""


class QuotaProjected(PushRefused):
    """Running sessions are projected to use the rest of the week's GPU quota (each holds back about 12 h minus
    its elapsed time): the refusal clears when one of them ends, so this is a wait, not a weekly stop."""


class DatasetSlugTaken(KaggleApiError):
    """Creating a dataset was refused because its slug is in use: after an interrupted create, the create
    had landed (GetDatasetStatus can answer 404 for a while after one)."""


class SourcesNotAttached(PushRefused):
    """Kaggle did not attach dataset `sources` it was asked to: they do not exist, or it does not see them yet.

    `landed` is the version Kaggle created anyway, running without them (it lists them in
    `invalidDatasetSources` beside a version number, as the official client's own output shows); None when it
    refused the push outright (`error` naming them, version 0), so nothing landed.
    """

    def __init__(self, message: str, sources: list[str], landed: PushResult | None):
        super().__init__(message)
        self.sources, self.landed = sources, landed


@dataclass(frozen=True)
class PushResult:
    version: int
    kernel_id: int
    url: str


@dataclass(frozen=True)
class OutputFile:
    name: str
    url: str


def status_of(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, requests.HTTPError):
        return status_of(error) in RETRY_STATUSES
    return isinstance(error, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError)


def may_have_landed(error: BaseException) -> bool:
    """Whether Kaggle may have carried out a request that failed: not for a 429 (refused at the door) or a
    connection that never opened; yes for a 5xx, a read timeout, or an answer cut off."""
    if isinstance(error, requests.HTTPError):
        return status_of(error) != 429
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return False
    reason = getattr(error.args[0], "reason", None) if error.args else None  # urllib3's MaxRetryError
    return not isinstance(reason, urllib3.exceptions.NewConnectionError)


def retry_after(error: BaseException) -> float | None:
    """Kaggle's Retry-After on a 429, in seconds, when it sends one."""
    response = getattr(error, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def backoff(attempt: int, base: float, cap: float = MAX_RETRY_DELAY) -> float:
    """Exponential backoff with jitter, capped."""
    return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def explain(error: BaseException, what: str) -> KaggleApiError:
    status = status_of(error)
    if status == 401:
        return KaggleApiError(f"{what}: Kaggle refused the credentials (401); check kaggle.json or "
                              "KAGGLE_USERNAME/KAGGLE_KEY", status)
    if status == 403:
        return KaggleApiError(f"{what}: permission denied (403): {error}", status)
    if status == 404:
        return KaggleApiError(f"{what}: not found (404): {error}", status)
    if status == 429:
        return KaggleApiError(f"{what}: Kaggle is rate-limiting requests (429); wait a few minutes", status)
    if status and status >= 500:
        return KaggleApiError(f"{what}: Kaggle's server failed ({status}); try again later", status)
    if isinstance(error, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError):
        return KaggleApiError(f"{what}: cannot reach the Kaggle API ({type(error).__name__})", transient=True)
    return KaggleApiError(f"{what}: {error}", status)
