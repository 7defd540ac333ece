"""The only module that imports the official `kaggle` client. Everything Kaggle goes through here.

It points the client at another host when asked (an emulator), supplies explicit credentials, retries
what the client does not (429 with its Retry-After, 5xx, dropped connections: one policy, capped backoff
with jitter, one note per outage), reads Kaggle's refusals (HTTP 200 with `error` set) into typed errors,
and never retries a push blindly.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import requests
import tenacity

from kaggle_runner import waits
from kaggle_runner.credentials import Credentials
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.kaggle_errors import (
    MAX_RETRY_DELAY,
    DatasetSlugTaken,
    GpuSessionsBusy,
    KaggleApiError,
    OutputFile,
    PushRefused,
    PushResult,
    PushUncertain,
    QuotaExhausted,
    QuotaProjected,
    SourcesNotAttached,
    backoff,
    explain,
    is_transient,
    may_have_landed,
    retry_after,
    status_of,
)

__all__ = ["DatasetSlugTaken", "GpuSessionsBusy", "KaggleApiError", "KaggleGateway", "OutputFile", "PushRefused",
           "PushResult", "PushUncertain", "QuotaExhausted", "QuotaProjected", "SourcesNotAttached", "kagglesdk_warning"]

PROD_ENDPOINT = "https://api.kaggle.com"
# The kagglesdk versions whose private hooks (below) this module was tested with; pyproject pins the range.
KNOWN_KAGGLESDK = ("0.1.38",)


# -- kagglesdk's private parts, all in one place --------------------------------------------------------
# The client has no public way to choose the host or to pass credentials explicitly; these four hooks do.
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


def _point_http_client(http, endpoint: str, credentials: Credentials | None) -> None:
    http._endpoint = endpoint
    if credentials is not None:
        # Explicit credentials win over whatever the environment holds (the client would otherwise send a
        # KAGGLE_API_TOKEN from the environment to any host).
        from kagglesdk.kaggle_http_client import KaggleHttpClient

        http._signed_in = True
        http._init_session()
        http._session.auth = (KaggleHttpClient.BearerAuth(credentials.token) if credentials.token
                              else (credentials.username, credentials.key))


class _RawAnswer:
    """A response type for the client's own HTTP path that keeps the JSON as it came: a status value the
    installed kagglesdk's enums do not know (NEW_SCRIPT on older ones, whatever Kaggle adds next) is then data
    for the launcher to read, not a KeyError inside the client's parser."""

    @staticmethod
    def prepare_from(http_response) -> dict:
        try:
            answer = http_response.json()
        except ValueError:
            return {}
        return answer if isinstance(answer, dict) else {}


def _raw_call(client, service: str, method: str, request) -> dict:
    return client._http_client.call(service, method, request, _RawAnswer)


def kagglesdk_warning() -> str | None:
    """A note when the installed kagglesdk is not one these hooks were tested with."""
    try:
        version = metadata.version("kagglesdk")
    except metadata.PackageNotFoundError:
        return "warning: kagglesdk is not installed; reinstall kaggle-runner"
    if version not in KNOWN_KAGGLESDK:
        return (f"warning: kagglesdk {version} is untested with kaggle-runner (tested: {', '.join(KNOWN_KAGGLESDK)}); "
                "if Kaggle calls fail oddly, `pip install kagglesdk==" + KNOWN_KAGGLESDK[-1] + "`")
    return None


class KaggleGateway:
    def __init__(self, endpoint: str | None = None, credentials: Credentials | None = None,
                 notify: Callable[[str], None] | None = None, attempts: int = 6, base_delay: float = 1.0):
        self.endpoint = (endpoint or PROD_ENDPOINT).rstrip("/")
        self.notify = notify or (lambda message: print(message, file=sys.stderr))
        self.attempts, self.base_delay = attempts, base_delay
        self.requests = 0  # calls made (each retry counts), for measuring the launcher's request rate
        self._outage = False  # a retry note was shown and no call has succeeded since
        self._api = self._build(credentials)

    def _build(self, credentials: Credentials | None):
        api_class = _import_client(self.endpoint)
        endpoint = self.endpoint

        class PointedApi(api_class):  # type: ignore[misc, valid-type]
            def build_kaggle_client(self):
                client = super().build_kaggle_client()
                _point_http_client(client._http_client, endpoint, credentials)
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

    # -- the one retry policy and the one way to send an SDK request ------------------------------------
    def _wait(self, state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        told = retry_after(error) if error is not None else None
        return min(MAX_RETRY_DELAY, told) if told is not None else backoff(state.attempt_number, self.base_delay)

    def _before_sleep(self, what: str) -> Callable[[tenacity.RetryCallState], None]:
        def note(state: tenacity.RetryCallState) -> None:
            if self._outage:
                return  # one note per outage, not one per retry
            self._outage = True
            error = state.outcome.exception() if state.outcome else None
            status = status_of(error) if error is not None else None
            reason = f"HTTP {status}" if status else type(error).__name__
            self.notify(f"note: {what} failed ({reason}); retrying with backoff (up to {self.attempts} tries)")
        return note

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one Kaggle call under the retry policy; a failure that outlasts it becomes a KaggleApiError."""
        def attempt():
            self.requests += 1
            with contextlib.redirect_stdout(io.StringIO()):
                return fn()

        retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(self.attempts), wait=self._wait,
                                     retry=tenacity.retry_if_exception(is_transient),
                                     before_sleep=self._before_sleep(what), reraise=True)
        try:
            result = retrying(attempt)
        except KaggleRunnerError:
            raise
        except Exception as exc:
            raise explain(exc, what) from None
        self._outage = False
        return result

    def _sdk(self):
        return self._api.build_kaggle_client()

    def rpc(self, what: str, method: str, request) -> Any:
        """An SDK request: `method` is the client's path, e.g. "kernels.kernels_api_client.get_kernel"."""
        def send():
            with self._sdk() as kaggle:
                target = kaggle
                for part in method.split("."):
                    target = getattr(target, part)
                return target(request)

        return self.call(what, send)

    def _unless_missing(self, what: str, method: str, request, absent: tuple[int, ...] = (404,)) -> Any:
        """`rpc`, but None where Kaggle answers that the thing does not exist (yet)."""
        try:
            return self.rpc(what, method, request)
        except KaggleApiError as exc:
            if exc.status in absent:
                return None
            raise

    # -- kernels -------------------------------------------------------------------------------------
    def current_version(self, ref: str, pushed_before: bool = True) -> tuple[int, int] | None:
        """(newest version number, kernel id), or None if the kernel does not exist yet.

        Kaggle often answers 403 "Permission 'kernels.get' was denied" for a kernel that was never pushed:
        before a run's first push (`pushed_before=False`) 403 means absent too.
        """
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelRequest

        request = ApiGetKernelRequest()
        request.user_name, request.kernel_slug = ref.split("/")
        absent = (404,) if pushed_before else (403, 404)
        try:
            response = self._unless_missing(f"looking up kernel {ref}", "kernels.kernels_api_client.get_kernel",
                                            request, absent)
        except KaggleApiError as exc:
            if not pushed_before and (exc.status or 0) >= 500:
                raise KaggleApiError(f"{exc}. If an earlier push of {ref} was refused, Kaggle may have left an "
                                     f"empty notebook behind: delete it at https://www.kaggle.com/code/{ref} "
                                     "(or choose another slug), then launch again", exc.status) from None
            raise
        number = response.metadata.current_version_number if response else None
        return (number, response.metadata.id) if number else None

    def push(self, folder: Path, timeout_seconds: int | None, known_version: int | None) -> PushResult:
        """Push once. If the push fails in a way that may have landed, look before trying again."""
        metadata = json.loads((folder / "kernel-metadata.json").read_text())
        ref = metadata["id"]
        sources = [*(metadata.get("dataset_sources") or []), *(metadata.get("kernel_sources") or [])]
        for attempt in range(1, self.attempts + 1):
            try:
                self.requests += 1
                with contextlib.redirect_stdout(io.StringIO()):
                    response = self._api.kernels_push(str(folder), timeout=str(timeout_seconds or ""))
            except ValueError as exc:  # the client's own validation of the folder
                raise KaggleApiError(f"the kernel folder was refused by the kaggle client: {exc}") from None
            except Exception as exc:
                if not is_transient(exc) or attempt == self.attempts:
                    raise explain(exc, f"pushing {ref}") from None
                landed = self.current_version(ref, pushed_before=bool(known_version))
                if landed is not None and landed[0] != known_version:
                    self.notify(f"note: the push of {ref} failed ({type(exc).__name__}) but version {landed[0]} "
                                "landed; following it")
                    return PushResult(landed[0], landed[1], "")
                if may_have_landed(exc):  # Kaggle can take minutes to show a version: never guess, wait
                    raise PushUncertain(f"pushing {ref} failed ({status_of(exc) or type(exc).__name__}) after "
                                        "it may have landed") from None
                delay = retry_after(exc) or backoff(attempt, self.base_delay)
                self.notify(f"note: pushing {ref} failed ({status_of(exc) or type(exc).__name__}); "
                            f"nothing landed, pushing again in {delay:.1f}s")
                waits.sleep(delay)
                continue
            return self._read_push(ref, response, sources)
        raise AssertionError("unreachable")

    @staticmethod
    def _read_push(ref: str, response, sources: list[str] | tuple[str, ...] = ()) -> PushResult:
        """Kaggle refuses a push with HTTP 200, `error` set and version 0; a version of 0 alone is a refusal too."""
        error = (response.error or "").strip()
        if error:
            words = error.lower()
            if "session count" in words or "concurrent" in words:  # "Maximum batch GPU session count of 2 reached."
                raise GpuSessionsBusy(f"Kaggle refused the push: {error}")
            if "projected to exceed" in words:  # "... currently running sessions are projected to exceed ..."
                raise QuotaProjected(f"Kaggle refused the push: {error}")
            if "quota" in words:  # "Maximum weekly GPU quota of 30.00 hours reached."
                raise QuotaExhausted(f"Kaggle refused the push: {error}")
            named = [source for source in sources if source.lower() in words]
            if named and ("dataset" in words or "kernel" in words):  # a source it cannot attach (yet), named
                raise SourcesNotAttached(f"Kaggle refused the push of {ref}: {error}", named, None)
            raise PushRefused(f"Kaggle refused the push of {ref}: {error}")
        invalid = [*(response.invalid_dataset_sources or []), *(response.invalid_kernel_sources or [])]
        if invalid:
            landed = PushResult(response.version_number, response.kernel_id, response.url) \
                if response.version_number and response.version_number > 0 else None
            what = "the dataset does not exist or Kaggle does not see it yet" if response.invalid_dataset_sources \
                else "Kaggle cannot attach that kernel's outputs (none finished yet, or not allowed)"
            raise SourcesNotAttached(f"Kaggle did not attach {', '.join(invalid)} to {ref}"
                                     + (f" version {landed.version}" if landed else "") + f": {what}", invalid, landed)
        if not response.version_number or response.version_number <= 0:
            raise PushRefused(f"Kaggle accepted the push of {ref} but created no version (version "
                              f"{response.version_number}); nothing runs")
        return PushResult(response.version_number, response.kernel_id, response.url)

    def status(self, ref: str, version: int) -> tuple[str, str | None] | None:
        """(status, failure message); None while Kaggle does not show the version's run yet.

        Straight after a push Kaggle answers 404 "No runs found for this kernel" (or 403) until the run exists.
        """
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelSessionStatusRequest

        request = ApiGetKernelSessionStatusRequest()
        request.user_name, request.kernel_slug = ref.split("/")
        request.version_label = f"v{version}"
        try:
            answer = self.call(f"checking {ref} v{version}", lambda: self._raw_rpc(
                "kernels.KernelsApiService", "GetKernelSessionStatus", request))
        except KaggleApiError as exc:
            if exc.status in (403, 404):
                return None
            raise
        status = answer.get("status")
        message = answer.get("failureMessage")
        return (_enum_name(status, "KERNEL_WORKER_STATUS_") if status is not None else "QUEUED",
                message if isinstance(message, str) and message else None)

    def _raw_rpc(self, service: str, method: str, request) -> dict:
        with self._sdk() as kaggle:
            return _raw_call(kaggle, service, method, request)

    def list_output(self, ref: str, version: int) -> tuple[list[OutputFile], str]:
        from kagglesdk.kernels.types.kernels_api_service import ApiListKernelSessionOutputRequest

        owner, slug = ref.split("/")
        files: list[OutputFile] = []
        log, token = "", ""
        for _ in range(1000):  # 500 files a page at most: a bound, not a real limit
            request = ApiListKernelSessionOutputRequest()
            request.user_name, request.kernel_slug = owner, slug
            request.version_label = f"v{version}"
            request.page_size = 100
            request.page_token = token
            response = self.rpc(f"listing the output of {ref} v{version}",
                                "kernels.kernels_api_client.list_kernel_session_output", request)
            files += [OutputFile(f.file_name, f.url) for f in response.files or []]
            log = log or response.log or ""
            token = response.next_page_token
            if not token:
                break
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
        self.requests += 1
        try:
            yield from self._api.kernels_logs_stream(f"{ref}/{version}")
        except (requests.RequestException, ValueError) as exc:  # the client turns 401/403 into ValueError
            raise explain(exc, f"following the log of {ref} v{version}") from None

    def cancel(self, session_id: int) -> str | None:
        from kagglesdk.kernels.types.kernels_api_service import ApiCancelKernelSessionRequest

        request = ApiCancelKernelSessionRequest()
        request.kernel_session_id = session_id
        response = self.rpc(f"cancelling session {session_id}", "kernels.kernels_api_client.cancel_kernel_session",
                            request)
        return response.error_message or None

    def delete_kernel(self, ref: str) -> None:
        """Every version of the kernel goes (Kaggle deletes no single version)."""
        self.call(f"deleting kernel {ref}", lambda: self._api.kernels_delete(ref, no_confirm=True))

    def quota(self) -> dict[str, Any]:
        """GPU quota: used plus held back (timeUsed counts running sessions so far, timeReserved what each may still
        take, about 12 h minus its elapsed time), total, reset; None = unknown."""
        from kagglesdk.kernels.types.kernels_api_service import ApiGetAcceleratorQuotaStatisticsRequest

        response = self.rpc("reading the GPU quota", "kernels.kernels_api_client.get_accelerator_quota_statistics",
                            ApiGetAcceleratorQuotaStatisticsRequest())
        gpu = response.gpu_quota

        def seconds(name: str) -> float | None:
            value = getattr(gpu, name, None) if gpu is not None else None  # absent stays None: unknown
            return value.total_seconds() if value is not None else None

        used, reserved, total = seconds("time_used"), seconds("time_reserved"), seconds("total_time_allowed")
        return {"used_seconds": None if used is None else used + (reserved or 0.0),
                "reserved_seconds": reserved, "total_seconds": total,
                "refresh": response.quota_refresh_time.isoformat() if response.quota_refresh_time else None}

    # -- datasets ------------------------------------------------------------------------------------
    def dataset_status(self, ref: str) -> str | None:
        from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetStatusRequest

        request = ApiGetDatasetStatusRequest()
        request.owner_slug, request.dataset_slug = ref.split("/")
        try:
            answer = self.call(f"checking dataset {ref}", lambda: self._raw_rpc(
                "datasets.DatasetApiService", "GetDatasetStatus", request))
        except KaggleApiError as exc:
            if exc.status == 404:
                return None
            raise
        status = answer.get("status")
        return _enum_name(status, "DATABUNDLE_VERSION_STATUS_").lower() if status is not None else "not_yet_persisted"

    def dataset_version(self, ref: str) -> int | None:
        """The dataset's newest version number, or None if it does not exist (or is not visible yet)."""
        from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetRequest

        request = ApiGetDatasetRequest()
        request.owner_slug, request.dataset_slug = ref.split("/")
        response = self._unless_missing(f"looking up dataset {ref}", "datasets.dataset_api_client.get_dataset",
                                        request)
        return (response.current_version_number or None) if response else None

    def dataset_files(self, ref: str) -> set[str] | None:
        """Names of the files in the dataset's newest version (all pages), or None if it is not there."""
        from kagglesdk.datasets.types.dataset_api_service import ApiListDatasetFilesRequest

        names: set[str] = set()
        page_token = None
        while True:
            request = ApiListDatasetFilesRequest()
            request.owner_slug, request.dataset_slug = ref.split("/")
            request.page_size = 200
            request.page_token = page_token
            response = self._unless_missing(f"listing the files of dataset {ref}",
                                            "datasets.dataset_api_client.list_dataset_files", request)
            if response is None or response.error_message:
                return None
            names |= {f.name for f in response.dataset_files or [] if f and f.name}
            page_token = response.next_page_token
            if not page_token:
                return names

    @staticmethod
    def _quiet_upload() -> bool:
        """The client's own upload bar (bytes, rate, time left, on stderr) where a person watches a terminal."""
        return not sys.stderr.isatty()

    def create_dataset(self, folder: Path) -> None:
        try:
            response = self.call("creating the dataset",
                                 lambda: self._api.dataset_create_new(str(folder), public=False,
                                                                      quiet=self._quiet_upload()))
        except KaggleApiError as exc:
            if exc.status == 409 or "already in use" in str(exc):
                raise DatasetSlugTaken(str(exc), exc.status, transient=False) from None
            raise
        if response.status != "ok" and response.error:
            kind = DatasetSlugTaken if "already in use" in response.error else KaggleApiError
            raise kind(f"Kaggle refused the dataset: {response.error}")

    def create_dataset_version(self, folder: Path, notes: str, delete_old_versions: bool = False) -> None:
        response = self.call("uploading a dataset version",
                             lambda: self._api.dataset_create_version(str(folder), notes, quiet=self._quiet_upload(),
                                                                      delete_old_versions=delete_old_versions))
        if response.status != "ok" and response.error:
            raise KaggleApiError(f"Kaggle refused the dataset version: {response.error}")


def _enum_name(value: object, prefix: str) -> str:
    """An enum value as Kaggle sends it ("RUNNING", "running", "KERNEL_WORKER_STATUS_RUNNING", "blobsCopiedToSds")
    as its upper-case member name; the caller decides what a name it does not know means."""
    text = str(value)[:80]
    snake = "".join(f"_{c}" if c.isupper() and i and not text[i - 1].isupper() else c for i, c in enumerate(text))
    name = snake.upper().replace("__", "_")
    return name.removeprefix(prefix)


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
