"""Where requests go, and with which credentials: the one way every command connects.

Credentials go only to the endpoint given now (`--endpoint`, KAGGLE_RUNNER_API_ENDPOINT, or Kaggle's own),
never to one read from the run store: another local user who can write the workspace must not be able to send
your Kaggle key elsewhere by editing a column. A run recorded against another endpoint is refused in one line.
`--local` runs talk to this workspace's background emulator with its own local key, never a Kaggle account's.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from kaggle_runner.controller import ChainContext, ChainPace
from kaggle_runner.credentials import find_credentials
from kaggle_runner.display import Console
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.kaggle_api import PROD_ENDPOINT, KaggleGateway, kagglesdk_warning
from kaggle_runner.local import ensure_background_emulator, local_credentials
from kaggle_runner.store import Run, Store

ENDPOINT_VARIABLE = "KAGGLE_RUNNER_API_ENDPOINT"


def check_endpoint(endpoint: str | None, allow_http: bool = False) -> None:
    """Credentials go to the endpoint: never over plain http to a host that is not this machine, unasked."""
    if not endpoint:
        return
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise KaggleRunnerError(f"--endpoint {endpoint!r} is not an http(s) URL")
    if parsed.scheme == "https" or allow_http:
        return
    host = parsed.hostname
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise KaggleRunnerError(f"--endpoint {endpoint} is plain http to {host}, which would send your Kaggle "
                                "credentials unencrypted; use https, or set KAGGLE_RUNNER_ALLOW_HTTP=1 if you mean it")


def gateway_for(workspace: Path, local: bool, endpoint: str | None, notify: Callable[[str], None]) -> KaggleGateway:
    """A gateway to this workspace's emulator (`local`), or to `endpoint` (None: Kaggle) with the user's
    credentials."""
    if local:
        url = ensure_background_emulator(workspace)
        return KaggleGateway(url, local_credentials(workspace), notify=notify)
    check_endpoint(endpoint, allow_http=os.environ.get("KAGGLE_RUNNER_ALLOW_HTTP") == "1")
    credentials = find_credentials()  # clear errors for missing or world-readable files, before any request
    warning = kagglesdk_warning()
    if warning:
        notify(warning)
    return KaggleGateway(endpoint, credentials if credentials.username else None, notify=notify)


def endpoint_now(given: str | None = None) -> str | None:
    """The endpoint this command may talk to: the one given, else the environment's, else None (Kaggle)."""
    return given or os.environ.get(ENDPOINT_VARIABLE) or None


def _same(a: str | None, b: str | None) -> bool:
    return (a or PROD_ENDPOINT).rstrip("/") == (b or PROD_ENDPOINT).rstrip("/")


def context_for(workspace: str | Path, run: Run, console: Console | None = None,
                endpoint: str | None = None) -> ChainContext:
    """The context to act on `run`: its workspace's emulator for a --local run; else the endpoint given now,
    which must be the one the run was launched against (the store records it, and is never obeyed)."""
    console = console or Console()
    store = Store(workspace)
    now = endpoint_now(endpoint)
    if not run.local and not _same(run.endpoint, now):
        raise KaggleRunnerError(
            f"run {run.name} was launched against {run.endpoint or 'Kaggle'}, and this command talks to "
            f"{now or 'Kaggle'}; credentials go only where you say: pass --endpoint (or set {ENDPOINT_VARIABLE}) "
            "to the run's endpoint if you mean it")
    gateway = gateway_for(store.workspace, bool(run.local), None if run.local else now, console.note)
    return ChainContext(store, run.name, gateway, console, ChainPace.for_run(run))
