"""The store's records: a run, a segment (one kernel version of it), a driver's lease, as dataclasses whose
fields are exactly the store's columns, and the check every value passes before it is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.states import FINAL_STATES


class StoreError(KaggleRunnerError):
    pass


@dataclass
class Run:
    name: str
    config_json: str
    username: str
    kernel_ref: str
    checkpoint_dataset_ref: str  # <user>/<slug>-ckpt: the checkpoint dataset of the dataset route
    endpoint: str | None
    local: int
    state: str
    reason: str
    max_segments: int
    created_at: float
    updated_at: float
    resume_via: str = "dataset"  # "dataset" or "outputs": how a checkpoint reaches the next segment
    alternate_kernel_ref: str | None = None  # the outputs route's second kernel; segments alternate between them
    cleaned_at: float | None = None  # `kaggle-runner clean` removed its working copies (and what it was asked to)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass
class Segment:
    run: str
    idx: int
    phase: str
    base_version: int | None = None
    kernel_version: int | None = None
    kernel_id: int | None = None
    resume_from: str | None = None  # the checkpoint this segment resumes from (its name where it is attached)
    resume_sha256: str | None = None
    resume_step: int | None = None
    best_sha256: str | None = None
    resume_retries: int = 0  # pushes of the same resume that found no checkpoint (Kaggle attached an old version)
    push_attempted_at: float | None = None  # a push was sent then: it may have landed even if Kaggle shows nothing
    pushed_at: float | None = None
    running_at: float | None = None  # first RUNNING status: session time counts from here, not from the push
    session_id: str | None = None  # from the kernel's session event; what cancel needs
    kaggle_status: str | None = None
    failure_message: str | None = None
    global_step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    run_state_json: str | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    checkpoint_version_before: int | None = None  # the checkpoint dataset's version before this resume's upload
    checkpoint_version: int | None = None  # the checkpoint dataset version this resume uploaded
    checkpoint_reuploads: int = 0  # uploads repeated because a version failed processing or never became ready
    next_try_at: float | None = None  # a wait of this phase ends then (settle, repush, refused push): recorded first
    resume_proven: int = 0  # the next segment's kernel reported it resumed from that exact checkpoint
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    upload_seconds: float | None = None
    ended_at: float | None = None
    kernel_ref: str = ""  # the kernel this segment's version belongs to
    waiting_since: float | None = None  # this phase began waiting for Kaggle then (bounded waits count from here)
    wait_reason: str | None = None  # what this phase waits for, for `status`
    push_refusals: int = 0  # pushes refused because Kaggle did not see one of the chain's datasets yet
    uncertain_pushes: int = 0  # pushes that failed after they may have landed
    torn_reads: int = 0  # listings whose run_state.json was not whole
    overrun_cancelled: int = 0  # the launcher cancelled this version for running past its session limit
    resume_via: str | None = None  # "dataset" or "outputs": how this segment's checkpoint was attached
    resume_source_ref: str | None = None  # outputs route: the kernel whose newest version holds the checkpoint
    resume_source_version: int | None = None  # ... and that version
    handoff_segment: int | None = None  # whose outputs this segment's resume downloads (dataset route)

    @property
    def run_state(self) -> dict | None:
        try:
            state = json.loads(self.run_state_json) if self.run_state_json else None
        except (ValueError, RecursionError):
            return None
        return state if isinstance(state, dict) else None


# Facts about one phase's wait: a phase change starts them afresh.
PER_PHASE = {"waiting_since": None, "wait_reason": None, "next_try_at": None, "push_refusals": 0,
             "uncertain_pushes": 0, "torn_reads": 0}


@dataclass
class Driver:
    pid: int
    host: str
    started_at: float
    heartbeat: float
    token: str  # random per process: pid and host alone repeat across containers and pid reuse
    pid_ns: str  # the pid namespace `pid` means something in

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


RUN_COLUMNS = [f.name for f in fields(Run)]
SEGMENT_COLUMNS = [f.name for f in fields(Segment)]



def checked(table: type, values: dict[str, Any]) -> dict[str, Any]:
    """Values as their columns declare them: an int column takes an int (not a bool), a float column a finite
    number, a text column a string; None where the column allows it. Anything else is a bug upstream, refused
    here rather than stored (SQLite would store it, or refuse it in a way that looks like damage)."""
    declared = {f.name: str(f.type) for f in fields(table)}
    for key, value in values.items():
        kind = declared.get(key)
        if kind is None:
            raise StoreError(f"no column {key!r} in {table.__name__.lower()}s")
        if value is None:
            if "None" not in kind:
                raise StoreError(f"{table.__name__.lower()}s.{key} cannot be empty")
            continue
        base = kind.split("|")[0].strip()
        if base == "int" and not (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63):
            raise StoreError(f"{table.__name__.lower()}s.{key} takes a whole number, not {value!r:.60}")
        if base == "float" and not (isinstance(value, int | float) and not isinstance(value, bool)
                                    and math.isfinite(value)):
            raise StoreError(f"{table.__name__.lower()}s.{key} takes a finite number, not {value!r:.60}")
        if base == "str" and not isinstance(value, str):
            raise StoreError(f"{table.__name__.lower()}s.{key} takes text, not {value!r:.60}")
    return values
