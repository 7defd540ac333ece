"""Run the rendered kernel the way Kaggle does: a subprocess, its own working dir, inputs elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kaggle_runner.config import load_preset
from kaggle_runner.render import render_kernel

# Small and quick on 2 CPU cores, yet long enough to rotate checkpoints and evaluate a few times.
FAST = ["n_embd=64", "n_layer=2", "n_head=4", "max_length=64", "batch_size=8", "gradient_accumulation_steps=2",
        "max_steps=24", "eval_steps=8", "save_steps=4", "max_checkpoints=2", "log_steps=4", "sample_tokens=8",
        "warmup_steps=4", "session_timeout_seconds=600", "safety_margin_seconds=10"]


@dataclass
class KernelRun:
    returncode: int
    stdout: str
    working: Path

    def events(self, kind: str) -> list[dict]:
        found = []
        for line in self.stdout.splitlines():
            if line.startswith('{"event"'):
                event = json.loads(line)
                if event["event"] == kind:
                    found.append(event)
        return found

    def run_state(self) -> dict:
        return json.loads((self.working / "run_state.json").read_text())

    def manifest(self) -> dict:
        return json.loads((self.working / "manifest.json").read_text())


def render(tmp: Path, overrides=(), **config_overrides) -> Path:
    config = load_preset("tiny", [*FAST, *overrides])
    return render_kernel(config, tmp / "kernel", "alice").code_file


def run_kernel(script: Path, working: Path, input_dir: Path | None = None, env: dict | None = None,
               timeout: float = 240, scratch: Path | None = None) -> KernelRun:
    working.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "KAGGLE_RUNNER_INPUT_DIR": str(input_dir or working.parent / "no-input"),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    if scratch is not None:
        full_env["KAGGLE_RUNNER_SCRATCH_DIR"] = str(scratch)
    process = subprocess.run([sys.executable, str(script)], cwd=working, env=full_env, capture_output=True,
                             text=True, timeout=timeout)
    return KernelRun(process.returncode, process.stdout + process.stderr, working)
