"""Chains against the emulator with the stub kernel (tests/stub_kernel.py): the launcher's logic, fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

STUB = str(Path(__file__).with_name("stub_kernel.py"))
SLUG = "kaggle-runner-tiny"
# 20 steps in segments of 10: two segments and one resume, unless a test asks for more.
STUB_CHAIN = ["max_steps=20", "segment_steps=10", "save_steps=5", "eval_steps=5", "log_steps=5", "max_checkpoints=2",
              "session_timeout_seconds=300", "safety_margin_seconds=10", "segment_grace_seconds=30",
              "max_segments=8", "min_quota_hours=0", "dataset_settle_seconds=3", "outputs_settle_seconds=3"]


def stub_weight(steps: int) -> int:
    """The stub model's weight after `steps` uninterrupted steps."""
    return steps * (steps + 1) // 2


def sets(items) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def launcher(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaggle_runner.cli", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def start_launcher(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kaggle_runner.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_stub_weight(folder: Path, steps: int) -> int:
    return json.loads((folder / f"checkpoints/checkpoint_epoch1_step{steps}.pt").read_text())["weight"]


# The tiny model in segments of 20 steps: every segment ends by its step count, never by the clock.
REAL_CHAIN = ["n_embd=64", "n_layer=2", "max_steps=40", "segment_steps=20", "eval_steps=10", "save_steps=10",
              "log_steps=10", "sample_tokens=5", "session_timeout_seconds=600", "safety_margin_seconds=30",
              "segment_grace_seconds=60", "max_segments=6", "min_quota_hours=0", "dataset_settle_seconds=3",
              "outputs_settle_seconds=3"]
