"""The only module that imports the official `kaggle` client. Everything Kaggle goes through here.

It points the client at another host when asked (an emulator), supplies explicit credentials, retries
what the client does not (429, 5xx, dropped connections: with backoff and jitter, one line to the user),
and never retries a push blindly.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from kaggle_runner.credentials import Credentials
from kaggle_runner.errors import KaggleRunnerError

PROD_ENDPOINT = "https://api.kaggle.com"
RETRY_STATUSES = {429, 500, 502, 503, 504}


class KaggleApiError(KaggleRunnerError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class GpuSessionsBusy(KaggleApiError):
    """A push refused because the account's GPU sessions (two at most) are all in use: nothing landed."""


@dataclass(frozen=True)
class PushResult:
    version: int
    kernel_id: int
    url: str


@dataclass(frozen=True)
class OutputFile:
    name: str
    url: str


def _import_client(endpoint: str):
    """Import kaggle without its import-time authentication reaching api.kaggle.com by surprise."""
    import kagglesdk.kaggle_env as kaggle_env

    if "kaggle" not in sys.modules:
        original = kaggle_env._env_to_endpoint[kaggle_env.KaggleEnv.PROD]
        kaggle_env._env_to_endpoint[kaggle_env.KaggleEnv.PROD] = endpoint
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                import kaggle  # noqa: F401  (authenticates at import; its errors are swallowed by design)
        finally:
            kaggle_env._env_to_endpoint[kaggle_env.KaggleEnv.PROD] = original
    from kaggle.api.kaggle_api_extended import KaggleApi

    return KaggleApi


def _status_of(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(error: Exception) -> bool:
    if isinstance(error, requests.HTTPError):
        return _status_of(error) in RETRY_STATUSES
    return isinstance(error, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError)


def explain(error: Exception, what: str) -> KaggleApiError:
    status = _status_of(error)
    if status == 401:
        return KaggleApiError(f"{what}: Kaggle refused the credentials (401); check kaggle.json or "
                              "KAGGLE_USERNAME/KAGGLE_KEY", status)
    if status == 403:
        return KaggleApiError(f"{what}: permission denied (403): {error}", status)
    if status == 404:
        return KaggleApiError(f"{what}: not found (404): {error}", status)
    if status == 429:
        return KaggleApiError(f"{what}: Kaggle is rate-limiting requests (429); wait a few minutes", status)
    if status and status >= 500:
        return KaggleApiError(f"{what}: Kaggle's server failed ({status}); try again later", status)
    if isinstance(error, requests.ConnectionError):
        return KaggleApiError(f"{what}: cannot reach the Kaggle API ({type(error).__name__})")
    return KaggleApiError(f"{what}: {error}", status)


class KaggleGateway:
    def __init__(self, endpoint: str | None = None, credentials: Credentials | None = None,
                 notify: Callable[[str], None] | None = None, attempts: int = 6, base_delay: float = 1.0):
        self.endpoint = (endpoint or PROD_ENDPOINT).rstrip("/")
        self.notify = notify or (lambda message: print(message, file=sys.stderr))
        self.attempts, self.base_delay = attempts, base_delay
        self._api = self._build(credentials)

    def _build(self, credentials: Credentials | None):
        api_class = _import_client(self.endpoint)
        endpoint = self.endpoint

        class PointedApi(api_class):  # type: ignore[misc, valid-type]
            def build_kaggle_client(self):
                client = super().build_kaggle_client()
                http = client._http_client
                http._endpoint = endpoint
                if credentials is not None:
                    # Explicit credentials win over whatever the environment holds (the client would
                    # otherwise send a KAGGLE_API_TOKEN from the environment to any host).
                    from kagglesdk.kaggle_http_client import KaggleHttpClient

                    http._signed_in = True
                    http._init_session()
                    http._session.auth = (KaggleHttpClient.BearerAuth(credentials.token) if credentials.token
                                          else (credentials.username, credentials.key))
                return client

        api = PointedApi()
        if credentials is not None and credentials.username:
            api.config_values = {api.CONFIG_NAME_USER: credentials.username, api.CONFIG_NAME_KEY: credentials.key}
        else:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    api.authenticate()
            except SystemExit:
                raise KaggleApiError("the Kaggle client found no usable credentials; see "
                                     "https://www.kaggle.com/settings (API > Create New Token)") from None
            except Exception as exc:
                raise explain(exc, "authenticating") from None
        return api

    @property
    def username(self) -> str:
        return str(self._api.config_values.get(self._api.CONFIG_NAME_USER) or "")

    # -- retries -------------------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    return fn()
            except Exception as exc:
                if not _is_transient(exc) or attempt == self.attempts:
                    raise explain(exc, what) from None
                delay = min(60.0, self.base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                status = _status_of(exc)
                reason = f"HTTP {status}" if status else type(exc).__name__
                self.notify(f"note: {what} failed ({reason}); retrying in {delay:.1f}s "
                            f"(attempt {attempt + 1}/{self.attempts})")
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _sdk(self):
        return self._api.build_kaggle_client()

    def _unless_missing(self, what: str, fn: Callable[[], Any]) -> Any:
        """`call`, but None where Kaggle answers 404: "does not exist yet" is an answer, not an error."""
        try:
            return self.call(what, fn)
        except KaggleApiError as exc:
            if exc.status == 404:
                return None
            raise

    # -- kernels -------------------------------------------------------------------------------------
    def current_version(self, ref: str) -> tuple[int, int] | None:
        """(newest version number, kernel id), or None if the kernel does not exist yet."""
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelRequest

        owner, slug = ref.split("/")

        def get():
            with self._sdk() as kaggle:
                request = ApiGetKernelRequest()
                request.user_name, request.kernel_slug = owner, slug
                return kaggle.kernels.kernels_api_client.get_kernel(request)

        response = self._unless_missing(f"looking up kernel {ref}", get)
        number = response.metadata.current_version_number if response else None
        return (number, response.metadata.id) if number else None

    def push(self, folder: Path, timeout_seconds: int | None, known_version: int | None) -> PushResult:
        """Push once. If the push fails in a way that may have landed, look before trying again."""
        ref = json.loads((folder / "kernel-metadata.json").read_text())["id"]
        for attempt in range(1, self.attempts + 1):
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    response = self._api.kernels_push(str(folder), timeout=str(timeout_seconds or ""))
            except ValueError as exc:  # the client's own validation of the folder
                raise KaggleApiError(f"the kernel folder was refused by the kaggle client: {exc}") from None
            except Exception as exc:
                if not _is_transient(exc) or attempt == self.attempts:
                    raise explain(exc, f"pushing {ref}") from None
                landed = self.current_version(ref)
                if landed is not None and landed[0] != known_version:
                    self.notify(f"note: the push of {ref} failed ({type(exc).__name__}) but version {landed[0]} "
                                "landed; following it")
                    return PushResult(landed[0], landed[1], "")
                delay = self.base_delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                self.notify(f"note: pushing {ref} failed ({_status_of(exc) or type(exc).__name__}); "
                            f"nothing landed, pushing again in {delay:.1f}s")
                time.sleep(delay)
                continue
            if response.error:
                # Kaggle's wording: "Maximum batch GPU session count of 2 reached."
                if any(words in response.error.lower() for words in ("session count", "concurrent")):
                    raise GpuSessionsBusy(f"Kaggle refused the push: {response.error}")
                raise KaggleApiError(f"Kaggle refused the push: {response.error}")
            if response.invalid_dataset_sources:
                raise KaggleApiError(f"Kaggle did not attach {', '.join(response.invalid_dataset_sources)}: "
                                     "the dataset does not exist or is not ready")
            return PushResult(response.version_number, response.kernel_id, response.url)
        raise AssertionError("unreachable")

    def status(self, ref: str, version: int) -> tuple[str, str | None]:
        response = self.call(f"checking {ref} v{version}",
                             lambda: self._api.kernels_status(f"{ref}/{version}"))
        return response.status.name, response.failure_message or None

    def list_output(self, ref: str, version: int) -> tuple[list[OutputFile], str]:
        from kagglesdk.kernels.types.kernels_api_service import ApiListKernelSessionOutputRequest

        owner, slug = ref.split("/")
        files: list[OutputFile] = []
        log, token = "", ""
        while True:
            def page(token=token):
                with self._sdk() as kaggle:
                    request = ApiListKernelSessionOutputRequest()
                    request.user_name, request.kernel_slug = owner, slug
                    request.version_label = f"v{version}"
                    request.page_size = 100
                    request.page_token = token
                    return kaggle.kernels.kernels_api_client.list_kernel_session_output(request)

            response = self.call(f"listing the output of {ref} v{version}", page)
            files += [OutputFile(f.file_name, f.url) for f in response.files or []]
            log = log or response.log or ""
            token = response.next_page_token
            if not token:
                return files, log

    def download(self, ref: str, version: int, target: Path, pattern: str, force: bool = False) -> int:
        """Output files matching `pattern` into `target` (the client resumes partial files); bytes fetched."""
        before = _tree_size(target)
        self.call(f"downloading output of {ref} v{version}",
                  lambda: self._api.kernels_output(f"{ref}/{version}", str(target), file_pattern=pattern,
                                                   force=force, quiet=True))
        return max(0, _tree_size(target) - before)

    def log(self, ref: str, version: int) -> str:
        return self.call(f"reading the log of {ref} v{version}", lambda: self._api.kernels_logs(f"{ref}/{version}"))

    def log_stream(self, ref: str, version: int) -> Iterator[dict]:
        yield from self._api.kernels_logs_stream(f"{ref}/{version}")

    def cancel(self, session_id: int) -> str | None:
        from kagglesdk.kernels.types.kernels_api_service import ApiCancelKernelSessionRequest

        def cancel():
            with self._sdk() as kaggle:
                request = ApiCancelKernelSessionRequest()
                request.kernel_session_id = session_id
                return kaggle.kernels.kernels_api_client.cancel_kernel_session(request)

        return self.call(f"cancelling session {session_id}", cancel).error_message or None

    def quota(self) -> dict[str, Any]:
        response = self.call("reading the GPU quota", self._api.quota_view)
        gpu = response.gpu_quota
        return {"used_seconds": gpu.time_used.total_seconds() if gpu else 0.0,
                "total_seconds": gpu.total_time_allowed.total_seconds() if gpu else 0.0,
                "refresh": response.quota_refresh_time.isoformat() if response.quota_refresh_time else None}

    # -- datasets ------------------------------------------------------------------------------------
    def dataset_status(self, ref: str) -> str | None:
        return self._unless_missing(f"checking dataset {ref}", lambda: self._api.dataset_status(ref))

    def dataset_version(self, ref: str) -> int | None:
        """The dataset's newest version number, or None if it does not exist."""
        from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetRequest

        owner, slug = ref.split("/")

        def get():
            with self._sdk() as kaggle:
                request = ApiGetDatasetRequest()
                request.owner_slug, request.dataset_slug = owner, slug
                return kaggle.datasets.dataset_api_client.get_dataset(request)

        response = self._unless_missing(f"looking up dataset {ref}", get)
        return (response.current_version_number or None) if response else None

    def create_dataset(self, folder: Path) -> None:
        response = self.call("creating the checkpoint dataset",
                             lambda: self._api.dataset_create_new(str(folder), public=False, quiet=True))
        if response.status != "ok" and response.error:
            raise KaggleApiError(f"Kaggle refused the checkpoint dataset: {response.error}")

    def create_dataset_version(self, folder: Path, notes: str) -> None:
        response = self.call("uploading a checkpoint dataset version",
                             lambda: self._api.dataset_create_version(str(folder), notes, quiet=True,
                                                                      delete_old_versions=True))
        if response.status != "ok" and response.error:
            raise KaggleApiError(f"Kaggle refused the checkpoint dataset version: {response.error}")


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
