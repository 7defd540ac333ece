"""The precision key, and the T4's whole path on a CPU: fp16 autocast with a GradScaler, gradient checkpointing
and torch.compile together on a pretrained Llama, as the finetune preset trains on Kaggle. The CPU runs the
same Python (autocast, the scaler, dynamo's trace of the checkpointed layers) with inductor's C++ backend in
place of Triton, so what breaks in the combination breaks here first."""

from __future__ import annotations

import json

import pytest
import torch
from kaggle_runner.kernel_template import kernel

from tests.kernel_helpers import render, run_kernel
from tests.test_models import SMALL, save_tiny_model, write_jsonl_corpus


@pytest.mark.parametrize(("precision", "dtype", "scaled"), [
    ("auto", torch.float32, False), ("fp32", torch.float32, False), ("fp16", torch.float16, True),
    ("bf16", torch.bfloat16, False)])
def test_precision_picks_the_autocast_dtype_and_a_scaler_only_for_fp16(precision, dtype, scaled):
    device, picked = kernel.pick_device_and_dtype("cpu", precision)
    assert device.type == "cpu" and picked == dtype
    model = torch.nn.Linear(4, 4)
    model.config = type("Config", (), {"vocab_size": 4})()
    data = {"train": torch.zeros(64, dtype=torch.int64).numpy(), "train_windows": 4}
    config = {"batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 8, "learning_rate": 1e-3,
              "weight_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 0.1, "seed": 0}
    run = kernel.build_training(config, data, model, device, picked, total_steps=1)
    assert (run.scaler is not None) == scaled
    with run.autocast():
        assert model(torch.ones(2, 4)).dtype == dtype


@pytest.mark.slow
def test_fp16_gradient_checkpointing_and_compile_together_train_a_pretrained_llama(tmp_path):
    model = save_tiny_model(tmp_path / "llama-tiny", "llama")
    inputs = tmp_path / "input"
    write_jsonl_corpus(inputs / "my-corpus")
    overrides = [*SMALL, f"init_from={json.dumps(str(model))}", 'dataset="text-files"', 'text_files_path="my-corpus"',
                 "gradient_checkpointing=true", 'precision="fp16"', 'compile="on"', "max_steps=4", "eval_steps=4",
                 "save_steps=1", "max_checkpoints=2", "log_steps=4"]
    run = run_kernel(render(tmp_path / "kernel", overrides), tmp_path / "working", input_dir=inputs)
    assert run.returncode == 0 and run.run_state()["reason"] == "complete", run.stdout[-3000:]
    assert "precision float16" in run.stdout and "gradient checkpointing" in run.stdout
    assert "torch.compile failed" not in run.stdout and "training uncompiled" not in run.stdout
    history = json.loads((run.working / "training_history.json").read_text())
    assert [h["step"] for h in history if h["kind"] == "eval"] == [4]
    kept = sorted(p.name for p in (run.working / "checkpoints").iterdir())
    assert kept == ["checkpoint_epoch1_step3.pt", "checkpoint_epoch1_step4.pt"]  # rotation: the 2 newest
    assert (run.working / "best_model.pt").is_file()
    assert all(0 < h["train_loss"] < 10 for h in history if h["kind"] == "train")
    checkpoint = torch.load(run.working / "checkpoints/checkpoint_epoch1_step4.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] > 0
    assert not any(name.startswith("_orig_mod") or "._orig_mod." in name for name in checkpoint["model"])
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run.working / "final_model")
    assert final.dtype == torch.float32  # weights stay fp32: autocast only computes in fp16
    assert all(torch.equal(tensor, checkpoint["model"][name]) for name, tensor in final.state_dict().items()
               if name in checkpoint["model"])


@pytest.mark.slow
def test_a_compile_that_fails_at_the_first_step_falls_back_and_trains_the_same_steps(tmp_path):
    """torch.compile fails lazily (here: inductor finds no C++ compiler, as a Kaggle image with a broken
    toolchain would); the kernel says so in one line and redoes the step eagerly: the same weights as a run
    that never compiled (dropout off, so both take PyTorch's eager path)."""
    common = ["max_steps=2", "eval_steps=2", "save_steps=2", "n_layer=1", "dropout=0.0"]
    failed = run_kernel(render(tmp_path / "a", [*common, 'compile="on"']), tmp_path / "failed",
                        env={"CXX": str(tmp_path / "no-such-compiler")})
    assert failed.returncode == 0, failed.stdout[-3000:]
    lines = [line for line in failed.stdout.splitlines() if "torch.compile failed" in line]
    assert len(lines) == 1 and lines[0].endswith("training uncompiled")
    eager = run_kernel(render(tmp_path / "b", [*common, 'compile="off"']), tmp_path / "eager")
    a, b = (torch.load(run.working / "checkpoints/checkpoint_epoch1_step2.pt", weights_only=True)["model"]
            for run in (failed, eager))
    assert all(torch.equal(a[name], b[name]) for name in a)
