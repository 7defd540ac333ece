"""Start an emulator and point the unmodified official client at it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests

USER, KEY = "alice", "s3cret-key-123"


def official_client(url: str, monkeypatch, username: str = USER, key: str = KEY):
    """KaggleApi exactly as users get it; only the PROD endpoint is pointed at the emulator."""
    import kagglesdk.kaggle_env as kaggle_env

    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, url)
    monkeypatch.setenv("KAGGLE_USERNAME", username)
    monkeypatch.setenv("KAGGLE_KEY", key)
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    return api


def write_kernel(folder: Path, code: str, slug: str = "hello-kernel", title: str = "Hello Kernel",
                 **metadata) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(code)
    (folder / "kernel-metadata.json").write_text(json.dumps({
        "id": f"{USER}/{slug}", "title": title, "code_file": "main.py", "language": "python",
        "kernel_type": "script", "is_private": True, "enable_gpu": True, "enable_internet": False,
        "machine_shape": "NvidiaTeslaT4", **metadata}))
    return folder


def write_dataset(folder: Path, slug: str, files: dict[str, bytes], title: str = "Checkpoint Data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    (folder / "dataset-metadata.json").write_text(json.dumps({
        "id": f"{USER}/{slug}", "title": title, "licenses": [{"name": "CC0-1.0"}]}))
    return folder


def wait_for(api, ref: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = api.kernels_status(ref).status.name
        if status not in ("QUEUED", "RUNNING", "CANCEL_REQUESTED"):
            return status
        time.sleep(0.2)
    raise TimeoutError(f"{ref} still running after {timeout}s")


def admin(url: str, path: str, body: dict | None = None) -> dict:
    response = requests.post(f"{url}/admin/{path}", json=body or {}, auth=(USER, KEY), timeout=10)
    response.raise_for_status()
    return response.json()
