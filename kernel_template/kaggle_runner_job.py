"""kaggle_runner_job: what a script needs to be chained across Kaggle sessions by kaggle-runner (docs/script.md).

kaggle-runner ships this module beside your script. Save what you need to resume in `checkpoint_dir()`; when
a new session of the chain starts, `resume_dir()` holds a read-only copy of what the last one left there.
Exit `EXIT_RESUME` (75) to be resumed in a new session, 0 when training is finished. Stop by `deadline()`:
the session limit minus the safety margin.

With a Hugging Face `Trainer`, two lines do it:

    from kaggle_runner_job import train_chained
    train_chained(trainer)  # instead of trainer.train()

The callback saves and stops the Trainer at the deadline (or after `steps_per_session` steps) and marks the
session "resume me", so the script's exit 0 then means 75. Outside a chain (`python train.py` on your machine)
everything still works: the checkpoint directory is ./checkpoint, there is no resume and no deadline.

Standard library only; ChainCallback imports transformers when it is first used.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

EXIT_FINISHED = 0
EXIT_RESUME = 75  # EX_TEMPFAIL: saved, resume me in a new session

__all__ = ["EXIT_FINISHED", "EXIT_RESUME", "ChainCallback", "checkpoint_dir", "deadline",  # noqa: F822 - lazy
           "deadline_reached", "request_resume", "resume_checkpoint", "resume_dir", "resume_requested", "segment",
           "train_chained"]


def checkpoint_dir() -> Path:
    """Where to save everything the next session needs; what is here when the session ends is carried on."""
    path = Path(os.environ.get("KAGGLE_RUNNER_CHECKPOINT_DIR") or "checkpoint")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_dir() -> Path | None:
    """A read-only copy of what the previous session left in its checkpoint directory; None on the first."""
    value = os.environ.get("KAGGLE_RUNNER_RESUME_DIR")
    return Path(value) if value else None


def deadline() -> float | None:
    """Unix time by which the script should have saved and exited; None outside a chain."""
    value = os.environ.get("KAGGLE_RUNNER_DEADLINE")
    return float(value) if value else None


def deadline_reached(margin_seconds: float = 0.0) -> bool:
    """True once fewer than `margin_seconds` are left before the deadline (never outside a chain)."""
    limit = deadline()
    return limit is not None and time.time() >= limit - margin_seconds


def segment() -> int:
    """This session's place in the chain: 1, 2, ..."""
    return int(os.environ.get("KAGGLE_RUNNER_SEGMENT") or 1)


def request_resume() -> None:
    """Ask for a new session even if the script exits 0 (what ChainCallback does when it stops the Trainer)."""
    marker = os.environ.get("KAGGLE_RUNNER_RESUME_MARKER")
    if marker:
        Path(marker).touch()
    os.environ["KAGGLE_RUNNER_RESUME_REQUESTED"] = "1"


def resume_requested() -> bool:
    return os.environ.get("KAGGLE_RUNNER_RESUME_REQUESTED") == "1"


def resume_checkpoint(prefix: str = "checkpoint-") -> str | None:
    """The newest whole Trainer checkpoint folder (`checkpoint-<step>`) the previous session left, for
    `trainer.train(resume_from_checkpoint=...)`; None on the first session. The Trainer writes trainer_state.json
    last, so a folder without it was cut off mid-save and is passed over."""
    folder = resume_dir()
    if folder is None or not folder.is_dir():
        return None
    steps = [(int(match.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (match := re.fullmatch(re.escape(prefix) + r"(\d+)", path.name))
             and (path / "trainer_state.json").is_file()]
    return str(max(steps)[1]) if steps else None


def train_chained(trainer, steps_per_session: int | None = None, margin_seconds: float = 0.0, **train_kwargs):
    """`trainer.train()`, chained: what a Hugging Face `Trainer` script calls instead, the second of its two lines.

    Adds a ChainCallback, saves the Trainer's checkpoints in checkpoint_dir() while it trains (keeping the
    newest one unless save_total_limit says otherwise) and resumes from the newest one carried over. The
    Trainer's own output_dir is restored afterwards, so a final `trainer.save_model()` lands where the script
    said, in /kaggle/working: an output, not part of the carried checkpoint."""
    trainer.add_callback(__getattr__("ChainCallback")(steps_per_session, margin_seconds))
    output_dir, limit = trainer.args.output_dir, trainer.args.save_total_limit
    trainer.args.output_dir = str(checkpoint_dir())
    trainer.args.save_total_limit = limit or 1
    try:
        return trainer.train(resume_from_checkpoint=resume_checkpoint(), **train_kwargs)
    finally:
        trainer.args.output_dir, trainer.args.save_total_limit = output_dir, limit


def _chain_callback_class():
    from transformers import TrainerCallback

    class ChainCallback(TrainerCallback):
        """Save and stop the Trainer at the deadline, on SIGTERM (what the job kernel sends at the deadline and
        Kaggle before it ends a session), or after `steps_per_session` optimizer steps, unless training is done
        anyway; the session then asks to be resumed."""

        def __init__(self, steps_per_session: int | None = None, margin_seconds: float = 0.0):
            self.steps_per_session = steps_per_session
            self.margin_seconds = margin_seconds
            self.first_step: int | None = None
            self.terminated = False
            self._previous_handler = None

        def _on_sigterm(self, signum, frame):
            self.terminated = True  # saved at the end of this step: Python's default would kill it mid-step

        def on_train_begin(self, args, state, control, **kwargs):
            self.first_step = state.global_step
            if threading.current_thread() is threading.main_thread():
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

        def on_train_end(self, args, state, control, **kwargs):
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None

        def on_step_end(self, args, state, control, **kwargs):
            done = state.max_steps and state.global_step >= state.max_steps
            enough = self.steps_per_session and state.global_step - (self.first_step or 0) >= self.steps_per_session
            if not done and (enough or self.terminated or deadline_reached(self.margin_seconds)):
                control.should_save = True
                control.should_training_stop = True
                request_resume()
            return control

    return ChainCallback


def __getattr__(name: str):
    if name == "ChainCallback":  # built on first use: importing this module never needs transformers
        globals()[name] = _chain_callback_class()
        return globals()[name]
    raise AttributeError(f"module 'kaggle_runner_job' has no attribute {name!r}")
