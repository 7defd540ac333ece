"""Moving files between Kaggle and this machine: a version's outputs down (verified), a folder up as a dataset.

Everything that comes down is checked against the kernel's manifest before it lands where the user looks; what
goes up is built by artifacts.py from files that verified. The byte counts feed `status` and the benchmarks.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from kaggle_runner import artifacts, contract
from kaggle_runner.controller.context import ChainContext
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.store import Run, Segment


def fetch_outputs(ctx: ChainContext, run: Run, segment: Segment, target: Path) -> Path:
    """All outputs of a version into `target`, verified against the manifest; resumable and idempotent.

    Files land in a staging folder beside `target` and move in only once verified: an unverified or
    tampered file never sits in the user's output folder. Files the manifest does not list are skipped.
    """
    try:
        return _fetch_outputs(ctx, run, segment, target)
    except OSError as exc:  # a full or read-only disk, a file where a folder must go: one line, not a traceback
        where = exc.filename or target
        raise KaggleRunnerError(f"cannot write the outputs of {run.name} to {target}: {exc.strerror} ({where}); "
                                f"free space or choose another folder with `kaggle-runner fetch {run.name} -o DIR`"
                                ) from None


def _fetch_outputs(ctx: ChainContext, run: Run, segment: Segment, target: Path) -> Path:
    """One listing and one download call, whatever the number of files (each call lists every page again)."""
    ref, version = segment.kernel_ref, segment.kernel_version or 0
    files, _ = ctx.gateway.list_output(ref, version)
    listed = {f.name for f in files}
    if contract.MANIFEST not in listed:
        raise KaggleRunnerError(f"version {version} of {ref} left no {contract.MANIFEST}, so no output of it can be "
                                f"checked (it may have failed before writing any); `kaggle-runner logs {run.name}` "
                                "shows why")
    staging = target.parent / f".{target.name}.staging"
    staging.mkdir(parents=True, exist_ok=True)
    ctx.gateway.download(ref, version, staging, artifacts.exact_pattern([contract.MANIFEST]), force=True)
    manifest = artifacts.read_manifest(staging)
    wanted = [rel for rel, info in manifest["files"].items()
              if info.get("kind") != "token_cache" and rel in listed]  # token arrays: the chain's, not an output
    unlisted = sorted(n for n in listed - set(manifest["files"]) - {contract.MANIFEST, contract.RUN_STATE}
                      if not n.startswith(f"{contract.TOKEN_CACHE_DIR}/") and not n.endswith(".log"))
    if unlisted:
        ctx.console.note(f"note: skipped {len(unlisted)} output file(s) the kernel's manifest does not list "
                         f"(e.g. {unlisted[0]!r})")
    todo = [rel for rel in wanted if artifacts.confined(target, rel) is not None
            and not artifacts.verified(target, rel, manifest["files"][rel])]
    if todo:
        total = sum(manifest["files"][rel]["size"] for rel in todo)
        with ctx.console.transfer("fetching", total) as update, \
                watching_size(staging, lambda size: update(f"{len(todo)} file(s)", size)):
            ctx.gateway.download(ref, version, staging, artifacts.exact_pattern(todo), force=True)
    for rel in todo:
        if not artifacts.verified(staging, rel, manifest["files"][rel]):
            (staging / rel).unlink(missing_ok=True)
            raise KaggleRunnerError(f"{rel} does not match the kernel's checksum after downloading; "
                                    f"run `kaggle-runner fetch {run.name}` again")
    target.mkdir(parents=True, exist_ok=True)
    for rel in todo:
        final = artifacts.confined(target, rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, final)
    os.replace(staging / contract.MANIFEST, target / contract.MANIFEST)
    for log in staging.glob("*.log"):
        os.replace(log, target / log.name)
    shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def watching_size(path: Path, report: Callable[[int], None]) -> Iterator[None]:
    """Report a file's (or a folder's) size as it grows while the client downloads it (the client runs quiet)."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.25):
            with suppress(OSError):
                report(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir()
                       else path.stat().st_size)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)


def download_verified(ctx: ChainContext, segment: Segment, folder: Path, rel: str, info: dict) -> tuple[bool, int]:
    """One output file of the segment's version into `folder`, with a progress bar: (verified, bytes moved)."""
    with ctx.console.transfer("downloading", info["size"]) as update, \
            watching_size(folder / rel, lambda done: update(Path(rel).name, done)):
        moved = ctx.gateway.download(segment.kernel_ref, segment.kernel_version or 0, folder,
                                     artifacts.exact_pattern([rel]))
    if artifacts.verified(folder, rel, info):
        return True, moved
    path = artifacts.confined(folder, rel)
    if path is not None:
        path.unlink(missing_ok=True)
    return False, moved


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    started = time.time()
    yield lambda: time.time() - started
