"""`kaggle-runner clean`: give back the disk (and, when asked, the Kaggle storage) finished runs hold.

What goes, for each finished run cleaned:
- always: the launcher's working copies under <workspace>/runs/<run>/ (each segment's small files, downloaded
  checkpoints, the checkpoint dataset's staging folder). outputs/<run>/, the trained model, stays; so does the
  run's record, marked cleaned.
- a --local run: the emulator's copies as well. Its kernels are deleted (all their versions and outputs), once
  no other run that still needs them uses them, and its chain datasets are emptied as below.
- a Kaggle run, only with --on-kaggle, never by default: the chain's checkpoint and token datasets are emptied,
  a one-file version with "delete old versions" replacing every version (the gigabytes of old checkpoints).
  They are not deleted: Kaggle has refused to reuse a deleted dataset's title (kaggle-cli #243) and failed to
  attach one recreated under its slug (#187), and the next chain of this configuration uses the same slugs.
  Kaggle kernels are never deleted: they hold the runs' logs and outputs, and other runs' versions.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kaggle_runner.connect import gateway_for
from kaggle_runner.controller.context import token_dataset_ref
from kaggle_runner.display import Console
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.kaggle_api import KaggleApiError, KaggleGateway
from kaggle_runner.store import Run, Store

EMPTIED_NOTE = ("Emptied by `kaggle-runner clean`: the checkpoints of finished runs were deleted with the dataset's "
                "older versions. The next chain of this configuration uploads new ones.\n")


@dataclass
class Cleaned:
    """What one `clean` did, for the one-line-per-run report."""

    freed_bytes: int = 0
    lines: list[str] = field(default_factory=list)


def clean(workspace: str | Path, name: str | None = None, finished: bool = False, on_kaggle: bool = False,
          endpoint: str | None = None, console: Console | None = None) -> Cleaned:
    if bool(name) == finished:
        raise KaggleRunnerError("name one run to clean, or pass --finished for every finished run")
    console = console or Console()
    store = Store(workspace, create=False)
    every = store.list_runs()
    if name:
        run = store.get_run(name)
        if not run.final:
            raise KaggleRunnerError(f"run {name} is {run.state}: `kaggle-runner cancel {name}` first, or let it end")
        chosen = [run]
    else:
        chosen = [r for r in every if r.final and r.cleaned_at is None]
    report = Cleaned()
    if not chosen:
        report.lines.append("No finished run is left to clean.")
        return report
    cleaning = {r.name for r in chosen}
    # A kernel or dataset goes only when every run using it is finished and cleaned (now or before).
    still_used = {ref for r in every if r.name not in cleaning and (not r.final or r.cleaned_at is None)
                  for ref in _remote_refs(r)}
    gateways: dict[bool, KaggleGateway] = {}
    for run in chosen:
        freed = _remove_working_copies(store.workspace, run.name)
        report.freed_bytes += freed
        done = [f"removed {_size(freed)} of working copies (outputs/{run.name} kept)"]
        if run.local or on_kaggle:
            if bool(run.local) not in gateways:
                gateways[bool(run.local)] = gateway_for(store.workspace, bool(run.local), endpoint, console.note)
            done += _clean_remote(gateways[bool(run.local)], run, still_used)
        store.update_run(run.name, cleaned_at=run.cleaned_at or time.time())
        report.lines.append(f"Cleaned run {run.name}: " + "; ".join(done) + ".")
    return report


def _remote_refs(run: Run) -> set[str]:
    kernels = {run.kernel_ref} | ({run.alternate_kernel_ref} if run.alternate_kernel_ref else set())
    return kernels | {run.checkpoint_dataset_ref, token_dataset_ref(run)}


def _remove_working_copies(workspace: Path, name: str) -> int:
    folder = workspace / "runs" / name
    if not folder.is_dir():
        return 0
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(folder, ignore_errors=True)
    return size


def _clean_remote(gateway: KaggleGateway, run: Run, still_used: set[str]) -> list[str]:
    done = []
    if run.local:  # the emulator's copies: on Kaggle, kernels are the user's notebooks and stay
        for ref in sorted({run.kernel_ref} | ({run.alternate_kernel_ref} if run.alternate_kernel_ref else set())):
            if ref in still_used:
                done.append(f"kept kernel {ref} (another run still needs it)")
                continue
            try:
                gateway.delete_kernel(ref)
                done.append(f"deleted the emulator's kernel {ref}")
            except KaggleApiError as exc:
                if exc.status not in (403, 404):  # already gone: nothing to say
                    done.append(f"could not delete kernel {ref} ({exc})")
    for ref in (run.checkpoint_dataset_ref, token_dataset_ref(run)):
        if ref in still_used:
            done.append(f"kept dataset {ref} (another run still needs it)")
            continue
        if (line := _empty_dataset(gateway, ref, run.name)) is not None:
            done.append(line)
    return done


def _empty_dataset(gateway: KaggleGateway, ref: str, run_name: str) -> str | None:
    """None when there is nothing to empty (the outputs route makes no checkpoint dataset)."""
    try:
        if gateway.dataset_version(ref) is None:
            return None
        with tempfile.TemporaryDirectory(prefix="kaggle-runner-clean-") as folder:
            (Path(folder) / "EMPTIED.md").write_text(EMPTIED_NOTE)
            (Path(folder) / "dataset-metadata.json").write_text(json.dumps({"id": ref}))
            gateway.create_dataset_version(Path(folder), f"emptied by kaggle-runner clean ({run_name})",
                                           delete_old_versions=True)
        return f"emptied dataset {ref} (its old versions deleted)"
    except KaggleApiError as exc:
        return f"could not empty dataset {ref} ({exc})"


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MB"
