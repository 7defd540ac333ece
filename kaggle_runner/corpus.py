"""Your own text: a local folder uploaded as the private dataset <user>/<slug>-corpus, once per change.

Kaggle flattens sub-paths of uploaded files and takes at most 50 top-level files per dataset: up to 50
files go up flat (sub-folders folded into the name), more go up as one corpus.zip, which Kaggle extracts
on mount. The kernel finds them under either mount layout by the dataset's slug (docs/kernel.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kaggle_runner import artifacts
from kaggle_runner.errors import KaggleRunnerError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
MAX_TOP_LEVEL_FILES = 50
RECORD = "corpus.json"  # in the workspace: the content hash of each corpus as last uploaded


@dataclass(frozen=True)
class Corpus:
    folder: Path  # what to upload: the files and dataset-metadata.json
    files: int
    size: int
    content_hash: str


def corpus_files(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        raise KaggleRunnerError(f"data_dir {str(data_dir)!r} is not a folder; point it at a folder of .txt, .md or "
                                ".jsonl files")
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and not p.is_symlink()
                   and p.suffix.lower() in TEXT_SUFFIXES and not any(part.startswith(".") for part in
                                                                      p.relative_to(data_dir).parts))
    if not files:
        raise KaggleRunnerError(f"data_dir {str(data_dir)!r} holds no .txt, .md or .jsonl files")
    return files


def content_hash(data_dir: Path) -> tuple[list[Path], str]:
    """The corpus's text files and the hash of their names and bytes: what decides whether to upload."""
    files = corpus_files(data_dir)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(data_dir).as_posix().encode() + b"\0" + artifacts.sha256_of(path).encode())
    return files, digest.hexdigest()


def build_corpus(data_dir: Path, target: Path, dataset_ref: str, title: str,
                 hashed: tuple[list[Path], str] | None = None) -> Corpus:
    """The dataset folder for `data_dir` (files flat, or one zip past 50 files) and its content hash
    (`hashed`: content_hash's answer, when the caller already has it)."""
    files, digest = hashed or content_hash(data_dir)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    if len(files) <= MAX_TOP_LEVEL_FILES:
        for path in files:
            flat = path.relative_to(data_dir).as_posix().replace("/", "__")
            shutil.copyfile(path, target / flat)
    else:
        with zipfile.ZipFile(target / "corpus.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, path.relative_to(data_dir).as_posix())
    (target / "dataset-metadata.json").write_text(json.dumps({
        "id": dataset_ref, "title": title, "licenses": [{"name": "other"}],
        "description": "Training text for a kaggle-runner chain, uploaded from a local folder."}, indent=2))
    size = sum(p.stat().st_size for p in target.iterdir() if p.name != "dataset-metadata.json")
    return Corpus(target, len(files), size, digest)


def uploaded_hash(workspace: Path, dataset_ref: str) -> str | None:
    record = artifacts.read_json_file(workspace / RECORD)
    value = record.get(dataset_ref) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def remember_hash(workspace: Path, dataset_ref: str, content_hash: str) -> None:
    record = artifacts.read_json_file(workspace / RECORD)
    record = record if isinstance(record, dict) else {}
    record[dataset_ref] = content_hash
    (workspace / RECORD).write_text(json.dumps(record, indent=1))
