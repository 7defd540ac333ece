"""Where the kernel's step spends its GPU time, and what that implies for 3 epochs of WikiText-103 on 2×T4.

No T4 is lent here, so the estimate is derived, not measured: the seed shape's step is profiled on the GPU at
hand, its kernels sorted into matmuls, attention and the rest (memory-bound: norms, GELU, dropout, the loss,
AdamW), and each class is rescaled to a T4 by what bounds it there:

  matmuls    FLOPs from bench's formula / the T4's sustained fp16 tensor-core rate (24 TFLOP/s; 16 pessimistic)
  attention  time here × peak-FLOP/s ratio (this GPU's dense peak / the T4's 65 TFLOP/s)
  the rest   time here × memory-bandwidth ratio (this GPU's / the T4's 320 GB/s)
  DDP        the gradients' all-reduce, bytes / 5 GB/s (PCIe through host memory), not overlapped

Rescaling small kernels by a ratio of peaks overstates their T4 time (here they are latency-bound, not
bandwidth-bound), so the estimate leans pessimistic. The host's own time per step is reported too: a T4 is
GPU-bound only if that stays below the T4's GPU time. Usage:

    python benchmarks/gpu_profile.py [--preset seed] [--steps 5] [--dtype auto] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from kaggle_runner.kernel_template import kernel

from kaggle_runner.bench import flops_per_token, peak_flops, prepare_kernel_run
from kaggle_runner.config import load_preset

WIKITEXT_103_TRAIN_TOKENS = 117.9e6  # GPT-2 tokens in the train split (the count)
EPOCHS = 3
T4 = {"matmul_flops": 24e12, "matmul_flops_pessimistic": 16e12, "peak_flops": 65e12, "bandwidth": 320e9}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12, "T4": 0.32e12}
ALLREDUCE_BYTES_PER_SECOND = 5e9
MATMUL_NAMES = ("gemm", "nvjet", "xmma", "cutlass", "splitk", "matmul")
ATTENTION_NAMES = ("flash", "fmha", "attention", "attn")


def kernel_class(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith(("memcpy", "memset")):
        return "copies"
    if any(fragment in lowered for fragment in ATTENTION_NAMES):
        return "attention"
    if any(fragment in lowered for fragment in MATMUL_NAMES):
        return "matmul"
    return "other"


def gpu_time_by_class(profile) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Microseconds of device time per kernel class, and the heaviest kernels by name."""
    by_class = {"matmul": 0.0, "attention": 0.0, "other": 0.0, "copies": 0.0}
    by_name: dict[str, float] = {}
    for event in profile.events():
        # Annotations such as "Optimizer.step#AdamW.step" sit on the GPU timeline over kernels counted anyway.
        if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        duration = event.time_range.elapsed_us()
        by_class[kernel_class(event.name)] += duration
        by_name[event.name] = by_name.get(event.name, 0.0) + duration
    heaviest = sorted(by_name.items(), key=lambda item: -item[1])[:15]
    return by_class, heaviest


def bandwidth_of(device_name: str) -> float | None:
    return next((value for fragment, value in BANDWIDTH.items() if fragment in device_name), None)


def t4_estimate(gpu_ms: dict[str, float], matmul_flops_per_step: float, tokens_per_step: int, peak: float,
                bandwidth: float, parameters: int) -> dict:
    """One optimizer step's time on one T4 and on two under DDP, and 3 epochs of WikiText-103 at that pace."""
    # One T4 does half of each optimizer step's windows under DDP; the all-reduce moves fp32 gradients.
    allreduce_s = 4 * parameters / ALLREDUCE_BYTES_PER_SECOND
    estimate: dict = {"assumptions": {**T4, "this_gpu_peak_flops": peak, "this_gpu_bandwidth": bandwidth,
                                      "allreduce_bytes_per_second": ALLREDUCE_BYTES_PER_SECOND,
                                      "allreduce_s_per_step": allreduce_s, "parameters": parameters}}
    for label, matmul_rate in (("sustained_24_tflops", T4["matmul_flops"]),
                               ("pessimistic_16_tflops", T4["matmul_flops_pessimistic"])):
        parts_s = {"matmul": matmul_flops_per_step / matmul_rate,
                   "attention": gpu_ms["attention"] / 1000 * peak / T4["peak_flops"],
                   "other": (gpu_ms["other"] + gpu_ms["copies"]) / 1000 * bandwidth / T4["bandwidth"]}
        one_t4_step_s = sum(parts_s.values())
        two_t4_step_s = one_t4_step_s / 2 + allreduce_s
        estimate[label] = {"one_t4_step_s_by_class": parts_s, "one_t4_step_s": one_t4_step_s,
                           "two_t4_step_s": two_t4_step_s,
                           "two_t4_tokens_per_second": tokens_per_step / two_t4_step_s,
                           "three_epochs_minutes": WIKITEXT_103_TRAIN_TOKENS * EPOCHS / tokens_per_step
                           * two_t4_step_s / 60}
    return estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed", choices=["tiny", "seed"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="cpu only checks the script")
    args = parser.parse_args()
    config = load_preset(args.preset, args.overrides)
    prepared = prepare_kernel_run(config, 2 * args.steps, args.warmup, args.device, args.dtype)
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    run, settings, model = prepared["run"], prepared["settings"], prepared["model"]
    for _ in range(args.warmup):
        kernel.optimizer_step(run, settings)
    synchronize()

    started = time.perf_counter()  # unprofiled: the step's wall time as training sees it
    for _ in range(args.steps):
        kernel.optimizer_step(run, settings)
    queued = time.perf_counter()  # the host's own time, if the GPU never made it wait
    synchronize()
    wall_ms = (time.perf_counter() - started) / args.steps * 1000
    host_ms = (queued - started) / args.steps * 1000

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(args.steps):
            kernel.optimizer_step(run, settings)
        synchronize()
    by_class, heaviest = gpu_time_by_class(profile)
    gpu_ms = {name: micros / args.steps / 1000 for name, micros in by_class.items()}
    busy_ms = sum(gpu_ms.values())

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    dtype_name = str(prepared["dtype"]).removeprefix("torch.")
    tokens_per_step = run.tokens_per_step
    per_token = flops_per_token(config, model.config.vocab_size)
    attention_flops = 12 * config.n_layer * config.n_embd * config.max_length
    matmul_flops_per_step = (per_token - attention_flops) * tokens_per_step
    peak = peak_flops(device_name, dtype_name)
    bandwidth = bandwidth_of(device_name)
    parameters = sum(p.numel() for p in model.parameters())
    report = {
        "device_name": device_name, "dtype": dtype_name, "torch": torch.__version__,
        "compiled": run.model is not run.eager_model, "tokens_per_step": tokens_per_step, "steps": args.steps,
        "step_wall_ms": wall_ms, "host_loop_ms": host_ms, "tokens_per_second": tokens_per_step / wall_ms * 1000,
        "mfu": tokens_per_step / wall_ms * 1000 * per_token / peak if peak else None,
        "gpu_ms_per_step": gpu_ms, "gpu_busy_fraction": busy_ms / wall_ms,
        "matmul_tflops_achieved": (matmul_flops_per_step / (gpu_ms["matmul"] / 1000) / 1e12
                                   if gpu_ms["matmul"] else None),
        "heaviest_kernels_ms_per_step": [(name[:120], micros / args.steps / 1000) for name, micros in heaviest],
    }
    if peak and bandwidth:
        report["t4_estimate"] = t4_estimate(gpu_ms, matmul_flops_per_step, tokens_per_step, peak, bandwidth,
                                            parameters)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
