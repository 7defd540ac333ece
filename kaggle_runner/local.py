"""The background emulator that --local starts for a workspace, and its local-only credentials.

Those credentials are the emulator's own (a random key, 0600 in the workspace), never a Kaggle account's.
The emulator starts with an allow-listed environment, so no real KAGGLE_KEY or token is handed to it or to
the kernels it runs. That keeps credentials out of the emulator's files, URLs and logs; it is not a sandbox.
A kernel is a process of the same user: it can read ~/.kaggle/kaggle.json by its absolute path and the
launcher's /proc/<pid>/environ. Run only kernels you would run as yourself (docs/emulator.md says more).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from kaggle_runner.credentials import Credentials
from kaggle_runner.errors import KaggleRunnerError

LOCAL_USER = "local"
KEY_VARIABLE = "KAGGLE_RUNNER_EMULATOR_KEY"
# The background emulator exits after this long without a request while nothing runs; the next --local
# command starts it again (its state is on disk).
IDLE_EXIT_SECONDS = 300


def _folder(workspace: Path) -> Path:
    folder = Path(workspace) / "emulator"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def local_credentials(workspace: Path) -> Credentials:
    path = _folder(workspace) / "local-credentials.json"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"username": LOCAL_USER, "key": secrets.token_hex(16)}, handle)
    data = json.loads(path.read_text())
    return Credentials(data["username"], key=data["key"], source="local emulator")


def _alive(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


@contextlib.contextmanager
def _startup_lock(folder: Path):
    """One starter at a time per workspace: two first --local uses must not start two emulators."""
    with open(folder / "start.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def emulator_environment(key: str) -> dict[str, str]:
    """What the background emulator may inherit: the allow-list (no KAGGLE_*), plus its own key and where this
    machine's Hugging Face caches are (paths only: it hands kernels the caches, never HF_HOME and its token)."""
    from kaggle_runner.emulator.runner import allowed_environment

    return {**allowed_environment(None, "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE"), KEY_VARIABLE: key}


def ensure_background_emulator(workspace: Path, startup_timeout: float = 60) -> str:
    """The URL of this workspace's emulator, starting it (detached, state kept in the workspace) if needed."""
    folder = _folder(workspace)
    with _startup_lock(folder):
        return _ensure_started(folder, workspace, startup_timeout)


def _ensure_started(folder: Path, workspace: Path, startup_timeout: float) -> str:
    info_path = folder / "server.json"
    if info_path.exists():
        url = json.loads(info_path.read_text())["url"]
        if _alive(url):
            return url
    credentials = local_credentials(workspace)
    ready = folder / "ready.json"
    ready.unlink(missing_ok=True)
    env = emulator_environment(credentials.key or "")
    with open(folder / "server.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kaggle_runner.cli", "emulator", "serve", "--port", "0",
             "--data-dir", str(folder / "data"), "--username", credentials.username or LOCAL_USER,
             "--idle-exit", str(IDLE_EXIT_SECONDS), "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + startup_timeout
    while time.time() < deadline:
        if ready.exists():
            url = json.loads(ready.read_text())["url"]
            info_path.write_text(json.dumps({"url": url, "pid": process.pid}))
            if _alive(url):
                return url
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise KaggleRunnerError(f"the local emulator did not start; see {folder / 'server.log'}")


def stop_background_emulator(workspace: Path) -> str:
    info_path = _folder(workspace) / "server.json"
    if not info_path.exists():
        return "No local emulator is running for this workspace."
    info = json.loads(info_path.read_text())
    try:
        os.killpg(info["pid"], signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        info_path.unlink(missing_ok=True)
        return "The local emulator had already stopped."
    for _ in range(100):
        if not _alive(info["url"]):
            break
        time.sleep(0.1)
    info_path.unlink(missing_ok=True)
    return f"Stopped the local emulator at {info['url']} (its data stays in the workspace)."


def hub_downloads_offline(config, config_dir: Path) -> list[str]:
    """What a --local kernel of this config would fetch from the Hugging Face hub and cannot (the emulator gives
    kernels no internet), leaving out what this machine's hub cache already holds: one line each, saying what to
    use instead."""
    if config.is_job:  # a script's downloads are its own business
        return []
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache/huggingface")
               / "hub")

    def cached(kind: str, repo: str) -> bool:
        return (hub / f"{kind}--{repo.replace('/', '--')}").is_dir()

    def here(value: str) -> bool:
        path = Path(value).expanduser()
        return (path if path.is_absolute() else config_dir / path).exists()

    missing = []
    if config.init_from and not here(config.init_from) and not cached("models", config.init_from):
        missing.append(f"init_from {config.init_from!r} is a Hugging Face hub id: set it to a save_pretrained "
                       "folder on this machine")
    if not config.init_from and config.tokenizer == "gpt2" and not cached("models", "gpt2"):
        missing.append('tokenizer "gpt2" comes from the hub: set tokenizer = "bpe" (trained on your data)')
    if config.dataset in ("wikitext-2", "wikitext-103") and not config.data_dir \
            and not cached("datasets", "Salesforce/wikitext"):
        missing.append(f"dataset {config.dataset!r} comes from the hub: set data_dir to a folder of text files, or "
                       'dataset = "stdlib-docs"')
    if config.dataset.startswith("hf:") and not config.data_dir and not here(config.dataset[3:]) \
            and not cached("datasets", config.dataset[3:]):
        missing.append(f"dataset {config.dataset!r} comes from the hub: use a folder saved with save_to_disk")
    return missing

