"""The emulator's backend: kernels, versions, datasets, blobs, quota and faults, persisted in a data dir.

Every mutation happens under one lock and is written to state.json atomically, so a restarted emulator
finds everything it had; versions that were running when it stopped are reported as errors.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kaggle_runner.emulator.errors import BadRequest, Conflict, InjectedFault, NotFound, PermissionDenied
from kaggle_runner.emulator.realism import Realism
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


def weekly_quota_message(seconds: float) -> str:
    return f"Maximum weekly GPU quota of {seconds / 3600:.2f} hours reached."


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
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None  # the process exited
    terminal_at: float | None = None  # the status became terminal (outputs uploaded)
    exit_code: int | None = None
    session_id: int = 0  # random, unguessable; the kernel sees it only in KAGGLE_CONTAINER_NAME


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


class Backend:
    def __init__(self, data_dir: Path, username: str, session_limit: float | None = None,
                 dataset_delay: float = 0.0, clock: Callable[[], float] = time.time,
                 kill_grace_seconds: float = 10.0, realism: Realism | None = None):
        self.data_dir = Path(data_dir).resolve()  # kernels run with their own cwd
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.data_dir / ".lock", "a")  # noqa: SIM115 - held while serving
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise RuntimeError(f"another emulator is serving {self.data_dir}") from None
        self.realism = realism if realism is not None else Realism()
        self.username = username
        self.session_limit = session_limit or DEFAULT_SESSION_LIMIT
        self.kill_grace_seconds = kill_grace_seconds
        self.clock = clock
        self.lock = threading.RLock()
        self.kernels: dict[str, Kernel] = {}
        self.datasets: dict[str, Dataset] = {}
        self.blobs: dict[str, Blob] = {}
        self.next_id = 1
        self.faults = Faults(dataset_delay=dataset_delay)
        self.runner = None  # set by the server: starts and stops version processes
        self.closed = False
        self._load()

    # -- persistence ---------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.data_dir / "state.json"

    def _load(self) -> None:
        if not self.state_file.exists():
            return
        data = json.loads(self.state_file.read_text())
        self.next_id = data["next_id"]
        for ref, k in data["kernels"].items():
            versions = [Version(**v) for v in k.pop("versions")]
            self.kernels[ref] = Kernel(**k, versions=versions)
        for ref, d in data["datasets"].items():
            versions = [DatasetVersion(**v) for v in d.pop("versions")]
            self.datasets[ref] = Dataset(**d, versions=versions)
        self.blobs = {t: Blob(**b) for t, b in data["blobs"].items()}
        for kernel in self.kernels.values():
            for version in kernel.versions:
                if not version.session_id:
                    version.session_id = self._new_session_id()
                if version.status in ACTIVE:
                    version.status, version.failure_message = KaggleStatus.ERROR, RESTART_MESSAGE
                    version.ended_at = version.ended_at or self.clock()
                    version.terminal_at = self.clock()
        self._save()

    def close(self) -> None:
        """Stop persisting: threads of a stopped emulator must not overwrite a restarted one's state."""
        with self.lock:
            if not self.closed:
                self._lock_file.close()  # releases the data dir for a restarted emulator
            self.closed = True

    def _save(self) -> None:
        if self.closed:
            return
        data = {"next_id": self.next_id,
                "kernels": {r: asdict(k) for r, k in self.kernels.items()},
                "datasets": {r: asdict(d) for r, d in self.datasets.items()},
                "blobs": {t: asdict(b) for t, b in self.blobs.items()}}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.state_file)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def reset(self) -> None:
        with self.lock:
            if self.runner:
                self.runner.stop_all()
            self.kernels, self.datasets, self.blobs, self.next_id = {}, {}, {}, 1
            self.faults = Faults()
            for child in ("kernels", "datasets", "blobs"):
                shutil.rmtree(self.data_dir / child, ignore_errors=True)
            self._save()

    # -- faults --------------------------------------------------------------------------------------
    def check_fault(self, method: str, after: bool = False) -> None:
        with self.lock:
            queue = (self.faults.fail_after if after else self.faults.fail).get(method)
            if queue:
                status = queue.pop(0)
                raise InjectedFault(status)

    def set_faults(self, spec: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            for kind in ("fail", "fail_after"):
                for method, statuses in spec.get(kind, {}).items():
                    getattr(self.faults, kind).setdefault(method, []).extend(int(s) for s in statuses)
            for key in ("drop_downloads", "dataset_delay", "hold_queued", "drop_outputs_on_timeout",
                        "stuck_running", "unattachable", "unattachable_refused"):
                if key in spec:
                    setattr(self.faults, key, type(getattr(self.faults, key))(spec[key]))
            if "hold_queued" in spec and not self.faults.hold_queued and self.runner:
                self.runner.start_queued()
            return asdict(self.faults)

    def take_download_drop(self) -> bool:
        with self.lock:
            if self.faults.drop_downloads > 0:
                self.faults.drop_downloads -= 1
                return True
            return False

    # -- kernels -------------------------------------------------------------------------------------
    def _confined(self, *parts: str) -> Path:
        """A path under the data dir built from owner/slug names, refused if it would leave it."""
        path = self.data_dir.joinpath(*parts).resolve()
        if not path.is_relative_to(self.data_dir):
            raise BadRequest("Invalid path")
        return path

    def kernel_dir(self, owner: str, slug: str, number: int) -> Path:
        return self._confined("kernels", check_name(owner, "owner"), check_name(slug, "slug"), f"v{int(number)}")

    def get_kernel(self, owner: str, slug: str) -> Kernel:
        kernel = self.kernels.get(f"{owner}/{slug}")
        if kernel is None:
            if self.realism.never_pushed_403:  # Kaggle does not say whether a kernel exists
                raise PermissionDenied(KERNEL_DENIED_MESSAGE)
            raise NotFound(f"Kernel {owner}/{slug} not found")
        return kernel

    def current_version(self, owner: str, slug: str) -> tuple[Kernel, Version]:
        """GetKernel's view: the newest version pushed at least kernel_404_window ago."""
        kernel = self.get_kernel(owner, slug)
        shown = [v for v in kernel.versions if self.clock() - v.created_at >= self.realism.kernel_404_window]
        if not shown:
            if self.realism.never_pushed_403:
                raise PermissionDenied(KERNEL_DENIED_MESSAGE)
            raise NotFound(f"Kernel {owner}/{slug} not found")
        return kernel, shown[-1]

    def get_version(self, owner: str, slug: str, label: str | None) -> tuple[Kernel, Version]:
        kernel = self.get_kernel(owner, slug)
        if not kernel.versions:
            raise NotFound(f"Kernel {owner}/{slug} has no versions")
        if not label:
            return kernel, kernel.versions[-1]
        digits = str(label).removeprefix("v")
        if not digits.isascii() or not digits.isdigit() or not 1 <= int(digits) <= len(kernel.versions):
            raise NotFound(f"Kernel {owner}/{slug} has no version {label}")
        return kernel, kernel.versions[int(digits) - 1]

    def save_kernel(self, owner: str, slug: str, title: str | None, text: str, settings: dict) -> tuple:
        """A push: a new version of the kernel (created on first push), queued to run."""
        check_name(owner, "owner"), check_name(slug, "slug")
        if owner != self.username:
            raise PermissionDenied(f"User {self.username} cannot push kernels owned by {owner}")
        with self.lock:
            ref = f"{owner}/{slug}"
            gpu_session = settings["enable_gpu"] and not settings.get("quick_save")
            if gpu_session and self.gpu_sessions_in_use() >= MAX_GPU_SESSIONS:
                raise SessionLimitReached(GPU_SESSION_LIMIT_MESSAGE)
            weekly = self.realism.weekly_gpu_seconds
            if gpu_session and weekly > 0 and sum(self.gpu_seconds()) >= weekly:
                raise SessionLimitReached(weekly_quota_message(weekly))
            valid, invalid = [], []
            for source in settings["dataset_sources"]:
                (valid if self._dataset_ref(source) in self.datasets else invalid).append(source)
            if settings["dataset_sources"] and self.faults.unattachable > 0:
                self.faults.unattachable -= 1
                valid, invalid = [], list(settings["dataset_sources"])
                if self.faults.unattachable_refused:
                    raise SessionLimitReached(UNATTACHABLE_MESSAGE + ", ".join(invalid))
            kernel = self.kernels.get(ref)
            if kernel is None:
                if not title:
                    raise BadRequest("A new kernel needs a title")
                kernel = Kernel(id=self._new_id(), owner=owner, slug=slug, title=title,
                                language=settings["language"], kernel_type=settings["kernel_type"],
                                is_private=settings["is_private"])
                self.kernels[ref] = kernel
            elif title:
                kernel.title = title
            now = self.clock()
            pins = {s: self._mountable_version(self.datasets[self._dataset_ref(s)], now) for s in valid}
            version = Version(number=len(kernel.versions) + 1, kernel_type=settings["kernel_type"],
                              code_file="train.ipynb" if settings["kernel_type"] == "notebook" else "train.py",
                              enable_gpu=settings["enable_gpu"], enable_internet=settings["enable_internet"],
                              machine_shape=settings["machine_shape"], dataset_sources=valid,
                              dataset_versions=pins, session_timeout_seconds=settings["session_timeout_seconds"],
                              created_at=now, session_id=self._new_session_id())
            folder = self.kernel_dir(owner, slug, version.number)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / version.code_file).write_text(text, encoding="utf-8")
            kernel.versions.append(version)
            if settings.get("quick_save"):
                version.status, version.started_at, version.ended_at = KaggleStatus.COMPLETE, now, now
                version.terminal_at = now
            self._save()
        if self.runner and not settings.get("quick_save"):
            self.runner.start_queued()
        return kernel, version, invalid

    def gpu_sessions_in_use(self, statuses: tuple[str, ...] = ACTIVE) -> int:
        return sum(1 for k in self.kernels.values() for v in k.versions if v.status in statuses and v.enable_gpu)

    def _new_session_id(self) -> int:
        """Kaggle's public API never returns the session id that cancel needs; nor is it derivable."""
        taken = {v.session_id for k in self.kernels.values() for v in k.versions}
        while True:
            candidate = 10**11 + secrets.randbelow(9 * 10**11)  # twelve digits
            if candidate not in taken:
                return candidate

    def session_id(self, kernel: Kernel, version: Version) -> int:
        return version.session_id

    def find_session(self, session_id: int) -> tuple[Kernel, Version]:
        for kernel in self.kernels.values():
            for version in kernel.versions:
                if version.session_id == session_id:
                    return kernel, version
        raise NotFound(f"Kernel session {session_id} not found")

    def set_version_status(self, kernel: Kernel, version: Version, status: str,
                           failure_message: str | None = None, **times: float | int | None) -> None:
        with self.lock:
            version.status = status
            if status in TERMINAL and version.terminal_at is None:
                version.terminal_at = self.clock()
            if failure_message is not None:
                version.failure_message = failure_message
            for key, value in times.items():
                setattr(version, key, value)
            self._save()

    def outputs_listed(self, version: Version) -> bool:
        """Kaggle lists no outputs while a version runs, nor for a while after its terminal status."""
        if version.status not in TERMINAL:
            return False
        return self.clock() - (version.terminal_at or 0.0) >= self.realism.output_lag

    def output_files(self, owner: str, slug: str, version: Version) -> list[tuple[str, Path]]:
        root = self.kernel_dir(owner, slug, version.number) / "working"
        if not root.is_dir():
            return []
        return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())

    def log_path(self, owner: str, slug: str, version: Version) -> Path:
        return self.kernel_dir(owner, slug, version.number) / "log.jsonl"

    def read_log_events(self, owner: str, slug: str, version: Version) -> list[dict]:
        path = self.log_path(owner, slug, version)
        if not path.exists():
            return []
        events = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line being written right now
        return events

    # -- quota ---------------------------------------------------------------------------------------
    def quota_window(self) -> tuple[float, datetime]:
        """Start of this quota week and the next reset: Saturday 00:00 UTC."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        since_saturday = (now.weekday() - 5) % 7
        start = midnight - timedelta(days=since_saturday)
        return start.timestamp(), start + timedelta(days=7)

    def gpu_seconds(self) -> tuple[float, float]:
        """This quota week's GPU time: (used by ended sessions, held by running ones so far)."""
        with self.lock:
            start, _ = self.quota_window()
            used = reserved = 0.0
            for kernel in self.kernels.values():
                for v in kernel.versions:
                    if v.enable_gpu and v.started_at:
                        seconds = max(0.0, (v.ended_at or self.clock()) - max(v.started_at, start))
                        if v.ended_at is None:
                            reserved += seconds
                        else:
                            used += seconds
            return used, reserved

    def gpu_seconds_used(self) -> float:
        return sum(self.gpu_seconds())

    # -- datasets and blobs --------------------------------------------------------------------------
    @staticmethod
    def _dataset_ref(source: str) -> str:
        parts = source.split("/")
        return "/".join(parts[:2])

    def dataset_dir(self, owner: str, slug: str, number: int) -> Path:
        return self._confined("datasets", check_name(owner, "owner"), check_name(slug, "slug"), f"v{int(number)}")

    def get_dataset(self, owner: str, slug: str) -> Dataset:
        dataset = self.datasets.get(f"{owner}/{slug}")
        if dataset is None:
            raise NotFound(f"Dataset {owner}/{slug} not found")
        return dataset

    def visible_dataset(self, owner: str, slug: str) -> Dataset:
        """GetDataset/GetDatasetStatus: a version just created answers 404 for a while."""
        dataset = self.get_dataset(owner, slug)
        if self.clock() - dataset.versions[-1].created_at < self.realism.dataset_404_window:
            raise NotFound(f"Dataset {owner}/{slug} not found")
        return dataset

    def dataset_status(self, owner: str, slug: str) -> str:
        with self.lock:
            dataset = self.visible_dataset(owner, slug)
            newest = dataset.versions[-1]
            if newest.processing == "failed":
                return "failed"
            if newest.processing == "stuck":
                return "blobsCopiedToSds"
            ready = self.clock() - newest.created_at >= self.faults.dataset_delay
            # Kaggle can answer for the previous version, already ready, while the new one processes.
            stale = self.realism.pin_window > 0 and len(dataset.versions) > 1
            return "ready" if ready or stale else "blobsCopiedToSds"

    def _mountable_version(self, dataset: Dataset, now: float) -> int | None:
        """The version a push made now attaches: the newest one settled for pin_window (and processed)."""
        settle = max(self.realism.pin_window, self.faults.dataset_delay)
        settled = [v for v in dataset.versions if v.processing == "ok" and now - v.created_at >= settle]
        return settled[-1].number if settled else None

    def start_blob_upload(self, name: str, content_length: int) -> Blob:
        name = name.replace("\\", "/").rsplit("/", 1)[-1]  # Kaggle flattens sub-paths
        if name in ("", ".", "..") or "\0" in name:
            raise BadRequest(f"Invalid blob name {name!r}")
        if content_length < 0:
            raise BadRequest("contentLength must not be negative")
        with self.lock:
            blob = Blob(token=secrets.token_urlsafe(24), name=name, content_length=content_length)
            self.blobs[blob.token] = blob
            self._save()
            return blob

    def blob_path(self, token: str) -> Path:
        if token not in self.blobs:
            raise NotFound("Upload session not found or expired")
        return self._confined("blobs", token)

    def write_blob(self, token: str, start: int, stream, length: int | None) -> Blob:
        """Append bytes at `start`; whatever arrives before a dropped connection is kept (resumable)."""
        with self.lock:
            blob = self.blobs.get(token)
            if blob is None:
                raise NotFound("Upload session not found or expired")
            if start != blob.received:
                raise BadRequest(f"Upload must continue at byte {blob.received}, not {start}")
        path = self.blob_path(token)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "r+b" if path.exists() else "wb") as handle:
            handle.seek(start)
            handle.truncate()
            remaining = length if length is not None else blob.content_length - start
            try:
                while remaining > 0:
                    chunk = stream.read(min(1 << 20, remaining))
                    if not chunk:
                        break
                    handle.write(chunk)
                    remaining -= len(chunk)
            finally:
                handle.flush()
                with self.lock:
                    blob.received = handle.tell()
                    self._save()
        return blob

    def blob(self, token: str) -> Blob:
        blob = self.blobs.get(token)
        if blob is None:
            raise NotFound("Upload session not found or expired")
        return blob

    def create_dataset_version(self, owner: str, slug: str, tokens: list[str], notes: str,
                               delete_old: bool, create: dict | None = None) -> Dataset:
        """CreateDataset (with `create`: title, license, privacy) or CreateDatasetVersion."""
        check_name(owner, "owner"), check_name(slug, "slug")
        if owner != self.username:
            raise PermissionDenied(f"User {self.username} cannot write datasets owned by {owner}")
        with self.lock:
            ref = f"{owner}/{slug}"
            blobs = []
            for token in tokens:
                blob = self.blobs.get(token)
                if blob is None or blob.received != blob.content_length:
                    raise BadRequest(f"File upload {token} is missing or incomplete")
                blobs.append(blob)
            names = [b.name for b in blobs]
            if len(set(names)) != len(names):
                raise BadRequest("Two files with the same name in one dataset version")
            if create is not None:
                if ref in self.datasets:
                    raise Conflict(f'The requested slug "{slug}" is already in use by a dataset.')
                if not 6 <= len(slug) <= 50:
                    raise BadRequest("The dataset slug must be between 6 and 50 characters")
                dataset = Dataset(id=self._new_id(), owner=owner, slug=slug, **create)
                self.datasets[ref] = dataset
            else:
                dataset = self.get_dataset(owner, slug)
                first = dataset.versions[0]
                if self.realism.first_version_locks and len(dataset.versions) == 1 and (
                        first.processing == "stuck" or self.clock() - first.created_at < self.faults.dataset_delay):
                    raise PermissionDenied(f"Permission denied: the first version of {ref} is still being "
                                           "processed; a new version can be created once it is ready")
            processing = "ok"
            if self.realism.dataset_versions_failing > 0:
                self.realism.dataset_versions_failing -= 1
                processing = "failed"
            elif self.realism.dataset_versions_stuck > 0:
                self.realism.dataset_versions_stuck -= 1
                processing = "stuck"
            version = DatasetVersion(number=len(dataset.versions) + 1, files=names, created_at=self.clock(),
                                     notes=notes, processing=processing)
            target = self.dataset_dir(owner, slug, version.number)
            target.mkdir(parents=True, exist_ok=True)
            for blob in blobs:
                os.replace(self.blob_path(blob.token), target / blob.name)
                del self.blobs[blob.token]
            dataset.versions.append(version)
            if delete_old:
                for old in dataset.versions[:-1]:
                    shutil.rmtree(self.dataset_dir(owner, slug, old.number), ignore_errors=True)
                    old.files = []
            self._save()
            return dataset

    def mount_inputs(self, version: Version, input_dir: Path) -> None:
        """Attach each dataset at the version pinned when the kernel was pushed, in this version's layout:
        <input>/datasets/<owner>/<slug>/ or <input>/<slug>/ (both seen in 2026). Archives are extracted."""
        layout = self.realism.layout_for(version.number)
        with self.lock:
            for source in version.dataset_sources:
                owner, slug = self._dataset_ref(source).split("/")
                number = version.dataset_versions.get(source, len(self.get_dataset(owner, slug).versions))
                if number is None:
                    continue  # nothing was mountable when the kernel was pushed
                dataset = self.get_dataset(owner, slug)
                target = input_dir / "datasets" / owner / slug if layout == "datasets" else input_dir / slug
                target.mkdir(parents=True, exist_ok=True)
                for name in dataset.versions[number - 1].files:
                    source_file = self.dataset_dir(owner, slug, number) / name
                    if source_file.is_file():
                        _attach(source_file, target, name)


def _attach(source: Path, target: Path, name: str) -> None:
    """Hard-link a dataset file into place, or extract it as Kaggle does for .zip, .tar(.gz) and .gz files."""
    lower = name.lower()
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if lower.endswith(suffix):
            folder = target / name[: -len(suffix)]
            folder.mkdir(parents=True, exist_ok=True)
            try:
                if suffix == ".zip":
                    shutil.unpack_archive(source, folder, "zip")  # refuses members that leave `folder`
                else:
                    with tarfile.open(source) as archive:
                        archive.extractall(folder, filter="data")
                return
            except (OSError, tarfile.TarError, shutil.ReadError, ValueError):
                shutil.rmtree(folder, ignore_errors=True)
                break  # not a readable archive: mounted as it is
    else:
        if lower.endswith(".gz"):
            try:
                with gzip.open(source) as packed, open(target / name[:-3], "wb") as plain:
                    shutil.copyfileobj(packed, plain)
                return
            except (OSError, EOFError):
                (target / name[:-3]).unlink(missing_ok=True)
    try:
        os.link(source, target / name)
    except OSError:
        shutil.copyfile(source, target / name)
