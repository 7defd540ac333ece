"""The named states of a run: Kaggle's statuses for a kernel version, a segment's phases, a run's states.

The emulator and the launcher share `KaggleStatus`; `Phase` is the chain's own bookkeeping, one member per
step that is recorded in the store before its side effect (docs/chain.md draws them).
"""

from __future__ import annotations

from enum import StrEnum


class KaggleStatus(StrEnum):
    """A kernel version's status as Kaggle reports it (the client prints `KernelWorkerStatus.<NAME>`)."""

    QUEUED = "QUEUED"  # pushed, waiting for a machine
    RUNNING = "RUNNING"  # in a session; also while outputs upload after the script ended
    COMPLETE = "COMPLETE"  # the script exited 0
    ERROR = "ERROR"  # the script failed, or the session died
    CANCEL_REQUESTED = "CANCEL_REQUESTED"  # a cancel was asked for; the session is stopping
    CANCEL_ACKNOWLEDGED = "CANCEL_ACKNOWLEDGED"  # cancelled, or stopped at the session limit

    @property
    def terminal(self) -> bool:
        return self in (KaggleStatus.COMPLETE, KaggleStatus.ERROR, KaggleStatus.CANCEL_ACKNOWLEDGED)

    @property
    def active(self) -> bool:
        return not self.terminal


class Phase(StrEnum):
    """Where a segment (one kernel version) is; each phase names the next side effect to perform."""

    PUSHING = "pushing"  # render and push a kernel version
    RUNNING = "running"  # follow the pushed version until Kaggle reports it ended
    ENDED = "ended"  # its small outputs are read: decide what comes next
    ENDED_RESUME = "ended_resume"  # resuming: download the newest verified checkpoint
    RESUME_DOWNLOADED = "resume_downloaded"  # upload it as a new version of the chain's dataset
    RESUME_UPLOADED = "resume_uploaded"  # wait until that version is ready and mountable, then open the next
    REPUSH = "repush"  # the kernel did not find its checkpoint (pinned old version): push the same again
    DONE = "done"  # handed on to the next segment
    FINAL = "final"  # the run ended with this segment


class RunState(StrEnum):
    """A run as a whole."""

    RUNNING = "running"  # a segment is being pushed or followed
    RESUMING = "resuming"  # between segments: moving a checkpoint
    COMPLETE = "complete"  # training completed and the outputs were fetched
    FAILED = "failed"  # relaunching cannot help: fix something, then `resume`
    STOPPED = "stopped"  # a guardrail stopped the chain (segments, progress, quota, no GPU)
    CANCELLED = "cancelled"  # by `kaggle-runner cancel`

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({RunState.COMPLETE, RunState.FAILED, RunState.STOPPED, RunState.CANCELLED})
