"""The emulator's backend: kernels, versions, quota and faults (datasets in datasets.py), kept in a data dir.

Every mutation happens under one lock and is written to state.json atomically, so a restarted emulator
finds everything it had; versions that were running when it stopped are reported as errors. All of its time
is `self.clock`'s (clock.py): a test's ManualClock, or the wall clock.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import threading
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kaggle_runner.emulator.clock import SystemClock
from kaggle_runner.emulator.datasets import DatasetBackend
from kaggle_runner.emulator.errors import BadRequest, InjectedFault, NotFound, PermissionDenied
from kaggle_runner.emulator.models import (
    ACTIVE,
    DEFAULT_SESSION_LIMIT,
    GPU_SESSION_LIMIT_MESSAGE,
    KERNEL_DENIED_MESSAGE,
    MAX_GPU_SESSIONS,
    RESTART_MESSAGE,
    TERMINAL,
    UNATTACHABLE_MESSAGE,
    Blob,
    Dataset,
    DatasetVersion,
    Faults,
    Kernel,
    SessionLimitReached,
    Version,
    check_name,
    projected_quota_message,
    weekly_quota_message,
)
from kaggle_runner.emulator.realism import Realism
from kaggle_runner.states import KaggleStatus


class Backend(DatasetBackend):
    def __init__(self, data_dir: Path, username: str, session_limit: float | None = None,
                 dataset_delay: float = 0.0, clock: SystemClock | None = None,
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
        self.clock = clock or SystemClock()
        self.lock = threading.RLock()
        self.kernels: dict[str, Kernel] = {}
        self.datasets: dict[str, Dataset] = {}
        self.blobs: dict[str, Blob] = {}
        self.deleted_titles: set[str] = set()  # lower-cased titles of deleted datasets (Realism.deleted_titles_linger)
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
        self.deleted_titles = set(data.get("deleted_titles", []))
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
                "blobs": {t: asdict(b) for t, b in self.blobs.items()},
                "deleted_titles": sorted(self.deleted_titles)}
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
            self.deleted_titles = set()
            self.faults = Faults()
            for child in ("kernels", "datasets", "blobs", "archives"):
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
                        "stuck_running", "unattachable", "unattachable_refused", "stale_mounts", "disk_full"):
                if key in spec:
                    setattr(self.faults, key, type(getattr(self.faults, key))(spec[key]))
            names = spec.get("status_names", [])
            if not isinstance(names, list) or not all(isinstance(n, str) and n.isascii() and len(n) < 64
                                                      for n in names):
                raise BadRequest("status_names must be a list of short names")
            self.faults.status_names.extend(names)
            if "hold_queued" in spec and not self.faults.hold_queued and self.runner:
                self.runner.start_queued()
            return asdict(self.faults)

    def take_status_name(self) -> str | None:
        with self.lock:
            return self.faults.status_names.pop(0) if self.faults.status_names else None

    def _spend_fault(self, name: str) -> bool:
        """One use of a counted fault, if any is left; the caller holds the lock."""
        left = getattr(self.faults, name)
        if left > 0:
            setattr(self.faults, name, left - 1)
        return left > 0

    def take_disk_full(self) -> bool:
        with self.lock:
            return self._spend_fault("disk_full")

    def take_download_drop(self) -> bool:
        with self.lock:
            return self._spend_fault("drop_downloads")

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
            used, reserved = self.gpu_seconds()
            if gpu_session and weekly > 0 and used >= weekly:
                raise SessionLimitReached(weekly_quota_message(weekly))
            if gpu_session and weekly > 0 and used + reserved >= weekly:
                raise SessionLimitReached(projected_quota_message(weekly))
            valid, invalid = [], []
            for source in settings["dataset_sources"]:
                (valid if self._dataset_ref(source) in self.datasets else invalid).append(source)
            if settings["dataset_sources"] and self._spend_fault("unattachable"):
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
            if kernel.original_image is None:
                kernel.original_image = self.realism.latest_image
            kernel.image_pinning = settings.get("image_pinning") or kernel.image_pinning
            now = self.clock()
            pins = {s: self._mountable_version(self.datasets[self._dataset_ref(s)], now) for s in valid}
            kernels, invalid_kernels = self._kernel_sources(ref, settings.get("kernel_sources") or [])
            kernel_pins = {s: self._attachable_version(self.kernels[s], now) for s in kernels}
            if (valid or kernels) and self._spend_fault("stale_mounts"):  # as if pushed inside the pin windows
                pins = {s: (len(self.datasets[self._dataset_ref(s)].versions) - 1) or None for s in valid}
                kernel_pins = {s: self._attachable_version(self.kernels[s], now, skip_newest=True) for s in kernels}
            version = Version(number=len(kernel.versions) + 1, kernel_type=settings["kernel_type"],
                              code_file="train.ipynb" if settings["kernel_type"] == "notebook" else "train.py",
                              enable_gpu=settings["enable_gpu"], enable_internet=settings["enable_internet"],
                              machine_shape=settings["machine_shape"], dataset_sources=valid,
                              dataset_versions=pins, kernel_sources=kernels, kernel_source_versions=kernel_pins,
                              session_timeout_seconds=settings["session_timeout_seconds"],
                              created_at=now, session_id=self._new_session_id(),
                              image=kernel.original_image if kernel.image_pinning == "original"
                              else self.realism.latest_image)
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
        return kernel, version, invalid, invalid_kernels

    def _kernel_sources(self, pushed: str, sources: list[str]) -> tuple[list[str], list[str]]:
        """(attachable, invalid) kernel sources: the user's own kernels with a COMPLETE version; the pushed kernel
        itself only where self-reference is allowed."""
        valid, invalid = [], []
        for source in sources:
            kernel = self.kernels.get("/".join(source.split("/")[:2]))
            usable = kernel is not None and kernel.owner == self.username and any(
                v.status == KaggleStatus.COMPLETE for v in kernel.versions)
            if source == pushed and self.realism.self_source_refused:
                usable = False
            (valid if usable else invalid).append(source)
        return valid, invalid

    def _attachable_version(self, kernel: Kernel, now: float, skip_newest: bool = False) -> int | None:
        """The version of a kernel source a push made now attaches: the newest COMPLETE one whose outputs were saved
        kernel_source_window ago (the one before, inside the window); never a killed or failed one."""
        complete = [v for v in kernel.versions if v.status == KaggleStatus.COMPLETE and v.terminal_at is not None]
        settled = [v for v in complete if now - v.terminal_at >= self.realism.kernel_source_window]
        if skip_newest:
            settled = [v for v in complete[:-1]]
        return settled[-1].number if settled else None

    def mount_kernel_sources(self, version: Version, input_dir: Path) -> None:
        """Each kernel source's pinned version's outputs, in this version's layout: <input>/notebooks/<owner>/<slug>/
        or <input>/<slug>/ (both seen in 2026), with Kaggle's own __script__.py beside them."""
        layout = self.realism.layout_for(version.number)
        with self.lock:
            for source, number in version.kernel_source_versions.items():
                if number is None:
                    continue
                owner, slug = source.split("/")[:2]
                kernel = self.kernels[f"{owner}/{slug}"]
                target = input_dir / "notebooks" / owner / slug if layout == "datasets" else input_dir / slug
                target.mkdir(parents=True, exist_ok=True)
                pinned = kernel.versions[number - 1]
                for rel, path in self.output_files(owner, slug, pinned):
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(path, target / rel)
                    except OSError:
                        shutil.copyfile(path, target / rel)
                code = self.kernel_dir(owner, slug, number) / pinned.code_file
                if code.is_file():
                    shutil.copyfile(code, target / "__script__.py")

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

    def delete_kernel(self, owner: str, slug: str) -> None:
        """Every version goes, running ones stopped; afterwards the kernel answers as one never pushed."""
        kernel = self.get_kernel(owner, slug)
        if owner != self.username:
            raise PermissionDenied(f"User {self.username} cannot delete kernels owned by {owner}")
        with self.lock:
            del self.kernels[f"{owner}/{slug}"]
            self._save()
        if self.runner:
            self.runner.kill_kernel(kernel)
        shutil.rmtree(self._confined("kernels", owner, slug), ignore_errors=True)

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
        """This quota week's GPU time: (used, by ended sessions and running ones so far; reserved, what each
        running session may still take: its session limit minus its elapsed time, as Kaggle's timeReserved)."""
        with self.lock:
            start, _ = self.quota_window()
            used = reserved = 0.0
            for kernel in self.kernels.values():
                for v in kernel.versions:
                    if v.enable_gpu and v.started_at:
                        elapsed = max(0.0, (v.ended_at or self.clock()) - max(v.started_at, start))
                        used += elapsed
                        if v.ended_at is None:
                            limit = float(v.session_timeout_seconds or self.session_limit)
                            reserved += max(0.0, limit - (self.clock() - v.started_at))
            return used, reserved

