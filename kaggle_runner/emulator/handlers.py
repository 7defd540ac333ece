"""One function per RPC: read the request body as the client sends it, call the backend, shape the reply.

Bodies use lowerCamelCase keys and drop fields equal to their defaults (docs/emulator.md); replies use
camelCase keys, enum names as strings and durations as "<seconds>s".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC

from kaggle_runner.emulator.errors import BadRequest, NotFound
from kaggle_runner.emulator.models import (
    CANCEL_DENIED_MESSAGE,
    NO_RUNS_MESSAGE,
    TERMINAL,
    WEEKLY_GPU_SECONDS,
    WEEKLY_TPU_SECONDS,
    SessionLimitReached,
    check_name,
)
from kaggle_runner.emulator.state import Backend
from kaggle_runner.states import KaggleStatus


@dataclass
class RequestContext:
    backend: Backend
    base_url: str
    user: str
    sign: Callable[[str], str] = lambda path: path  # the server's signed URL for a path


def _required(body: dict, key: str) -> str:
    value = body.get(key)
    if value in (None, ""):
        raise BadRequest(f"Missing required field '{key}'")
    if not isinstance(value, str):
        raise BadRequest(f"Field '{key}' must be a string")
    return value


def _name(body: dict, key: str) -> str:
    return check_name(_required(body, key), key)


def _int(body: dict, key: str, default: int | None = None) -> int:
    value = body.get(key)
    if value in (None, ""):
        if default is None:
            raise BadRequest(f"Missing required field '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isascii() \
            or not str(value).strip().lstrip("-").isdigit():
        raise BadRequest(f"Field '{key}' must be an integer, not {value!r}")
    return int(value)


def _split_ref(ref: str) -> tuple[str, str]:
    parts = ref.strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise BadRequest(f"Invalid reference {ref!r}: expected owner/slug")
    return check_name(parts[0], "owner"), check_name(parts[1], "slug")


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


# -- kernels -----------------------------------------------------------------------------------------
def save_kernel(ctx: RequestContext, body: dict) -> dict:
    owner, slug = _split_ref(_required(body, "slug"))
    language = body.get("language") or "python"
    kernel_type = body.get("kernelType") or "script"
    if language != "python":
        raise BadRequest("The emulator runs Python kernels only")
    if kernel_type not in ("script", "notebook"):
        raise BadRequest(f"Unsupported kernel type {kernel_type!r}")
    sources = body.get("datasetDataSources") or []
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise BadRequest("datasetDataSources must be a list of owner/slug strings")
    kernel_sources = body.get("kernelDataSources") or []
    if not isinstance(kernel_sources, list) or not all(isinstance(s, str) for s in kernel_sources):
        raise BadRequest("kernelDataSources must be a list of owner/slug strings")
    timeout = _int(body, "sessionTimeoutSeconds", 0) or None
    if timeout is not None and timeout < 0:
        raise BadRequest("sessionTimeoutSeconds must not be negative")
    pinning = body.get("dockerImagePinningType") or None
    if pinning not in (None, "original", "latest"):
        raise BadRequest("dockerImagePinningType must be original or latest")
    shape = body.get("machineShape")
    settings = {
        "language": language, "kernel_type": kernel_type, "is_private": bool(body.get("isPrivate", False)),
        "enable_gpu": bool(body.get("enableGpu", False)), "enable_internet": bool(body.get("enableInternet", False)),
        "machine_shape": shape if isinstance(shape, str) and shape else None, "dataset_sources": sources,
        "kernel_sources": kernel_sources,
        "session_timeout_seconds": timeout,
        "quick_save": body.get("kernelExecutionType") == "QUICK_SAVE",
        "image_pinning": pinning,
    }
    try:
        kernel, version, invalid, invalid_kernels = ctx.backend.save_kernel(owner, slug, body.get("newTitle"),
                                                                            _required(body, "text"), settings)
    except SessionLimitReached as exc:  # Kaggle answers 200 with the refusal in `error`, version 0
        return {"error": str(exc), "versionNumber": 0}
    return {"ref": f"/code/{owner}/{slug}", "url": f"{ctx.base_url}/code/{owner}/{slug}",
            "versionNumber": version.number, "kernelId": kernel.id, "invalidDatasetSources": invalid,
            "invalidKernelSources": invalid_kernels}


def get_kernel_session_status(ctx: RequestContext, body: dict) -> dict:
    _, version = ctx.backend.get_version(_name(body, "userName"), _name(body, "kernelSlug"),
                                         body.get("versionLabel"))
    realism, age = ctx.backend.realism, ctx.backend.clock() - version.created_at
    if age < realism.status_404_window:
        raise NotFound(NO_RUNS_MESSAGE)  # the run does not exist yet, straight after a push
    injected = ctx.backend.take_status_name()
    if injected is not None:
        return {"status": injected}
    if age < realism.status_404_window + realism.new_script_window and version.status not in TERMINAL:
        return {"status": KaggleStatus.NEW_SCRIPT.value}
    reply = {"status": version.status}
    if version.failure_message:
        reply["failureMessage"] = version.failure_message
    return reply


def list_kernel_session_output(ctx: RequestContext, body: dict) -> dict:
    owner, slug = _name(body, "userName"), _name(body, "kernelSlug")
    _, version = ctx.backend.get_version(owner, slug, body.get("versionLabel"))
    listed = ctx.backend.outputs_listed(version)
    files = ctx.backend.output_files(owner, slug, version) if listed else []
    page_size = _int(body, "pageSize", 20)
    start = _int(body, "pageToken", 0)
    if page_size < 1 or start < 0:
        raise BadRequest("pageSize must be positive and pageToken a page the listing handed out")
    page = files[start:start + page_size]
    reply = {"files": [{"fileName": rel, "url": ctx.sign(f"/files/{owner}/{slug}/{version.number}/{rel}")}
                       for rel, _ in page],
             "nextPageToken": str(start + page_size) if start + page_size < len(files) else ""}
    if start == 0:
        reply["log"] = json.dumps(ctx.backend.read_log_events(owner, slug, version))
    return reply


def cancel_kernel_session(ctx: RequestContext, body: dict) -> dict:
    session_id = _int(body, "kernelSessionId")
    if ctx.backend.realism.cancel_refused:
        return {"errorMessage": CANCEL_DENIED_MESSAGE}
    kernel, version = ctx.backend.find_session(session_id)
    if version.status in TERMINAL:
        return {"errorMessage": f"Kernel session is already {version.status.lower()}"}
    ctx.backend.runner.cancel(kernel, version)
    return {}


def get_kernel(ctx: RequestContext, body: dict) -> dict:
    owner, slug = _name(body, "userName"), _name(body, "kernelSlug")
    label = body.get("versionLabel")
    kernel, version = ctx.backend.get_version(owner, slug, label) if label else \
        ctx.backend.current_version(owner, slug)
    source = (ctx.backend.kernel_dir(owner, slug, version.number) / version.code_file).read_text()
    return {"metadata": {"id": kernel.id, "ref": f"{owner}/{slug}", "title": kernel.title,
                         "language": kernel.language, "kernelType": kernel.kernel_type,
                         "isPrivate": kernel.is_private, "enableGpu": version.enable_gpu,
                         "enableInternet": version.enable_internet, "machineShape": version.machine_shape or "",
                         "datasetDataSources": version.dataset_sources, "kernelDataSources": version.kernel_sources,
                         "currentVersionNumber": version.number},
            "blob": {"source": source, "language": kernel.language, "kernelType": kernel.kernel_type,
                     "slug": slug}}


def list_kernels(ctx: RequestContext, body: dict) -> dict:
    search = str(body.get("search") or "").lower()
    kernels = [k for k in ctx.backend.kernels.values() if search in k.slug or search in k.title.lower()]
    return {"kernels": [{"id": k.id, "ref": f"{k.owner}/{k.slug}", "title": k.title, "author": k.owner,
                         "slug": k.slug, "totalVotes": 0} for k in kernels], "nextPageToken": ""}


def accelerator_quota(ctx: RequestContext, body: dict) -> dict:
    _, refresh = ctx.backend.quota_window()
    realism = ctx.backend.realism
    used, reserved = ctx.backend.gpu_seconds()
    gpu = {"timeUsed": used, "timeReserved": reserved,
           "totalTimeAllowed": realism.weekly_gpu_seconds or WEEKLY_GPU_SECONDS}
    tpu = {"timeUsed": 0.0, "timeReserved": 0.0, "totalTimeAllowed": WEEKLY_TPU_SECONDS}

    def shape(quota: dict) -> dict:
        if realism.quota_fields_absent:  # as a proto leaves out what it does not set
            quota = {k: v for k, v in quota.items() if v and k != "timeReserved"}
        return {k: _duration(v) for k, v in quota.items()}

    return {"quotaRefreshTime": refresh.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gpuQuota": shape(gpu), "tpuQuota": shape(tpu)}


# -- datasets and blobs ------------------------------------------------------------------------------
def start_blob_upload(ctx: RequestContext, body: dict) -> dict:
    blob = ctx.backend.start_blob_upload(_required(body, "name"), _int(body, "contentLength", 0))
    return {"token": blob.token, "createUrl": ctx.sign(f"/upload/{blob.token}")}


def _tokens(files: object) -> list[str]:
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("token"), str)
                                              for f in files):
        raise BadRequest("files must be a list of objects with a token")
    return [f["token"] for f in files]


def _created(dataset) -> dict:
    return {"ref": f"{dataset.owner}/{dataset.slug}", "url": f"/datasets/{dataset.owner}/{dataset.slug}",
            "status": "ok", "invalidTags": []}


def create_dataset(ctx: RequestContext, body: dict) -> dict:
    owner, slug = _name(body, "ownerSlug"), _name(body, "slug")
    title = _required(body, "title")
    if not 6 <= len(title) <= 50:
        raise BadRequest("The dataset title must be between 6 and 50 characters")
    tokens = _tokens(body.get("files") or [])
    create = {"title": title, "license_name": body.get("licenseName") or "unknown",
              "is_private": body.get("isPrivate", False)}
    dataset = ctx.backend.create_dataset_version(owner, slug, tokens, "Initial release", False, create=create)
    return _created(dataset)


def create_dataset_version(ctx: RequestContext, body: dict) -> dict:
    owner, slug = _name(body, "ownerSlug"), _name(body, "datasetSlug")
    version_body = body.get("body") or {}
    if not isinstance(version_body, dict):
        raise BadRequest("body must be an object")
    tokens = _tokens(version_body.get("files") or [])
    dataset = ctx.backend.create_dataset_version(owner, slug, tokens, str(version_body.get("versionNotes", "")),
                                                 bool(version_body.get("deleteOldVersions", False)))
    return _created(dataset)


def create_dataset_version_by_id(ctx: RequestContext, body: dict) -> dict:
    wanted = _int(body, "id")
    for dataset in ctx.backend.datasets.values():
        if dataset.id == wanted:
            return create_dataset_version(ctx, {"ownerSlug": dataset.owner, "datasetSlug": dataset.slug,
                                                "body": body.get("body")})
    raise BadRequest(f"Dataset {wanted} not found")


def get_dataset_status(ctx: RequestContext, body: dict) -> dict:
    return {"status": ctx.backend.dataset_status(_name(body, "ownerSlug"), _name(body, "datasetSlug"))}


def get_dataset(ctx: RequestContext, body: dict) -> dict:
    dataset = ctx.backend.visible_dataset(_name(body, "ownerSlug"), _name(body, "datasetSlug"))
    return {"id": dataset.id, "ref": f"{dataset.owner}/{dataset.slug}", "title": dataset.title,
            "isPrivate": dataset.is_private, "currentVersionNumber": len(dataset.versions)}


def list_dataset_files(ctx: RequestContext, body: dict) -> dict:
    """The files of a version (the newest unless datasetVersionNumber names one), as Kaggle lists them."""
    dataset = ctx.backend.visible_dataset(_name(body, "ownerSlug"), _name(body, "datasetSlug"))
    number = body.get("datasetVersionNumber") or len(dataset.versions)
    if not isinstance(number, int) or not 1 <= number <= len(dataset.versions):
        raise BadRequest(f"Dataset {dataset.owner}/{dataset.slug} has no version {number!r}")
    folder = ctx.backend.dataset_dir(dataset.owner, dataset.slug, number)
    return {"datasetFiles": [
        {"ref": name, "name": name, "datasetRef": f"{dataset.owner}/{dataset.slug}",
         "totalBytes": (folder / name).stat().st_size if (folder / name).is_file() else 0}
        for name in dataset.versions[number - 1].files]}


RPCS: dict[tuple[str, str], Callable[[RequestContext, dict], dict]] = {
    ("kernels.KernelsApiService", "SaveKernel"): save_kernel,
    ("kernels.KernelsApiService", "GetKernelSessionStatus"): get_kernel_session_status,
    ("kernels.KernelsApiService", "ListKernelSessionOutput"): list_kernel_session_output,
    ("kernels.KernelsApiService", "CancelKernelSession"): cancel_kernel_session,
    ("kernels.KernelsApiService", "GetKernel"): get_kernel,
    ("kernels.KernelsApiService", "ListKernels"): list_kernels,
    ("kernels.KernelsApiService", "GetAcceleratorQuotaStatistics"): accelerator_quota,
    ("blobs.BlobApiService", "StartBlobUpload"): start_blob_upload,
    ("datasets.DatasetApiService", "CreateDataset"): create_dataset,
    ("datasets.DatasetApiService", "CreateDatasetVersion"): create_dataset_version,
    ("datasets.DatasetApiService", "CreateDatasetVersionById"): create_dataset_version_by_id,
    ("datasets.DatasetApiService", "GetDatasetStatus"): get_dataset_status,
    ("datasets.DatasetApiService", "GetDataset"): get_dataset,
    ("datasets.DatasetApiService", "ListDatasetFiles"): list_dataset_files,
}
