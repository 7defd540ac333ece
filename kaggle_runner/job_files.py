"""The files a [job] ships: the user's script and its companions, gathered once at launch, checked, and kept as a
snapshot so every segment of the chain pushes the same bytes (docs/script.md).

Kaggle runs one code file per version, so the files travel inside the pushed script as data (base64 in a JSON
block) and the job kernel writes them out, byte for byte, before the script starts.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import posixpath
from importlib import resources
from pathlib import Path, PurePosixPath

from kaggle_runner.config import RunConfig
from kaggle_runner.errors import KaggleRunnerError

HELPER_NAME = "kaggle_runner_job.py"  # the helper module, shipped beside the script (standard library only)
# What one pushed script may carry: Kaggle keeps one code file per version, and data belongs in a dataset
# (dataset_sources), not in the code.
MAX_SHIPPED_BYTES = 2 * 2**20
# Never shipped, whatever a glob matches: credentials and environment files.
# Matched lower-cased, against both a file's name and, for a link, its target's; `token` is Hugging Face's.
NEVER_SHIPPED = ("kaggle.json", "access_token", "access_token.txt", "token", ".env", ".env.*", "*.pem", "*.key",
                 "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*", "id_ed25519*", ".netrc", ".pypirc", ".npmrc",
                 "credentials*", ".git-credentials")
SKIPPED_PARTS = ("__pycache__", ".git", ".kaggle-runner", ".venv", "outputs")
SNAPSHOT_NAME = "job-files.json"


class JobFilesError(KaggleRunnerError):
    pass


def helper_source() -> bytes:
    return resources.files("kaggle_runner.kernel_template").joinpath(HELPER_NAME).read_bytes()


def collect(config: RunConfig, config_dir: Path) -> dict[str, bytes]:
    """The script, the files its globs match (default: the .py files beside it) and its requirements file, by
    path relative to the config's folder, plus the helper module; every check before anything is pushed."""
    if not config.script:
        raise JobFilesError("this configuration has no [job] script")
    root = config_dir.resolve()
    script_rel, script = _inside(root, config.script, "script")
    if not script.is_file():
        raise JobFilesError(f"script {config.script!r} is not a file under {root}; set script in [job]")
    patterns = config.files if config.files is not None else [str(PurePosixPath(config.script).parent / "*.py")]
    # Each file by the name the user sees (a link keeps its own name: the script is run by it), read from where
    # it really is, which must be inside the folder too.
    chosen: dict[str, Path] = {script_rel: script}
    for pattern in patterns:
        if PurePosixPath(pattern).is_absolute() or ".." in PurePosixPath(pattern).parts:
            raise JobFilesError(f"files pattern {pattern!r} must stay inside {root} (a relative glob)")
        for path in sorted(root.glob(pattern)):
            if path.is_file() and not set(path.relative_to(root).parts) & set(SKIPPED_PARTS):
                rel, real = _inside(root, path.relative_to(root).as_posix(), "file")
                chosen[rel] = real
    if config.requirements:
        rel, requirements = _inside(root, config.requirements, "requirements")
        if not requirements.is_file():
            raise JobFilesError(f"requirements {config.requirements!r} is not a file under {root}")
        chosen[rel] = requirements
    for rel, real in chosen.items():
        if any(fnmatch.fnmatch(name.lower(), never) for name in (PurePosixPath(rel).name, real.name)
               for never in NEVER_SHIPPED):
            raise JobFilesError(f"{rel} looks like credentials or an environment file and is never shipped; "
                                "narrow files in [job]")
    if HELPER_NAME in chosen:
        raise JobFilesError(f"{HELPER_NAME} is kaggle-runner's helper, shipped with every job: rename your file")
    sizes = {rel: real.stat().st_size for rel, real in chosen.items()}  # before reading: a glob may match gigabytes
    total = sum(sizes.values())
    if total > MAX_SHIPPED_BYTES:
        biggest = sorted(sizes, key=lambda rel: -sizes[rel])[:3]
        raise JobFilesError(f"the job's files add up to {total / 2**20:.1f} MiB, over the {MAX_SHIPPED_BYTES // 2**20} "
                            f"MiB one pushed script carries (largest: {', '.join(biggest)}); put data in a dataset "
                            "(dataset_sources) and narrow files in [job]")
    return {**{rel: real.read_bytes() for rel, real in chosen.items()}, HELPER_NAME: helper_source()}


def _inside(root: Path, rel: str, what: str) -> tuple[str, Path]:
    """`rel` as the name it is shipped under (normalised, never leaving the folder) and the file it really is."""
    name = posixpath.normpath(rel)
    real = (root / name).resolve()
    if "\\" in rel or name.startswith(("../", "/")) or name in ("..", ".") or not real.is_relative_to(root):
        raise JobFilesError(f"{what} {rel!r} must be a path inside {root}")
    return name, real


def encoded(files: dict[str, bytes]) -> dict[str, str]:
    """The files as the job kernel's FILES block: base64 text, so any byte survives the trip."""
    return {rel: base64.b64encode(data).decode("ascii") for rel, data in sorted(files.items())}


def save_snapshot(files: dict[str, bytes], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(encoded(files), sort_keys=True).encode()).hexdigest()
    (folder / SNAPSHOT_NAME).write_text(json.dumps({"sha256": digest, "files": encoded(files)}))


def load_snapshot(folder: Path) -> dict[str, bytes]:
    path = folder / SNAPSHOT_NAME
    try:
        data = json.loads(path.read_text())
        files = {rel: base64.b64decode(text, validate=True) for rel, text in data["files"].items()}
        digest = hashlib.sha256(json.dumps(data["files"], sort_keys=True).encode()).hexdigest()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise JobFilesError(f"the job's files kept at launch are missing or damaged ({path}); launch the job "
                            "again") from None
    if digest != data.get("sha256"):
        raise JobFilesError(f"the job's files kept at launch were changed ({path}); launch the job again")
    return files
