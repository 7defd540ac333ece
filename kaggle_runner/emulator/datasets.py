"""The emulator's datasets and blob uploads: versions created from uploaded blobs, their processing and status,
and what a pushed version mounts (pinned at push time, in one of Kaggle's two layouts)."""

from __future__ import annotations

import gzip
import os
import secrets
import shutil
import tarfile
import zipfile
from pathlib import Path

from kaggle_runner.emulator.errors import BadRequest, Conflict, NotFound, PermissionDenied
from kaggle_runner.emulator.models import (
    Blob,
    Dataset,
    DatasetVersion,
    Version,
    check_name,
    title_in_use_message,
)


class DatasetBackend:
    """The dataset half of the backend (mixed into state.Backend, whose lock, clock and persistence it uses)."""

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
                if self.realism.deleted_titles_linger and create["title"].lower() in self.deleted_titles:
                    raise Conflict(title_in_use_message(create["title"]))
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

    def own_dataset(self, owner: str, slug: str) -> Dataset:
        """A dataset the caller may change: its own (another account's answers 403, as Kaggle's would)."""
        dataset = self.get_dataset(owner, slug)
        if owner != self.username:
            raise PermissionDenied(f"User {self.username} cannot change datasets owned by {owner}")
        return dataset

    def delete_dataset(self, owner: str, slug: str) -> None:
        """Every version and file goes; afterwards the dataset answers 404, and (deleted_titles_linger) its
        title cannot be taken again."""
        with self.lock:
            dataset = self.own_dataset(owner, slug)
            del self.datasets[f"{owner}/{slug}"]
            self.deleted_titles.add(dataset.title.lower())
            shutil.rmtree(self._confined("datasets", owner, slug), ignore_errors=True)
            shutil.rmtree(self._confined("archives", owner, slug), ignore_errors=True)
            self._save()

    def update_dataset_metadata(self, owner: str, slug: str, settings: dict) -> list[str]:
        """UpdateDatasetMetadata: what Kaggle would refuse comes back as `errors`, one line each."""
        with self.lock:
            dataset = self.own_dataset(owner, slug)
            errors = []
            title = settings.get("title")
            if title is not None and not (isinstance(title, str) and 6 <= len(title) <= 50):
                errors.append("The dataset title must be between 6 and 50 characters")
            texts = {key: settings.get(key) for key in ("subtitle", "description")}
            errors += [f"{key} must be text" for key, value in texts.items()
                       if value is not None and not isinstance(value, str)]
            keywords = settings.get("keywords") or []
            data = settings.get("data") or []
            if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
                errors.append("keywords must be a list of strings")
            if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
                errors.append("data must be a list of objects")
            if errors:
                return errors
            if title is not None:
                dataset.title = title
            dataset.subtitle = texts["subtitle"] if texts["subtitle"] is not None else dataset.subtitle
            dataset.description = texts["description"] if texts["description"] is not None else dataset.description
            dataset.keywords, dataset.data = list(keywords), list(data)
            licenses = settings.get("licenses") or []
            if isinstance(licenses, list) and licenses and isinstance(licenses[0], dict) and licenses[0].get("name"):
                dataset.license_name = str(licenses[0]["name"])
            if isinstance(settings.get("isPrivate"), bool):
                dataset.is_private = settings["isPrivate"]
            self._save()
            return []

    def dataset_version_number(self, dataset: Dataset, number: object) -> int:
        """A version the request names (the newest when none); 404 for one that does not exist."""
        number = number or len(dataset.versions)
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= len(dataset.versions):
            raise NotFound(f"Dataset {dataset.owner}/{dataset.slug} has no version {number!r}")
        return number

    def dataset_file(self, owner: str, slug: str, number: int, name: str) -> Path:
        dataset = self.get_dataset(owner, slug)
        number = self.dataset_version_number(dataset, number)
        if name not in dataset.versions[number - 1].files:
            raise NotFound(f"Dataset {owner}/{slug} version {number} has no file {name!r}")
        return self.dataset_dir(owner, slug, number) / name

    def dataset_archive(self, owner: str, slug: str, number: int) -> Path:
        """The version's files as one zip (stored, not compressed: checkpoints do not shrink), made once."""
        dataset = self.get_dataset(owner, slug)
        number = self.dataset_version_number(dataset, number)
        archive = self._confined("archives", owner, slug, f"v{number}.zip")
        if not archive.exists():
            archive.parent.mkdir(parents=True, exist_ok=True)
            partial = archive.with_suffix(f".{secrets.token_hex(4)}.partial")
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as packed:
                for name in dataset.versions[number - 1].files:
                    packed.write(self.dataset_dir(owner, slug, number) / name, name)
            os.replace(partial, archive)
        return archive

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
