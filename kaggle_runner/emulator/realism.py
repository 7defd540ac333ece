"""How unkind the emulator is: Kaggle's observed behaviours, scaled from minutes to seconds, each a knob.

The defaults are on, so every caller meets Kaggle's rough edges the first time; `Realism.off()` is the
kind emulator for debugging (`kaggle-runner emulator serve --kind`). docs/emulator.md lists the public
evidence for each field.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import asdict, dataclass, fields

from kaggle_runner.emulator.errors import BadRequest

MOUNT_LAYOUTS = ("datasets", "slug", "alternate")


@dataclass
class Realism:
    # A push within this many s of a dataset version's creation mounts the previous version (nothing
    # at all for a brand-new dataset).
    pin_window: float = 2.0
    # GetDataset/GetDatasetStatus answer 404 this long after a version is created.
    dataset_404_window: float = 0.5
    # GetKernelSessionStatus answers 404 "No runs found for this kernel" this long after a push.
    status_404_window: float = 1.0
    # After that, GetKernelSessionStatus answers NEW_SCRIPT (kagglesdk's seventh status, "saved, not run yet")
    # this long: one public tool reports seeing it briefly right after a push.
    new_script_window: float = 0.5
    # GetKernel does not show a version this long after its push: the previous version is "current", and a
    # kernel with no earlier version is unknown (403/404). No direct evidence: off by default.
    kernel_404_window: float = 0.0
    # Status stays RUNNING this long after the process exits (plus the bytes-proportional part), and the
    # output listing stays empty this long after the terminal status.
    output_lag: float = 1.0
    output_seconds_per_gb: float = 2.0
    # Requests per rate_window (a token bucket over every authenticated request) before 429 with
    # Retry-After; 0 turns the limit off.
    rate_limit: int = 100
    rate_window: float = 1.0
    # Every CancelKernelSession answers with an errorMessage (permission denied).
    cancel_refused: bool = False
    # GPU versions come without a GPU: KAGGLE_RUNNER_EMULATED_GPU is not set for them.
    no_gpu: bool = False
    # "datasets": <input>/datasets/<owner>/<slug>/; "slug": <input>/<slug>/; "alternate": by kernel
    # version number (odd: datasets, even: slug).
    mount_layout: str = "alternate"
    # At the session limit: SIGTERM, a grace period, then SIGKILL (True) or SIGKILL straight away (False).
    sigterm_before_kill: bool = False
    # A kernel that was never pushed answers 403 "Permission 'kernels.get' was denied" (else 404).
    never_pushed_403: bool = True
    # A GPU push is refused once the week's GPU time reaches this; 0 = no weekly limit.
    weekly_gpu_seconds: float = 30 * 3600
    # The quota reply leaves out timeReserved and any zero duration.
    quota_fields_absent: bool = False
    # The next N dataset versions created fail processing: GetDatasetStatus says FAILED, they never mount.
    # Counts down as versions are created. Thin evidence (kagglesdk's DatabundleVersionStatus has FAILED).
    dataset_versions_failing: int = 0
    # The next N dataset versions never finish processing: GetDatasetStatus keeps saying blobsCopiedToSds
    # (not the previous version's "ready"), they never mount. Counts down likewise.
    dataset_versions_stuck: int = 0
    # CreateDatasetVersion answers 403 while the dataset's first version is still processing (a Kaggle
    # engineer's words in kagglehub PR #182); later versions may be created in parallel.
    first_version_locks: bool = True
    # Kernels reach the internet only when they ask for it and the account may grant it. A Kaggle account
    # without a verified phone number gets none: the less kind reading, so off by default. Off, kernels
    # get an unreachable HTTP(S) proxy, so HTTP clients fail at once instead of using this machine's network.
    internet_allowed: bool = False
    # A kernel source (kernel_sources: another kernel's outputs as input) attaches that kernel's newest COMPLETE
    # version whose outputs have been saved this long (the one before it, inside the window), pinned at push;
    # a kernel with no COMPLETE version is an invalid source (a user report: an ERROR-only kernel is "not a
    # valid kernel source"). Killed and failed versions are never attached.
    kernel_source_window: float = 2.0
    # A kernel listing itself in kernel_sources gets it back in invalidKernelSources (the version runs without
    # it). Thin evidence either way (kaggle-cli #464 shows such a file, nobody says whether it works): refused.
    self_source_refused: bool = True
    # /kaggle/working keeps at most 20 GiB: a write past it fails as on a full disk (EFBIG here, through the
    # process's RLIMIT_FSIZE, on Linux), and a version whose outputs still exceed it at the end saves none.
    output_cap_bytes: int = 20 * 2**30
    # A dataset's title stays taken after the dataset is deleted: CreateDataset with it is refused ("already in
    # use"), as kaggle-cli #243 reports (and #187: a slug deleted and recreated could not be attached). Old,
    # thin reports; the less kind reading, so a launcher never plans on recreating what it deleted.
    deleted_titles_linger: bool = True
    # The newest image (its build date, which a kernel sees as BUILD_DATE, as Kaggle's docker-python images set):
    # what a new kernel starts on and what "latest" pinning takes. Setting it is an image update.
    latest_image: str = "20261120"

    @classmethod
    def off(cls) -> Realism:
        """The kind emulator: no windows, lags, limits or refusals; datasets at <input>/datasets/."""
        return cls(pin_window=0.0, dataset_404_window=0.0, status_404_window=0.0, new_script_window=0.0, output_lag=0.0,
                   output_seconds_per_gb=0.0, rate_limit=0, cancel_refused=False, no_gpu=False,
                   mount_layout="datasets", sigterm_before_kill=True, never_pushed_403=False,
                   weekly_gpu_seconds=0.0, quota_fields_absent=False, first_version_locks=False,
                   kernel_source_window=0.0, self_source_refused=False)

    def update(self, spec: object) -> dict:
        """Apply a JSON subset (unknown keys and bad values are refused whole); return every value."""
        if not isinstance(spec, dict):
            raise BadRequest("Expected a JSON object of realism settings")
        types = {f.name: {"bool": bool, "int": int, "float": float, "str": str}[str(f.type)] for f in fields(self)}
        changes = {}
        for key, value in spec.items():
            kind = types.get(key)
            if kind is None:
                raise BadRequest(f"Unknown realism setting {key!r}")
            if kind is bool:
                if not isinstance(value, bool):
                    raise BadRequest(f"{key} must be true or false")
            elif key == "mount_layout":
                if value not in MOUNT_LAYOUTS:
                    raise BadRequest(f"{key} must be one of {', '.join(MOUNT_LAYOUTS)}")
            elif kind is str:
                if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,40}", value):
                    raise BadRequest(f"{key} must be a short name of letters, digits, '.', '_' or '-'")
            else:
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                        or value < 0 or (kind is int and value != int(value)):
                    raise BadRequest(f"{key} must be a non-negative {'integer' if kind is int else 'number'}")
                value = kind(value)
            changes[key] = value
        for key, value in changes.items():
            setattr(self, key, value)
        return asdict(self)

    def layout_for(self, kernel_version: int) -> str:
        if self.mount_layout == "alternate":
            return "datasets" if kernel_version % 2 else "slug"
        return self.mount_layout


class TokenBucket:
    """Kaggle's rate limit: `rate_limit` requests per `rate_window`, refilled smoothly."""

    def __init__(self, realism: Realism, clock=time.time):
        self.realism = realism
        self.clock = clock
        self.lock = threading.Lock()
        self.tokens: float | None = None
        self.updated = clock()

    def take(self) -> float:
        """0 if the request may go ahead, else the seconds until it may (its Retry-After)."""
        limit, window = self.realism.rate_limit, self.realism.rate_window
        if limit <= 0 or window <= 0:
            self.tokens = None
            return 0.0
        with self.lock:
            now = self.clock()
            rate = limit / window
            if self.tokens is None:
                self.tokens = float(limit)
            self.tokens = min(float(limit), self.tokens + (now - self.updated) * rate)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / rate
