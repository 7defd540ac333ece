"""Whether a new dataset version is ready: one look (`look_at_dataset`), or a wait built on it (`wait_for_dataset`).

Kaggle shows a new version some time after the upload (404 meanwhile means "not yet"), then processes it: the
version is usable once it is above the one recorded before the upload and its status says ready. A version
whose processing failed never will be. The chain's handlers look once per pass; launch (the corpus) and doctor
(the probe's nonce) wait.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kaggle_runner import waits
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.kaggle_api import KaggleApiError, KaggleGateway

# Kaggle's statuses of a dataset version that will never become ready (kagglesdk DatabundleVersionStatus).
FAILED_STATUSES = ("failed", "deleted")


class DatasetNotReady(KaggleRunnerError):
    """A dataset version failed processing, or was still not ready at the deadline."""

    def __init__(self, message: str, ref: str, version: int | None, status: str | None, failed: bool):
        super().__init__(message)
        self.ref, self.version, self.status, self.failed = ref, version, status, failed


@dataclass(frozen=True)
class DatasetLook:
    version: int | None  # the newest version Kaggle shows; None while it shows none
    status: str | None
    newer: bool  # above the version recorded before the upload
    trouble: str | None = None  # a passing failure to ask (a 429, a 5xx): "not yet"

    @property
    def ready(self) -> bool:
        return self.newer and self.status == "ready"

    @property
    def failed(self) -> bool:
        return self.newer and self.status in FAILED_STATUSES

    @property
    def absent(self) -> bool:
        return self.version is None and self.status is None and self.trouble is None


def look_at_dataset(gateway: KaggleGateway, ref: str, newer_than: int | None) -> DatasetLook:
    try:
        version = gateway.dataset_version(ref)
        status = gateway.dataset_status(ref) if version else None
    except KaggleApiError as exc:
        if not exc.transient:
            raise
        return DatasetLook(None, None, False, str(exc))
    return DatasetLook(version, status, bool(version) and version > (newer_than or 0))


def not_ready(look: DatasetLook, ref: str, waited: float, then: str) -> DatasetNotReady:
    """The one-line error for a version that failed processing, or is still not ready after `waited` s."""
    if look.failed:
        return DatasetNotReady(f"dataset {ref} version {look.version} failed processing on Kaggle (status "
                               f"{look.status}); {then}", ref, look.version, look.status, failed=True)
    return DatasetNotReady(f"dataset {ref} is still {look.status or 'not visible'} (version {look.version}) after "
                           f"{duration(waited)}; {then}", ref, look.version, look.status, failed=False)


def wait_for_dataset(gateway: KaggleGateway, ref: str, newer_than: int, timeout: float, note: Callable[[str], None],
                     then: str, first: float = 0.5, cap: float = 30.0, stop: Callable[[], bool] = waits.never) -> bool:
    """Until `ref` shows a version above `newer_than` that is ready; False if `stop` said to stop.
    DatasetNotReady, in one line ending with `then` (what the user can do), when it failed or timed out."""
    last: list[DatasetLook] = []

    def look() -> bool | None:
        found = look_at_dataset(gateway, ref, newer_than)
        if found.trouble and not any(seen.trouble for seen in last):
            note(f"note: {found.trouble}; still waiting for dataset {ref}")
        last.append(found)
        if found.failed:
            raise not_ready(found, ref, 0.0, then)
        return True if found.ready else None

    try:
        return bool(waits.poll(look, first, cap, timeout, stop))
    except waits.WaitTimedOut as exc:
        raise not_ready(last[-1], ref, exc.elapsed, then) from None


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds >= 120 else f"{seconds:.0f}s"
