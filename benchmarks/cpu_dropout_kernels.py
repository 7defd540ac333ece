"""The kernel's CPU dropout kernels against PyTorch's own dropout and SDPA, same step, alternating rounds.

Both sides run the kernel's optimizer_step on the same synthetic tokens and initial weights; the only
difference is use_cpu_dropout_kernels (what prepare_model applies on CPU). Usage:

    python benchmarks/cpu_dropout_kernels.py [--preset tiny] [--rounds 5] [--steps 10] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from kaggle_runner.kernel_template import kernel

from kaggle_runner.bench import synthetic_data, vocab_size_of
from kaggle_runner.config import load_preset


def training(config, with_kernels: bool, steps: int) -> tuple[dict, dict]:
    settings = config.kernel_config()
    device = torch.device("cpu")
    vocab = vocab_size_of(config)
    data = synthetic_data(config, vocab, config.batch_size * config.gradient_accumulation_steps * steps)
    model = kernel.build_model(settings, vocab)
    if with_kernels:
        kernel.use_cpu_dropout_kernels(model)
    run = kernel.build_training(settings, data, model, device, torch.float32, total_steps=steps)
    model.train()
    return run, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "seed"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    config = load_preset(args.preset, args.overrides)
    total = args.rounds * args.steps + 2
    sides = {"pytorch": training(config, False, total), "kernel": training(config, True, total)}
    timings: dict[str, list[float]] = {name: [] for name in sides}
    for run, settings in sides.values():  # warm-up
        for _ in range(2):
            kernel.optimizer_step(run, settings)
    for round_number in range(1, args.rounds + 1):
        for name, (run, settings) in sides.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                loss = kernel.optimizer_step(run, settings)
            float(loss)
            timings[name].append(args.steps * run.tokens_per_step / (time.perf_counter() - started))
        print(json.dumps({"round": round_number, **{name: round(v[-1], 1) for name, v in timings.items()}}),
              flush=True)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    print(json.dumps({"preset": args.preset, "overrides": args.overrides, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "tokens_per_second": medians,
                      "ratio": medians["kernel"] / medians["pytorch"]}))


if __name__ == "__main__":
    main()
