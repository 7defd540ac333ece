"""One function per RPC: read the request body as the client sends it, call the backend, shape the reply.

Bodies use lowerCamelCase keys and drop fields equal to their defaults (docs/emulator.md); replies use
camelCase keys, enum names as strings and durations as "<seconds>s".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from urllib.parse import quote

from kaggle_runner.emulator.errors import BadRequest
from kaggle_runner.emulator.state import WEEKLY_GPU_SECONDS, WEEKLY_TPU_SECONDS, Backend, SessionLimitReached


@dataclass
class Context:
    backend: Backend
    base_url: str
    user: str


def _required(body: dict, key: str) -> str:
    value = body.get(key)
    if value in (None, ""):
        raise BadRequest(f"Missing required field '{key}'")
    return value


def _split_ref(ref: str) -> tuple[str, str]:
    parts = ref.strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise BadRequest(f"Invalid reference {ref!r}: expected owner/slug")
    return parts[0], parts[1]


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


# -- kernels -----------------------------------------------------------------------------------------
def save_kernel(ctx: Context, body: dict) -> dict:
    owner, slug = _split_ref(_required(body, "slug"))
    language = body.get("language") or "python"
    kernel_type = body.get("kernelType") or "script"
    if language != "python":
        raise BadRequest("The emulator runs Python kernels only")
    if kernel_type not in ("script", "notebook"):
        raise BadRequest(f"Unsupported kernel type {kernel_type!r}")
    settings = {
        "language": language, "kernel_type": kernel_type, "is_private": body.get("isPrivate", False),
        "enable_gpu": body.get("enableGpu", False), "enable_internet": body.get("enableInternet", False),
        "machine_shape": body.get("machineShape"), "dataset_sources": body.get("datasetDataSources", []),
        "session_timeout_seconds": body.get("sessionTimeoutSeconds"),
        "quick_save": body.get("kernelExecutionType") == "QUICK_SAVE",
    }
    try:
        kernel, version, invalid = ctx.backend.save_kernel(owner, slug, body.get("newTitle"),
                                                           _required(body, "text"), settings)
    except SessionLimitReached as exc:  # Kaggle answers 200 with the refusal in `error`
        return {"error": str(exc)}
    return {"ref": f"/code/{owner}/{slug}", "url": f"{ctx.base_url}/code/{owner}/{slug}",
            "versionNumber": version.number, "kernelId": kernel.id, "invalidDatasetSources": invalid}


def get_kernel_session_status(ctx: Context, body: dict) -> dict:
    _, version = ctx.backend.get_version(_required(body, "userName"), _required(body, "kernelSlug"),
                                         body.get("versionLabel"))
    reply = {"status": version.status}
    if version.failure_message:
        reply["failureMessage"] = version.failure_message
    return reply


def list_kernel_session_output(ctx: Context, body: dict) -> dict:
    owner, slug = _required(body, "userName"), _required(body, "kernelSlug")
    _, version = ctx.backend.get_version(owner, slug, body.get("versionLabel"))
    files = ctx.backend.output_files(owner, slug, version)
    page_size = int(body.get("pageSize") or 20)
    start = int(body.get("pageToken") or 0)
    page = files[start:start + page_size]
    reply = {"files": [{"fileName": rel, "url": f"{ctx.base_url}/files/{owner}/{slug}/{version.number}/"
                        f"{quote(rel)}"} for rel, _ in page],
             "nextPageToken": str(start + page_size) if start + page_size < len(files) else ""}
    if start == 0:
        reply["log"] = json.dumps(ctx.backend.read_log_events(owner, slug, version))
    return reply


def cancel_kernel_session(ctx: Context, body: dict) -> dict:
    kernel, version = ctx.backend.find_session(int(_required(body, "kernelSessionId")))
    if version.status in ("COMPLETE", "ERROR", "CANCEL_ACKNOWLEDGED"):
        return {"errorMessage": f"Kernel session is already {version.status.lower()}"}
    ctx.backend.runner.cancel(kernel, version)
    return {}


def get_kernel(ctx: Context, body: dict) -> dict:
    owner, slug = _required(body, "userName"), _required(body, "kernelSlug")
    kernel, version = ctx.backend.get_version(owner, slug, body.get("versionLabel"))
    source = (ctx.backend.kernel_dir(owner, slug, version.number) / version.code_file).read_text()
    return {"metadata": {"id": kernel.id, "ref": f"{owner}/{slug}", "title": kernel.title,
                         "language": kernel.language, "kernelType": kernel.kernel_type,
                         "isPrivate": kernel.is_private, "enableGpu": version.enable_gpu,
                         "enableInternet": version.enable_internet, "machineShape": version.machine_shape or "",
                         "datasetDataSources": version.dataset_sources, "currentVersionNumber": version.number},
            "blob": {"source": source, "language": kernel.language, "kernelType": kernel.kernel_type,
                     "slug": slug}}


def list_kernels(ctx: Context, body: dict) -> dict:
    search = (body.get("search") or "").lower()
    kernels = [k for k in ctx.backend.kernels.values() if search in k.slug or search in k.title.lower()]
    return {"kernels": [{"id": k.id, "ref": f"{k.owner}/{k.slug}", "title": k.title, "author": k.owner,
                         "slug": k.slug, "totalVotes": 0} for k in kernels], "nextPageToken": ""}


def accelerator_quota(ctx: Context, body: dict) -> dict:
    _, refresh = ctx.backend.quota_window()
    return {"quotaRefreshTime": refresh.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gpuQuota": {"timeUsed": _duration(ctx.backend.gpu_seconds_used()),
                         "totalTimeAllowed": _duration(WEEKLY_GPU_SECONDS)},
            "tpuQuota": {"timeUsed": _duration(0), "totalTimeAllowed": _duration(WEEKLY_TPU_SECONDS)}}


# -- datasets and blobs ------------------------------------------------------------------------------
def start_blob_upload(ctx: Context, body: dict) -> dict:
    blob = ctx.backend.start_blob_upload(_required(body, "name"), int(body.get("contentLength", 0)))
    return {"token": blob.token, "createUrl": f"{ctx.base_url}/upload/{blob.token}"}


def _created(dataset) -> dict:
    return {"ref": f"{dataset.owner}/{dataset.slug}", "url": f"/datasets/{dataset.owner}/{dataset.slug}",
            "status": "ok", "invalidTags": []}


def create_dataset(ctx: Context, body: dict) -> dict:
    owner, slug = _required(body, "ownerSlug"), _required(body, "slug")
    title = _required(body, "title")
    if not 6 <= len(title) <= 50:
        raise BadRequest("The dataset title must be between 6 and 50 characters")
    tokens = [f["token"] for f in body.get("files", [])]
    create = {"title": title, "license_name": body.get("licenseName") or "unknown",
              "is_private": body.get("isPrivate", False)}
    dataset = ctx.backend.create_dataset_version(owner, slug, tokens, "Initial release", False, create=create)
    return _created(dataset)


def create_dataset_version(ctx: Context, body: dict) -> dict:
    owner, slug = _required(body, "ownerSlug"), _required(body, "datasetSlug")
    version_body = body.get("body") or {}
    tokens = [f["token"] for f in version_body.get("files", [])]
    dataset = ctx.backend.create_dataset_version(owner, slug, tokens, version_body.get("versionNotes", ""),
                                                 bool(version_body.get("deleteOldVersions", False)))
    return _created(dataset)


def create_dataset_version_by_id(ctx: Context, body: dict) -> dict:
    wanted = int(_required(body, "id"))
    for dataset in ctx.backend.datasets.values():
        if dataset.id == wanted:
            return create_dataset_version(ctx, {"ownerSlug": dataset.owner, "datasetSlug": dataset.slug,
                                                "body": body.get("body")})
    raise BadRequest(f"Dataset {wanted} not found")


def get_dataset_status(ctx: Context, body: dict) -> dict:
    return {"status": ctx.backend.dataset_status(_required(body, "ownerSlug"), _required(body, "datasetSlug"))}


def get_dataset(ctx: Context, body: dict) -> dict:
    dataset = ctx.backend.get_dataset(_required(body, "ownerSlug"), _required(body, "datasetSlug"))
    return {"id": dataset.id, "ref": f"{dataset.owner}/{dataset.slug}", "title": dataset.title,
            "isPrivate": dataset.is_private, "currentVersionNumber": len(dataset.versions)}


RPCS: dict[tuple[str, str], Callable[[Context, dict], dict]] = {
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
}
