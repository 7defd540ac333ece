"""The named states of a run, and every move between them, declared once.

`KaggleStatus` is what Kaggle says about a kernel version (the emulator speaks it too). `Phase` is where one
segment of the chain is; `RunState` is where the run as a whole is. `PHASE_MOVES` and `RUN_MOVES` are the only
moves allowed between them, each with the actor that makes it and why: `Store` refuses any other in the same
guarded UPDATE that makes it, and docs/chain.md's diagrams are generated from these tables
(`python -m kaggle_runner.states` prints them; tests/test_states.py checks the docs).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class KaggleStatus(StrEnum):
    """A kernel version's status as Kaggle reports it (the client prints `KernelWorkerStatus.<NAME>`)."""

    QUEUED = "QUEUED"  # pushed, waiting for a machine
    RUNNING = "RUNNING"  # in a session; also while outputs upload after the script ended
    COMPLETE = "COMPLETE"  # the script exited 0
    ERROR = "ERROR"  # the script failed, or the session died
    CANCEL_REQUESTED = "CANCEL_REQUESTED"  # a cancel was asked for; the session is stopping
    CANCEL_ACKNOWLEDGED = "CANCEL_ACKNOWLEDGED"  # cancelled, or stopped at the session limit
    NEW_SCRIPT = "NEW_SCRIPT"  # saved without running (kagglesdk 0.1.38's seventh member; seen briefly after a push)

    @property
    def terminal(self) -> bool:
        return self in (KaggleStatus.COMPLETE, KaggleStatus.ERROR, KaggleStatus.CANCEL_ACKNOWLEDGED)

    @property
    def active(self) -> bool:
        return not self.terminal

    @classmethod
    def read(cls, value: object) -> KaggleStatus | None:
        """A status Kaggle sent, or None for one this launcher does not know (it means "not started yet")."""
        return cls._value2member_map_.get(str(value).upper())  # type: ignore[return-value]


class Phase(StrEnum):
    """Where a segment (one kernel version) is; each phase names the next side effect to perform."""

    PUSHING = "pushing"  # render and push a kernel version
    RUNNING = "running"  # follow the pushed version until Kaggle reports it ended
    ENDING = "ending"  # Kaggle says it ended: wait until its small outputs are listed, then read them
    ENDED = "ended"  # its small outputs are read: decide what comes next
    # The checkpoint-dataset route: the checkpoint moves through the laptop.
    ENDED_RESUME = "ended_resume"  # download the newest verified checkpoint
    RESUME_DOWNLOADED = "resume_downloaded"  # upload it as a new version of the chain's checkpoint dataset
    RESUME_UPLOADED = "resume_uploaded"  # wait until that version is ready and settled, then open the next
    # The outputs route: the next version reads this one's outputs on Kaggle; nothing moves through the laptop.
    OUTPUTS_SETTLING = "outputs_settling"  # wait until Kaggle can attach this version's outputs, then open the next
    REPUSH = "repush"  # the kernel did not find its checkpoint (Kaggle attached an old version): wait, push again
    DONE = "done"  # handed on to the next segment
    FINAL = "final"  # the run ended with this segment


class RunState(StrEnum):
    """A run as a whole."""

    RUNNING = "running"  # a segment is being pushed or followed
    RESUMING = "resuming"  # between segments: handing the checkpoint on
    COMPLETE = "complete"  # training completed and the outputs were fetched
    FAILED = "failed"  # relaunching cannot help: fix something, then `resume`
    STOPPED = "stopped"  # a guardrail stopped the chain (segments, progress, quota, no GPU)
    CANCELLED = "cancelled"  # by `kaggle-runner cancel`

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({RunState.COMPLETE, RunState.FAILED, RunState.STOPPED, RunState.CANCELLED})


class Actor(StrEnum):
    """Who makes a move: the run's driver, or a user command acting on the run from outside."""

    CHAIN = "chain"  # the driver (launch, watch, resume after it hands over)
    RESUME = "resume"  # `kaggle-runner resume RUN`, on a run that ended
    CANCEL = "cancel"  # `kaggle-runner cancel RUN`


@dataclass(frozen=True)
class Move:
    source: StrEnum
    target: StrEnum
    actor: Actor
    why: str


P, R = Phase, RunState
# Every phase change a segment may make. `Store.transition` refuses anything else.
PHASE_MOVES: tuple[Move, ...] = (
    Move(P.PUSHING, P.RUNNING, Actor.CHAIN, "pushed, or found the version an interrupted push made"),
    Move(P.PUSHING, P.FINAL, Actor.CHAIN, "Kaggle refused the push for good"),
    Move(P.RUNNING, P.ENDING, Actor.CHAIN, "Kaggle reports the version ended"),
    Move(P.RUNNING, P.FINAL, Actor.CHAIN, "Kaggle never showed the pushed version"),
    Move(P.ENDING, P.ENDED, Actor.CHAIN, "its small outputs are read (or never came)"),
    Move(P.ENDED, P.ENDED_RESUME, Actor.CHAIN, "resume through the checkpoint dataset (or, when the outputs "
         "route did not attach the checkpoint twice, this once)"),
    Move(P.ENDED, P.OUTPUTS_SETTLING, Actor.CHAIN, "resume through this version's outputs"),
    Move(P.ENDED, P.REPUSH, Actor.CHAIN, "the kernel did not find its checkpoint"),
    Move(P.ENDED, P.FINAL, Actor.CHAIN, "complete, failed or stopped"),
    Move(P.ENDED_RESUME, P.RESUME_DOWNLOADED, Actor.CHAIN, "the newest verified checkpoint is here"),
    Move(P.ENDED_RESUME, P.FINAL, Actor.CHAIN, "no checkpoint verified"),
    Move(P.RESUME_DOWNLOADED, P.RESUME_UPLOADED, Actor.CHAIN, "uploaded as a checkpoint dataset version"),
    Move(P.RESUME_UPLOADED, P.RESUME_DOWNLOADED, Actor.CHAIN, "that version failed or never got ready"),
    Move(P.RESUME_UPLOADED, P.DONE, Actor.CHAIN, "ready and settled: the next segment opens"),
    Move(P.RESUME_UPLOADED, P.FINAL, Actor.CHAIN, "the checkpoint dataset never became ready"),
    Move(P.OUTPUTS_SETTLING, P.DONE, Actor.CHAIN, "attachable: the next segment opens, on the other kernel"),
    Move(P.REPUSH, P.DONE, Actor.CHAIN, "waited: the same resume opens again"),
    Move(P.FINAL, P.RUNNING, Actor.RESUME, "the chain stopped before Kaggle reported on its version: follow it"),
    Move(P.FINAL, P.ENDED_RESUME, Actor.RESUME, "a checkpoint to resume from"),
    Move(P.ENDED, P.ENDED_RESUME, Actor.RESUME, "a checkpoint to resume from"),
    Move(P.FINAL, P.OUTPUTS_SETTLING, Actor.RESUME, "a checkpoint to resume from, in the version's outputs"),
    Move(P.ENDED, P.OUTPUTS_SETTLING, Actor.RESUME, "a checkpoint to resume from, in the version's outputs"),
    Move(P.FINAL, P.DONE, Actor.RESUME, "nothing newer: the same resume opens again"),
    Move(P.ENDED, P.DONE, Actor.RESUME, "nothing newer: the same resume opens again"),
    Move(P.REPUSH, P.DONE, Actor.RESUME, "the same resume opens again"),
)
# Every change of a run's state. A cancel leaves the segment's phase as it is: `resume` continues from there.
RUN_MOVES: tuple[Move, ...] = (
    Move(R.RUNNING, R.RESUMING, Actor.CHAIN, "a segment ended early: hand its checkpoint on"),
    Move(R.RESUMING, R.RUNNING, Actor.CHAIN, "the next segment opened"),
    *(Move(source, target, Actor.CHAIN, why) for source in (R.RUNNING, R.RESUMING)
      for target, why in ((R.COMPLETE, "training complete, outputs fetched"), (R.FAILED, "relaunching cannot help"),
                          (R.STOPPED, "a guardrail stopped the chain"))),
    Move(R.RUNNING, R.CANCELLED, Actor.CANCEL, "cancelled by the user"),
    Move(R.RESUMING, R.CANCELLED, Actor.CANCEL, "cancelled by the user"),
    *(Move(source, R.RUNNING, Actor.RESUME, "resumed by hand") for source in (R.FAILED, R.STOPPED, R.CANCELLED)),
)


def allowed_sources(moves: tuple[Move, ...], target: StrEnum, actor: Actor) -> tuple[str, ...]:
    """The states `actor` may move into `target` from."""
    return tuple(sorted({m.source.value for m in moves if m.target == target and m.actor == actor}))


def is_allowed(moves: tuple[Move, ...], source: StrEnum, target: StrEnum, actor: Actor) -> bool:
    return any(m.source == source and m.target == target and m.actor == actor for m in moves)


def mermaid(moves: tuple[Move, ...]) -> str:
    """A Mermaid state diagram of the moves: the chain's as plain arrows, a user command's labelled."""
    lines = ["stateDiagram-v2"]
    for move in moves:
        label = move.why if move.actor == Actor.CHAIN else f"{move.actor}: {move.why}"
        lines.append(f"    {move.source.value} --> {move.target.value}: {label}")
    return "\n".join(lines)


def diagrams() -> str:
    """The Markdown that docs/chain.md carries between its `<!-- states:begin -->` and `<!-- states:end -->`."""
    return (f"A segment's phases (`kaggle_runner.states.PHASE_MOVES`):\n\n```mermaid\n{mermaid(PHASE_MOVES)}\n```\n\n"
            f"A run's states (`kaggle_runner.states.RUN_MOVES`):\n\n```mermaid\n{mermaid(RUN_MOVES)}\n```\n")


if __name__ == "__main__":
    print(diagrams(), end="")
