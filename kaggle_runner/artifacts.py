"""Kernel outputs on the laptop side: the manifest, checksums, what a resume needs, the dataset folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from kaggle_runner import untrusted
from kaggle_runner.contract import BEST_MODEL, FILE_KINDS, MANIFEST, MANIFEST_FORMAT, RUN_STATE, SMALL_FILES
from kaggle_runner.errors import KaggleRunnerError

__all__ = ["BEST_MODEL", "MANIFEST", "RUN_STATE", "SMALL_FILES"]  # the contract's names, where outputs are read
FORMAT = MANIFEST_FORMAT


class ArtifactError(KaggleRunnerError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def confined(folder: Path, relpath: str) -> Path | None:
    """`folder / relpath` if that stays inside `folder`, else None.

    Every path that comes from Kaggle, the emulator or a manifest goes through here: absolute paths, `..`,
    backslashes and anything that resolves through a symlink to outside `folder` are refused.
    """
    if not isinstance(relpath, str) or not relpath or "\x00" in relpath or "\\" in relpath:
        return None
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in pure.parts) or relpath.startswith("~"):
        return None
    root = folder.resolve()
    candidate = (folder / relpath).resolve()
    if candidate != root and root not in candidate.parents:
        return None
    return folder / relpath


def read_json_file(path: Path) -> object | None:
    """A JSON file written by a kernel, or None if it is missing, torn or not JSON: never an exception."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: a hostile file of nested brackets
        return None


def read_manifest(folder: Path) -> dict:
    """The kernel's checksum manifest; entries with unsafe paths or malformed fields are dropped."""
    data = read_json_file(folder / MANIFEST)
    files = data.get("files") if isinstance(data, dict) else None
    clean = {}
    for rel, info in (files.items() if isinstance(files, dict) else []):
        if confined(folder, rel) is None or not isinstance(info, dict):
            continue
        if untrusted.sha256_hex(info.get("sha256")) is None or untrusted.whole(info.get("size")) is None:
            continue
        entry = {"sha256": info["sha256"], "size": info["size"]}
        if isinstance(info.get("kind"), str) and info["kind"] in FILE_KINDS:
            entry["kind"] = info["kind"]
        for key in ("global_step", "epoch"):
            if untrusted.whole(info.get(key)) is not None:
                entry[key] = info[key]
        if untrusted.finite(info.get("val_loss")) is not None:
            entry["val_loss"] = info["val_loss"]
        clean[rel] = entry
    return {**(data if isinstance(data, dict) else {}), "kaggle_runner_manifest": FORMAT, "files": clean}


def read_run_state(folder: Path) -> dict | None:
    """run_state.json if it is whole and a JSON object; a torn or odd one reads as missing."""
    state = read_json_file(folder / RUN_STATE)
    return state if isinstance(state, dict) else None


def verified(folder: Path, relpath: str, info: dict) -> bool:
    path = confined(folder, relpath)
    return (path is not None and path.is_file() and not path.is_symlink() and path.stat().st_size == info.get("size")
            and sha256_of(path) == info.get("sha256"))


def checkpoints_newest_first(manifest: dict) -> list[str]:
    entries = [(info.get("global_step", -1), rel) for rel, info in manifest["files"].items()
               if info.get("kind") == "checkpoint"]
    return [rel for _, rel in sorted(entries, reverse=True)]


def exact_pattern(names: list[str]) -> str:
    """A regex for the client's file_pattern that matches exactly these output names."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def build_flat_dataset(source: Path, target: Path, wanted: list[str], dataset_ref: str, title: str,
                       description: str, optional: tuple[str, ...] = ()) -> int:
    """A flat folder (Kaggle datasets take top-level files) of verified outputs plus their manifest.

    Files are hard-linked from the downloaded outputs, and the manifest is rewritten for the flat names,
    so the kernel verifies exactly what it reads. Returns the bytes to upload.
    """
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    manifest = read_manifest(source)
    files = {}
    for rel in wanted:
        info = manifest["files"].get(rel)
        if info is None or not verified(source, rel, info):
            if rel in optional:
                continue
            raise ArtifactError(f"{source / rel} does not match its checksum")
        flat = Path(rel).name
        try:
            os.link(source / rel, target / flat)
        except OSError:
            shutil.copyfile(source / rel, target / flat)
        files[flat] = info
    (target / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2))
    (target / "dataset-metadata.json").write_text(json.dumps({
        "id": dataset_ref, "title": title, "licenses": [{"name": "CC0-1.0"}], "description": description,
    }, indent=2))
    return sum((target / name).stat().st_size for name in files)


def build_resume_dataset(source: Path, target: Path, checkpoint: str, dataset_ref: str, title: str) -> int:
    """The checkpoint to resume from and best_model.pt (absent until an evaluation improved)."""
    return build_flat_dataset(source, target, [checkpoint, BEST_MODEL], dataset_ref, title,
                              "Checkpoint for the next segment of a kaggle-runner resume chain.",
                              optional=(BEST_MODEL,))


def token_files(manifest: dict) -> list[str]:
    return sorted(rel for rel, info in manifest["files"].items() if info.get("kind") == "token_cache")


def dataset_title(slug: str, what: str = "checkpoints") -> str:
    return f"{slug} {what}"[:50]
