"""Start an emulator and point the unmodified official client at it.

Emulator tests run it on a ManualClock: emulator time stands still unless a test advances it, so "right after
a push" or "once the pin window has passed" is a fact the test sets, not a race with the machine's load. The
waiting helpers below (`wait_for`, `outputs`, `eventually`) wait on real processes, and let emulator time pass
in steps while they do (`api.emulator_clock`), as Kaggle's would.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

USER, KEY = "alice", "s3cret-key-123"


def quick_realism(**changes):
    """Kaggle's unkindness with sub-second windows, so tests meet every behaviour and stay quick."""
    from kaggle_runner.emulator.realism import Realism

    return Realism(**{"pin_window": 0.3, "dataset_404_window": 0.2, "status_404_window": 0.2, "output_lag": 0.2,
                      "kernel_source_window": 0.3, **changes})


POLL = 0.05  # seconds of real time between looks at a real process
TICK = 0.25  # seconds of emulator time each look lets pass


def eventually(condition, timeout: float = 60, clock=None, what: str = "the condition"):
    """condition()'s first truthy answer, looking every POLL seconds; emulator time moves TICK per look."""
    deadline = time.monotonic() + timeout
    while True:
        answer = condition()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        if clock is not None:
            clock.advance(TICK)
        time.sleep(POLL)


def official_client(url: str, monkeypatch, username: str = USER, key: str = KEY, clock=None):
    """KaggleApi exactly as users get it; only the PROD endpoint is pointed at the emulator."""
    import kagglesdk.kaggle_env as kaggle_env

    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, url)
    monkeypatch.setenv("KAGGLE_USERNAME", username)
    monkeypatch.setenv("KAGGLE_KEY", key)
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    api.emulator_clock = clock  # what `wait_for` and `outputs` let pass while they wait
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


def status_of(api, ref: str) -> str | None:
    """The version's status, or None while Kaggle still answers 404 "No runs found" after a push."""
    try:
        return api.kernels_status(ref).status.name
    except requests.HTTPError as error:
        if error.response is not None and error.response.status_code == 404:
            return None
        raise


def wait_for(api, ref: str, timeout: float = 60) -> str:
    """The version's terminal status, once it has one."""
    def ended() -> str | None:
        status = status_of(api, ref)
        return status if status not in (None, "NEW_SCRIPT", "QUEUED", "RUNNING", "CANCEL_REQUESTED") else None

    return eventually(ended, timeout, getattr(api, "emulator_clock", None), f"the end of {ref}")


def outputs(api, ref: str, path: Path, timeout: float = 30, **kwargs) -> list:
    """Download a finished version's outputs, waiting out the lag before Kaggle lists them."""
    log_file = Path(path) / f"{ref.split('/')[1]}.log"  # written from the listing's log field

    def listed() -> list | None:
        files, _ = api.kernels_output(ref, str(path), **kwargs)
        return files if [f for f in files if Path(f) != log_file] else None

    return eventually(listed, timeout, getattr(api, "emulator_clock", None), f"the outputs of {ref}")


def admin(url: str, path: str, body: dict | None = None) -> dict:
    response = requests.post(f"{url}/admin/{path}", json=body or {}, auth=(USER, KEY), timeout=10)
    response.raise_for_status()
    return response.json()


@contextlib.contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on this machine answering with `handler` (its request log silenced), as its base URL."""
    handler.log_message = lambda self, *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()

