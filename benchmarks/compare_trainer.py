"""Kernel training step vs Hugging Face Trainer: same model shape, tokens, batch, optimizer settings.

The two alternate, round after round, so machine drift hits both alike; the ratio of medians is the figure
reported in docs/performance.md. Usage:

    python benchmarks/compare_trainer.py --preset tiny --rounds 3 --steps 20 [--set KEY=VALUE ...] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from kaggle_runner.kernel_template import kernel

from kaggle_runner.bench import benchmark_kernel, synthetic_data, vocab_size_of
from kaggle_runner.config import RunConfig, load_preset


class WindowDataset(torch.utils.data.Dataset):
    """The kernel's windows as a user would feed them to Trainer: input_ids and labels (the model shifts)."""

    def __init__(self, tokens, n_windows: int, length: int):
        self.tokens, self.n_windows, self.length = tokens, n_windows, length

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, index: int) -> dict:
        ids = torch.from_numpy(self.tokens[index * self.length:(index + 1) * self.length].astype("int64"))
        return {"input_ids": ids, "labels": ids}


def default_gpt2(config: RunConfig, vocab: int):
    """The model a user would write: GPT-2 of the same shape and dropout, transformers' defaults otherwise."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=config.max_length, n_embd=config.n_embd,
                                      n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.dropout,
                                      embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                                      bos_token_id=vocab - 1, eos_token_id=vocab - 1))


def benchmark_trainer(config: RunConfig, steps: int, warmup: int, device: str) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch_device, dtype = kernel.pick_device_and_dtype(device)
    vocab = vocab_size_of(config)
    windows = config.batch_size * config.gradient_accumulation_steps * (steps + warmup)
    data = synthetic_data(config, vocab, windows)
    model = default_gpt2(config, vocab)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch_device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(
            output_dir=output, max_steps=steps + warmup, per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
            weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, lr_scheduler_type="cosine",
            max_grad_norm=config.max_grad_norm, adam_beta2=0.95, logging_steps=10**9, save_strategy="no",
            report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=config.seed,
            use_cpu=torch_device.type == "cpu", fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16)
        Trainer(model=model, args=arguments, train_dataset=WindowDataset(data["train"], windows, config.max_length),
                callbacks=[Clock()]).train()
    timed = stamps[warmup - 1:] if warmup else [stamps[0], *stamps]
    elapsed = timed[-1] - timed[0]
    tokens_per_step = config.batch_size * config.gradient_accumulation_steps * config.max_length
    return {"tokens_per_second": (len(timed) - 1) * tokens_per_step / elapsed,
            "step_time_ms": elapsed / (len(timed) - 1) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "seed"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    config = load_preset(args.preset, args.overrides)
    ours, theirs = [], []
    for round_number in range(1, args.rounds + 1):
        kernel_result = benchmark_kernel(config, args.steps, args.warmup, args.device)
        trainer_result = benchmark_trainer(config, args.steps, args.warmup, args.device)
        ours.append(kernel_result["tokens_per_second"])
        theirs.append(trainer_result["tokens_per_second"])
        print(json.dumps({"round": round_number, "kernel_tokens_per_second": round(ours[-1], 1),
                          "trainer_tokens_per_second": round(theirs[-1], 1)}), flush=True)
    summary = {"preset": args.preset, "overrides": args.overrides, "device": kernel_result["device_name"],
               "dtype": kernel_result["config"]["dtype"], "torch": torch.__version__, "rounds": args.rounds,
               "steps": args.steps, "kernel_tokens_per_second": statistics.median(ours),
               "trainer_tokens_per_second": statistics.median(theirs),
               "ratio": statistics.median(ours) / statistics.median(theirs), "kernel_mfu": kernel_result["mfu"],
               "kernel_peak_memory_mb": kernel_result["peak_memory_mb"]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
