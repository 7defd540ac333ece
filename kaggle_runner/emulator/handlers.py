"""The kernel RPCs and the registry of every RPC served: read the body as the client sends it, call the backend,
shape the reply. Dataset and blob RPCs are in dataset_handlers.py; what both share, in rpc.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC

from kaggle_runner.emulator import dataset_handlers as datasets
from kaggle_runner.emulator.errors import BadRequest, NotFound
from kaggle_runner.emulator.models import (
    CANCEL_DENIED_MESSAGE,
    NO_RUNS_MESSAGE,
    TERMINAL,
    WEEKLY_GPU_SECONDS,
    WEEKLY_TPU_SECONDS,
    SessionLimitReached,
)
from kaggle_runner.emulator.rpc import (
    Redirect,
    RequestContext,
    duration,
    integer,
    name,
    page,
    required,
    split_ref,
    timestamp,
)
from kaggle_runner.states import KaggleStatus

__all__ = ["RPCS", "Redirect", "RequestContext"]


# -- kernels -----------------------------------------------------------------------------------------
def save_kernel(ctx: RequestContext, body: dict) -> dict:
    owner, slug = split_ref(required(body, "slug"))
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
    timeout = integer(body, "sessionTimeoutSeconds", 0) or None
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
                                                                            required(body, "text"), settings)
    except SessionLimitReached as exc:  # Kaggle answers 200 with the refusal in `error`, version 0
        return {"error": str(exc), "versionNumber": 0}
    return {"ref": f"/code/{owner}/{slug}", "url": f"{ctx.base_url}/code/{owner}/{slug}",
            "versionNumber": version.number, "kernelId": kernel.id, "invalidDatasetSources": invalid,
            "invalidKernelSources": invalid_kernels}


def get_kernel_session_status(ctx: RequestContext, body: dict) -> dict:
    _, version = ctx.backend.get_version(name(body, "userName"), name(body, "kernelSlug"),
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
    owner, slug = name(body, "userName"), name(body, "kernelSlug")
    _, version = ctx.backend.get_version(owner, slug, body.get("versionLabel"))
    listed = ctx.backend.outputs_listed(version)
    files = ctx.backend.output_files(owner, slug, version) if listed else []
    shown, token = page(files, body)
    reply = {"files": [{"fileName": rel, "url": ctx.sign(f"/files/{owner}/{slug}/{version.number}/{rel}")}
                       for rel, _ in shown], "nextPageToken": token}
    if not body.get("pageToken"):
        reply["log"] = json.dumps(ctx.backend.read_log_events(owner, slug, version))
    return reply


def cancel_kernel_session(ctx: RequestContext, body: dict) -> dict:
    session_id = integer(body, "kernelSessionId")
    if ctx.backend.realism.cancel_refused:
        return {"errorMessage": CANCEL_DENIED_MESSAGE}
    kernel, version = ctx.backend.find_session(session_id)
    if version.status in TERMINAL:
        return {"errorMessage": f"Kernel session is already {version.status.lower()}"}
    ctx.backend.runner.cancel(kernel, version)
    return {}


def get_kernel(ctx: RequestContext, body: dict) -> dict:
    owner, slug = name(body, "userName"), name(body, "kernelSlug")
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


def _last_run(kernel) -> float | None:
    return max((v.started_at for v in kernel.versions if v.started_at), default=None)


def list_kernels(ctx: RequestContext, body: dict) -> dict:
    """`kernels list`: every kernel of this account (its owner sees the private ones), by `--user`, `--mine`,
    `--search` and `--language`; most recently run first."""
    search = str(body.get("search") or "").lower()
    user = str(body.get("user") or "")
    language = str(body.get("language") or "all").lower()
    kernels = [k for k in ctx.backend.kernels.values()
               if (search in k.slug or search in k.title.lower()) and (not user or k.owner == user)
               and language in ("all", k.language)]
    kernels.sort(key=lambda k: -(_last_run(k) or 0.0))
    start = (integer(body, "page", 1) - 1) * integer(body, "pageSize", 20) if not body.get("pageToken") else None
    shown, token = page(kernels, body, start)
    return {"kernels": [{"id": k.id, "ref": f"{k.owner}/{k.slug}", "title": k.title, "author": k.owner,
                         "slug": k.slug, "language": k.language, "kernelType": k.kernel_type,
                         "isPrivate": k.is_private, "lastRunTime": timestamp(_last_run(k)), "totalVotes": 0,
                         "currentVersionNumber": len(k.versions)} for k in shown], "nextPageToken": token}


def list_kernel_files(ctx: RequestContext, body: dict) -> dict:
    """`kernels files`: a version's source files (its code file), not its outputs."""
    owner, slug = name(body, "userName"), name(body, "kernelSlug")
    _, version = ctx.backend.get_version(owner, slug, body.get("versionLabel"))
    source = ctx.backend.kernel_dir(owner, slug, version.number) / version.code_file
    files = [{"name": version.code_file, "size": source.stat().st_size if source.is_file() else 0,
              "creationDate": timestamp(version.created_at)}]
    shown, token = page(files, body)
    return {"files": shown, "nextPageToken": token}


def delete_kernel(ctx: RequestContext, body: dict) -> dict:
    ctx.backend.delete_kernel(name(body, "userName"), name(body, "kernelSlug"))
    return {}


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
        return {k: duration(v) for k, v in quota.items()}

    return {"quotaRefreshTime": refresh.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gpuQuota": shape(gpu), "tpuQuota": shape(tpu)}


RPCS: dict[tuple[str, str], Callable[[RequestContext, dict], dict | Redirect]] = {
    ("kernels.KernelsApiService", "SaveKernel"): save_kernel,
    ("kernels.KernelsApiService", "GetKernelSessionStatus"): get_kernel_session_status,
    ("kernels.KernelsApiService", "ListKernelSessionOutput"): list_kernel_session_output,
    ("kernels.KernelsApiService", "CancelKernelSession"): cancel_kernel_session,
    ("kernels.KernelsApiService", "GetKernel"): get_kernel,
    ("kernels.KernelsApiService", "ListKernels"): list_kernels,
    ("kernels.KernelsApiService", "GetAcceleratorQuotaStatistics"): accelerator_quota,
    ("kernels.KernelsApiService", "ListKernelFiles"): list_kernel_files,
    ("kernels.KernelsApiService", "DeleteKernel"): delete_kernel,
    ("blobs.BlobApiService", "StartBlobUpload"): datasets.start_blob_upload,
    ("datasets.DatasetApiService", "CreateDataset"): datasets.create_dataset,
    ("datasets.DatasetApiService", "CreateDatasetVersion"): datasets.create_dataset_version,
    ("datasets.DatasetApiService", "CreateDatasetVersionById"): datasets.create_dataset_version_by_id,
    ("datasets.DatasetApiService", "GetDatasetStatus"): datasets.get_dataset_status,
    ("datasets.DatasetApiService", "GetDataset"): datasets.get_dataset,
    ("datasets.DatasetApiService", "ListDatasetFiles"): datasets.list_dataset_files,
    ("datasets.DatasetApiService", "ListDatasets"): datasets.list_datasets,
    ("datasets.DatasetApiService", "GetDatasetMetadata"): datasets.get_dataset_metadata,
    ("datasets.DatasetApiService", "UpdateDatasetMetadata"): datasets.update_dataset_metadata,
    ("datasets.DatasetApiService", "DownloadDataset"): datasets.download_dataset,
    ("datasets.DatasetApiService", "DeleteDataset"): datasets.delete_dataset,
}
