"""The dataset RPCs (and blob uploads): read the body as the client sends it, call the backend, shape the reply.

What each one answers, and which of the official client's commands it serves: docs/emulator.md ("Served").
"""

from __future__ import annotations

from kaggle_runner.emulator.errors import BadRequest, Conflict
from kaggle_runner.emulator.models import Dataset
from kaggle_runner.emulator.rpc import Redirect, RequestContext, integer, name, page, required, timestamp


def start_blob_upload(ctx: RequestContext, body: dict) -> dict:
    blob = ctx.backend.start_blob_upload(required(body, "name"), integer(body, "contentLength", 0))
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
    owner, slug = name(body, "ownerSlug"), name(body, "slug")
    title = required(body, "title")
    if not 6 <= len(title) <= 50:
        raise BadRequest("The dataset title must be between 6 and 50 characters")
    tokens = _tokens(body.get("files") or [])
    create = {"title": title, "license_name": body.get("licenseName") or "unknown",
              "is_private": body.get("isPrivate", False), "subtitle": str(body.get("subtitle") or ""),
              "description": str(body.get("description") or "")}
    try:
        dataset = ctx.backend.create_dataset_version(owner, slug, tokens, "Initial release", False, create=create)
    except Conflict as taken:  # a slug or title in use: Kaggle answers 200 with `error` (the CLI prints it)
        return {"ref": "", "url": "", "status": "error", "error": taken.message}
    return _created(dataset)


def create_dataset_version(ctx: RequestContext, body: dict) -> dict:
    owner, slug = name(body, "ownerSlug"), name(body, "datasetSlug")
    version_body = body.get("body") or {}
    if not isinstance(version_body, dict):
        raise BadRequest("body must be an object")
    tokens = _tokens(version_body.get("files") or [])
    dataset = ctx.backend.create_dataset_version(owner, slug, tokens, str(version_body.get("versionNotes", "")),
                                                 bool(version_body.get("deleteOldVersions", False)))
    return _created(dataset)


def create_dataset_version_by_id(ctx: RequestContext, body: dict) -> dict:
    wanted = integer(body, "id")
    for dataset in ctx.backend.datasets.values():
        if dataset.id == wanted:
            return create_dataset_version(ctx, {"ownerSlug": dataset.owner, "datasetSlug": dataset.slug,
                                                "body": body.get("body")})
    raise BadRequest(f"Dataset {wanted} not found")


def get_dataset_status(ctx: RequestContext, body: dict) -> dict:
    return {"status": ctx.backend.dataset_status(name(body, "ownerSlug"), name(body, "datasetSlug"))}


def get_dataset(ctx: RequestContext, body: dict) -> dict:
    dataset = ctx.backend.visible_dataset(name(body, "ownerSlug"), name(body, "datasetSlug"))
    return {"id": dataset.id, "ref": f"{dataset.owner}/{dataset.slug}", "title": dataset.title,
            "isPrivate": dataset.is_private, "currentVersionNumber": len(dataset.versions)}


def _version_files(ctx: RequestContext, dataset: Dataset, number: int) -> list[dict]:
    folder = ctx.backend.dataset_dir(dataset.owner, dataset.slug, number)
    created = timestamp(dataset.versions[number - 1].created_at)
    ref = f"{dataset.owner}/{dataset.slug}"
    return [{"ref": file, "name": file, "datasetRef": ref, "ownerRef": dataset.owner, "creationDate": created,
             "totalBytes": (folder / file).stat().st_size if (folder / file).is_file() else 0}
            for file in dataset.versions[number - 1].files]


def list_dataset_files(ctx: RequestContext, body: dict) -> dict:
    """The files of a version (the newest unless datasetVersionNumber names one), as Kaggle lists them."""
    dataset = ctx.backend.visible_dataset(name(body, "ownerSlug"), name(body, "datasetSlug"))
    number = ctx.backend.dataset_version_number(dataset, body.get("datasetVersionNumber"))
    files, token = page(_version_files(ctx, dataset, number), body)
    return {"datasetFiles": files, "nextPageToken": token}


def _summary(ctx: RequestContext, dataset: Dataset) -> dict:
    """A dataset as ListDatasets and the CLI's table show it."""
    number = len(dataset.versions)
    total = sum(f["totalBytes"] for f in _version_files(ctx, dataset, number)) if number else 0
    return {"id": dataset.id, "ref": f"{dataset.owner}/{dataset.slug}", "title": dataset.title,
            "subtitle": dataset.subtitle, "ownerName": dataset.owner, "ownerRef": dataset.owner,
            "creatorName": dataset.owner, "url": f"{ctx.base_url}/datasets/{dataset.owner}/{dataset.slug}",
            "isPrivate": dataset.is_private, "licenseName": dataset.license_name, "totalBytes": total,
            "lastUpdated": timestamp(dataset.versions[-1].created_at if number else None),
            "currentVersionNumber": number, "downloadCount": 0, "voteCount": 0, "usabilityRating": 0.0}


def list_datasets(ctx: RequestContext, body: dict) -> dict:
    """`datasets list`: public datasets by default; `--mine` the caller's own; `--user` one account's (its private
    ones only to itself). Newest first; `search` matches slug and title."""
    group = str(body.get("group") or "DATASET_SELECTION_GROUP_PUBLIC").upper()
    user = str(body.get("user") or "")
    search = str(body.get("search") or "").lower()
    datasets = sorted(ctx.backend.datasets.values(), key=lambda d: -d.id)
    if group.endswith("_MY"):
        datasets = [d for d in datasets if d.owner == ctx.user]
    elif group.endswith("_USER") or user:
        datasets = [d for d in datasets if d.owner == user and (not d.is_private or user == ctx.user)]
    else:
        datasets = [d for d in datasets if not d.is_private]
    datasets = [d for d in datasets if search in d.slug or search in d.title.lower()]
    start = (integer(body, "page", 1) - 1) * integer(body, "pageSize", 20) if not body.get("pageToken") else None
    shown, token = page(datasets, body, start)
    return {"datasets": [_summary(ctx, d) for d in shown], "nextPageToken": token}


def _info(dataset: Dataset) -> dict:
    return {"datasetId": dataset.id, "datasetSlug": dataset.slug, "ownerUser": dataset.owner,
            "title": dataset.title, "subtitle": dataset.subtitle, "description": dataset.description,
            "isPrivate": dataset.is_private, "keywords": dataset.keywords,
            "licenses": [{"name": dataset.license_name}], "collaborators": [], "data": dataset.data,
            "usabilityRating": 0.0, "totalViews": 0, "totalVotes": 0, "totalDownloads": 0}


def get_dataset_metadata(ctx: RequestContext, body: dict) -> dict:
    dataset = ctx.backend.get_dataset(name(body, "ownerSlug"), name(body, "datasetSlug"))
    return {"info": _info(dataset)}


def update_dataset_metadata(ctx: RequestContext, body: dict) -> dict:
    settings = body.get("settings") or {}
    if not isinstance(settings, dict):
        raise BadRequest("settings must be an object")
    return {"errors": ctx.backend.update_dataset_metadata(name(body, "ownerSlug"), name(body, "datasetSlug"),
                                                          settings)}


def download_dataset(ctx: RequestContext, body: dict) -> Redirect:
    """A 302 to a signed, expiring URL: of the one file asked for (its own name last, so the client saves it
    under it), or of the version's files as one zip."""
    owner, slug = name(body, "ownerSlug"), name(body, "datasetSlug")
    dataset = ctx.backend.get_dataset(owner, slug)
    number = ctx.backend.dataset_version_number(dataset, body.get("datasetVersionNumber"))
    file_name = body.get("fileName")
    if file_name:
        ctx.backend.dataset_file(owner, slug, number, required(body, "fileName"))
        return Redirect(ctx.sign(f"/dataset-files/{owner}/{slug}/{number}/{file_name}"))
    return Redirect(ctx.sign(f"/dataset-archives/{owner}/{slug}/{number}/{slug}.zip"))


def delete_dataset(ctx: RequestContext, body: dict) -> dict:
    ctx.backend.delete_dataset(name(body, "ownerSlug"), name(body, "datasetSlug"))
    return {}
