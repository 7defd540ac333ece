"""Run the rendered kernel the way Kaggle does: a subprocess, its own working dir, inputs elsewhere."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
CHECKPOINT_DATASET = "alice/kaggle-runner-tiny-ckpt"  # the tiny preset's slug, as the launcher names it
TOKEN_DATASET = "alice/kaggle-runner-tiny-data"


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


def render(tmp: Path, overrides=(), chain_checkpoint: dict | None = None) -> Path:
    config = load_preset("tiny", [*FAST, *overrides])
    return render_kernel(config, tmp / "kernel", "alice", chain_checkpoint=chain_checkpoint).code_file


def run_kernel(script: Path, working: Path, input_dir: Path | None = None, env: dict | None = None,
               timeout: float = 240, scratch: Path | None = None, launcher: list[str] | None = None) -> KernelRun:
    """env values of None remove the variable; by default the CPU stands in for the T4 a session asks for.
    launcher: what runs the script instead of plain python, e.g. ["-m", "torch.distributed.run", ...]."""
    working.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "KAGGLE_RUNNER_INPUT_DIR": str(input_dir or working.parent / "no-input"),
                "PYTHONUNBUFFERED": "1", "KAGGLE_RUNNER_EMULATED_GPU": "NvidiaTeslaT4", **(env or {})}
    if scratch is not None:
        full_env["KAGGLE_RUNNER_SCRATCH_DIR"] = str(scratch)
    full_env = {key: value for key, value in full_env.items() if value is not None}
    process = subprocess.run([sys.executable, *(launcher or []), str(script)], cwd=working, env=full_env,
                             capture_output=True, text=True, timeout=timeout)
    return KernelRun(process.returncode, process.stdout + process.stderr, working)


def flat_dataset(source: Path, target: Path, relpaths: list[str]) -> None:
    """Outputs as the launcher uploads them: top-level files and a manifest rewritten for the flat names."""
    target.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((source / "manifest.json").read_text())
    files = {}
    for rel in relpaths:
        shutil.copyfile(source / rel, target / Path(rel).name)
        files[Path(rel).name] = manifest["files"][rel]
    (target / "manifest.json").write_text(json.dumps({**manifest, "files": files}))


def mount(input_dir: Path, dataset: str, layout: str) -> Path:
    """Where Kaggle mounts owner/slug: <input>/datasets/<owner>/<slug>/ or, the older layout, <input>/<slug>/."""
    owner, slug = dataset.split("/")
    return input_dir / "datasets" / owner / slug if layout == "datasets" else input_dir / slug


def attach_checkpoint(source: Path, input_dir: Path, layout: str = "datasets", checkpoint: str | None = None) -> dict:
    """Attach a stopped run's newest checkpoint (or `checkpoint`, a path relative to its outputs), best_model.pt
    and token arrays the way the launcher does (the chain's checkpoint dataset and its token dataset); returns the
    chain_checkpoint to render with."""
    manifest = json.loads((source / "manifest.json").read_text())
    state = json.loads((source / "run_state.json").read_text())
    newest = checkpoint or state["newest_checkpoint"]
    ckpt = mount(input_dir, CHECKPOINT_DATASET, layout)
    flat_dataset(source, ckpt, [newest] + (["best_model.pt"] if "best_model.pt" in manifest["files"] else []))
    tokens = [rel for rel, info in manifest["files"].items() if info.get("kind") == "token_cache"]
    if tokens:
        flat_dataset(source, mount(input_dir, TOKEN_DATASET, layout), tokens)
    best = ckpt / "best_model.pt"
    return {"file": Path(newest).name, "sha256": hashlib.sha256((source / newest).read_bytes()).hexdigest(),
            "global_step": manifest["files"][newest]["global_step"], "dataset": CHECKPOINT_DATASET,
            "best_sha256": hashlib.sha256(best.read_bytes()).hexdigest() if best.exists() else None}


def attach_outputs(source: Path, input_dir: Path, kernel: str, layout: str = "notebooks") -> dict:
    """Attach a stopped run's outputs whole the way Kaggle mounts a kernel source (<input>/notebooks/<owner>/<slug>/
    or <input>/<slug>/, beside Kaggle's own __script__.py); returns the chain_checkpoint the outputs route renders."""
    owner, slug = kernel.split("/")
    target = input_dir / "notebooks" / owner / slug if layout == "notebooks" else input_dir / slug
    shutil.copytree(source, target)
    (target / "__script__.py").write_text("print('the source kernel')\n")
    manifest = json.loads((source / "manifest.json").read_text())
    newest = json.loads((source / "run_state.json").read_text())["newest_checkpoint"]
    best = source / "best_model.pt"
    return {"file": newest, "sha256": hashlib.sha256((source / newest).read_bytes()).hexdigest(),
            "global_step": manifest["files"][newest]["global_step"], "kernel": kernel,
            "best_sha256": hashlib.sha256(best.read_bytes()).hexdigest() if best.exists() else None}
