"""The emulator's records and Kaggle's words: kernels, versions, datasets, blobs, faults, and the messages
Kaggle sends, as the backend keeps them (state.py persists them to state.json)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kaggle_runner.emulator.errors import BadRequest
from kaggle_runner.states import KaggleStatus

WEEKLY_GPU_SECONDS = 30 * 3600
WEEKLY_TPU_SECONDS = 20 * 3600
DEFAULT_SESSION_LIMIT = 12 * 3600
MAX_GPU_SESSIONS = 2
TIMEOUT_MESSAGE = "Your notebook was stopped because it exceeded the max allowed execution duration."
RESTART_MESSAGE = "The emulator stopped while this version was running."

ACTIVE = (KaggleStatus.QUEUED, KaggleStatus.RUNNING, KaggleStatus.CANCEL_REQUESTED)
# Kaggle's wording when a push would start a third GPU session (the kaggle client prints it after
# "Kernel push error: "; quoted in Kaggle/kaggle-cli#185 and in tools that match on it).
GPU_SESSION_LIMIT_MESSAGE = f"Maximum batch GPU session count of {MAX_GPU_SESSIONS} reached."
NO_RUNS_MESSAGE = "No runs found for this kernel"
# The emulator's wording for a push refused over its dataset sources (the official client prints
# "The following are not valid dataset sources and could not be added to the kernel: [...]").
UNATTACHABLE_MESSAGE = "The following are not valid dataset sources: "
KERNEL_DENIED_MESSAGE = "Permission 'kernels.get' was denied"
CANCEL_DENIED_MESSAGE = "Permission 'kernelSessions.cancel' was denied"
TERMINAL = (KaggleStatus.COMPLETE, KaggleStatus.ERROR, KaggleStatus.CANCEL_ACKNOWLEDGED)
# Owners and slugs as Kaggle spells them; anything else (`..`, slashes, NUL) never reaches a path.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


def title_in_use_message(title: str) -> str:
    return f'The requested title "{title}" is already in use by a dataset. Please choose another title.'


def weekly_quota_message(seconds: float) -> str:
    return f"Maximum weekly GPU quota of {seconds / 3600:.2f} hours reached."


def projected_quota_message(seconds: float) -> str:
    """Field notes of 2026-10-08: running sessions' reserved time counts against the week before it is used."""
    return (f"Session cannot start because currently running sessions are projected to exceed maximum weekly GPU "
            f"quota of {seconds / 3600:g}. Cancelling running sessions may allow starting new sessions.")


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise BadRequest(f"Invalid {what} {value!r}")
    return value


class SessionLimitReached(Exception):
    """A push refused (GPU sessions in use, weekly GPU quota spent, an injected unattachable dataset): Kaggle
    answers 200 with `error` and version 0, and creates nothing."""


@dataclass
class Version:
    number: int
    status: str = KaggleStatus.QUEUED
    failure_message: str | None = None
    code_file: str = "train.py"
    kernel_type: str = "script"
    enable_gpu: bool = False
    enable_internet: bool = True
    machine_shape: str | None = None
    session_timeout_seconds: int | None = None
    dataset_sources: list[str] = field(default_factory=list)
    # The dataset version each source was pinned to at push time (None: nothing mountable yet).
    dataset_versions: dict[str, int | None] = field(default_factory=dict)
    # Kernels whose outputs this version reads, and the version of each pinned at push (None: none attachable).
    kernel_sources: list[str] = field(default_factory=list)
    kernel_source_versions: dict[str, int | None] = field(default_factory=dict)
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None  # the process exited
    terminal_at: float | None = None  # the status became terminal (outputs uploaded)
    exit_code: int | None = None
    session_id: int = 0  # random, unguessable; the kernel sees it only in KAGGLE_CONTAINER_NAME
    image: str = ""  # the image's build date this version runs on (the kernel sees it as BUILD_DATE)


@dataclass
class Kernel:
    id: int
    owner: str
    slug: str
    title: str
    language: str = "python"
    kernel_type: str = "script"
    is_private: bool = True
    versions: list[Version] = field(default_factory=list)
    # The image the kernel's first version ran on, and the pinning its pushes asked for ("original" keeps that
    # image; "latest", or never asked, takes the newest): a setting that sticks until a push names another.
    original_image: str | None = None
    image_pinning: str | None = None


@dataclass
class DatasetVersion:
    number: int
    files: list[str]
    created_at: float
    notes: str = ""
    processing: str = "ok"  # "failed" or "stuck": never ready, never mounted (Realism.dataset_versions_*)


@dataclass
class Dataset:
    id: int
    owner: str
    slug: str
    title: str
    license_name: str
    is_private: bool
    versions: list[DatasetVersion] = field(default_factory=list)
    subtitle: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    # UpdateDatasetMetadata's `data`: per-file descriptions and columns, kept as sent (checked for shape)
    data: list[dict] = field(default_factory=list)


@dataclass
class Blob:
    token: str
    name: str
    content_length: int
    received: int = 0


@dataclass
class Faults:
    """What tests ask to go wrong: failed calls per method, dropped downloads, slow datasets, held queues."""

    fail: dict[str, list[int]] = field(default_factory=dict)  # method -> statuses to send, in order
    # method -> statuses sent after the call took effect (a push that landed, then answered 503)
    fail_after: dict[str, list[int]] = field(default_factory=dict)
    drop_downloads: int = 0
    dataset_delay: float = 0.0
    hold_queued: bool = False
    drop_outputs_on_timeout: bool = False
    stuck_running: bool = False  # ended versions keep reporting RUNNING until cancelled, as Kaggle's can
    # The next N pushes naming datasets get every one back in invalidDatasetSources: Kaggle does not see them
    # (yet). The version still runs, without them, unless unattachable_refused: then `error` names them and
    # no version is created.
    unattachable: int = 0
    unattachable_refused: bool = False
    # The next N pushes that name datasets mount each at the version before its newest (nothing, for a first
    # version), as a push inside the pin window does, however long ago the versions were made.
    stale_mounts: int = 0
    # The next GetKernelSessionStatus answers carry these status names, one each, before the real status: what a
    # status Kaggle has never sent before looks like to a launcher.
    status_names: list[str] = field(default_factory=list)
    # The next N versions to end find the emulator's disk full when their outputs are saved (ENOSPC).
    disk_full: int = 0
