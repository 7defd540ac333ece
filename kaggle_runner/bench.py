"""Throughput benchmark over the kernel's own training step (kernel_template/kernel.py, not a copy).

FLOPs per token = 6 * N_matmul + 12 * n_layer * n_embd * max_length, where N_matmul = 12 * n_layer * n_embd^2
(attention and MLP weights) + padded_vocab * n_embd (the tied LM head): forward and backward matmuls plus
attention scores (the PaLM paper's accounting, appendix B). MFU divides the achieved FLOP/s by the device's
dense peak for the precision used. For other models (init_from, model_type = "llama") N_matmul is counted from
the model itself: every weight matrix but the embedding tables, plus a tied LM head.

A preset that fine-tunes a hub model (init_from = "HuggingFaceTB/SmolLM2-135M") needs the hub. Where it cannot
be reached (offline, as in CI and on a lent GPU machine), bench times the model's exact architecture with random
weights when it knows it (KNOWN_ARCHITECTURES): speed and memory depend on the shape, not on the weights'
values. For any other model it times a tiny random Llama and says its figures are not the model's.
"""

from __future__ import annotations

import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

from kaggle_runner.config import RunConfig, load_config, load_preset
from kaggle_runner.errors import KaggleRunnerError

# Dense peak FLOP/s by device name fragment and precision (vendor datasheets).
PEAK_FLOPS = {
    "T4": {"float16": 65e12, "float32": 8.1e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30e12},
    "P100": {"float16": 18.7e12, "float32": 9.3e12},
}
FLOPS_FORMULA = "6*N_matmul + 12*n_layer*n_embd*max_length"


def vocab_size_of(config: RunConfig) -> int:
    return config.bpe_vocab_size if config.tokenizer == "bpe" else 50257


def flops_per_token(config: RunConfig, padded_vocab: int) -> float:
    matmul = 12 * config.n_layer * config.n_embd ** 2 + padded_vocab * config.n_embd
    return 6 * matmul + 12 * config.n_layer * config.n_embd * config.max_length


def model_flops_per_token(model, max_length: int) -> float:
    """The same accounting for any *ForCausalLM: its weight matrices (a tied LM head once) and attention scores."""
    import torch

    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings().weight
    matmul = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings)
    matmul += head.numel() if id(head) in embeddings else 0
    settings = model.config
    return 6 * matmul + 12 * settings.num_hidden_layers * settings.hidden_size * max_length


# Architectures of the hub models the presets and docs name, from each model's config.json on the hub: what
# bench builds, with random weights, when the hub is out of reach.
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0},
    "Qwen/Qwen2.5-0.5B": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151643},
}
# What bench times for any other init_from it cannot load: a Llama, the commonest family, at toy size.
STAND_IN = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 8192}


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def known_architecture(init_from: str):
    """init_from's exact architecture with random weights (float32, SDPA attention, as load_pretrained gives)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(KNOWN_ARCHITECTURES[init_from])
    model_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa").float()


def build_bench_model(config: RunConfig, settings: dict[str, Any], vocab: int, device) -> tuple[Any, str | None]:
    """The kernel's model for this config; for an init_from that cannot be loaded here, its architecture with
    random weights when known, else a tiny random Llama; with a note saying which."""
    import os

    from kaggle_runner.kernel_template import kernel

    if not config.init_from:
        return kernel.prepare_model(settings, vocab, device), None
    reason = "the Hugging Face hub cannot be reached from here"
    if os.path.isdir(kernel.pretrained_source(settings)) or hub_reachable():
        try:
            return kernel.prepare_model(settings, vocab, device), None
        except kernel.KernelStop as exc:
            reason = str(exc).split(". ")[0]
    if config.init_from in KNOWN_ARCHITECTURES:
        model = kernel.prepare_model(settings, vocab, device, model=known_architecture(config.init_from))
        return model, (f"init_from {config.init_from!r} was not loaded ({reason}): timing its exact architecture "
                       "with random weights instead. Speed and memory are the real model's (they depend on the "
                       "shape, not the weights); the loss is not.")
    stand_in = {**settings, "init_from": None, "model_type": "llama", "dropout": 0.0,
                **{key: STAND_IN[key] for key in ("n_embd", "n_layer", "n_head")}}
    model = kernel.prepare_model(stand_in, STAND_IN["vocab_size"], device)
    note = (f"init_from {config.init_from!r} was not loaded ({reason}): timing a stand-in instead, a random "
            f"Llama (its family) of hidden size {STAND_IN['n_embd']}, {STAND_IN['n_layer']} layers and a "
            f"{STAND_IN['vocab_size']:,}-token vocabulary. Its figures show the training path works here; they say "
            "nothing about the real model's speed.")
    return model, note


def peak_flops(device_name: str, dtype: str) -> float | None:
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment in device_name:
            return peaks.get(dtype)
    return None


def synthetic_data(config: RunConfig, vocab: int, n_windows: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(config.seed)
    tokens = rng.integers(0, vocab, size=n_windows * config.max_length + 1, dtype=np.int64).astype(np.uint16
                                                                                                  if vocab < 2**16
                                                                                                  else np.uint32)
    return {"train": tokens, "validation": tokens, "train_windows": n_windows, "validation_windows": n_windows,
            "tokenizer_json": None}


DTYPES = ("auto", "float16", "bfloat16", "float32")
PRECISION_OF = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}  # --dtype -> the precision key


def prepare_kernel_run(config: RunConfig, steps: int, warmup: int, device: str = "auto",
                       dtype: str = "auto") -> dict[str, Any]:
    """The kernel's model, optimizer and run state over synthetic tokens, ready for optimizer_step.

    dtype other than auto overrides the configuration's precision, as the precision key does in the kernel:
    float16 runs a T4's path (fp16 autocast and GradScaler) on a newer GPU, or, slowly, on a CPU.
    """
    try:
        import torch
        import transformers  # noqa: F401 - the kernel's model
    except ImportError as exc:
        raise KaggleRunnerError(f"bench runs the kernel's training step here and needs the `local` extra ({exc}): "
                                "pip install -e '.[local]', with torch's CPU build first on a machine without a "
                                "GPU (see the README)") from None

    from kaggle_runner.kernel_template import kernel

    if steps < 1 or warmup < 0:
        raise KaggleRunnerError(f"--steps must be at least 1 and --warmup at least 0 (got {steps} and {warmup})")
    if dtype not in DTYPES:
        raise KaggleRunnerError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    settings = config.kernel_config()
    if device == "cuda" and not torch.cuda.is_available():
        raise KaggleRunnerError(f"--device cuda, but this torch ({torch.__version__}) sees no CUDA device; "
                                "use --device cpu, or run bench on a machine with a GPU")
    precision = settings["precision"] if dtype == "auto" else PRECISION_OF[dtype]
    torch_device, kernel_dtype = kernel.pick_device_and_dtype(device, precision)
    vocab = vocab_size_of(config)
    model, note = build_bench_model(config, settings, vocab, torch_device)
    if config.init_from:
        vocab = model.config.vocab_size
    windows_per_step = config.batch_size * config.gradient_accumulation_steps
    data = synthetic_data(config, vocab, windows_per_step * (steps + warmup))
    run = kernel.build_training(settings, data, model, torch_device, kernel_dtype, total_steps=steps + warmup)
    run.model = kernel.maybe_compile(run.eager_model, settings, torch_device)
    model.train()
    return {"run": run, "settings": settings, "device": torch_device, "dtype": kernel_dtype, "model": model,
            "vocab_size": vocab, "stand_in": note}


def benchmark_kernel(config: RunConfig, steps: int = 20, warmup: int = 3, device: str = "auto",
                     dtype: str = "auto") -> dict[str, Any]:
    import torch

    from kaggle_runner.kernel_template import kernel

    prepared = prepare_kernel_run(config, steps, warmup, device, dtype)
    run, settings, torch_device, model = prepared["run"], prepared["settings"], prepared["device"], prepared["model"]
    synchronize = torch.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        kernel.optimizer_step(run, settings)
    synchronize()
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        loss = kernel.optimizer_step(run, settings)
    last_loss = float(loss)  # one host sync at the end, as the kernel does at log steps
    synchronize()
    elapsed = time.perf_counter() - started
    tokens_per_second = steps * run.tokens_per_step / elapsed
    if torch_device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated() / 2**20
        device_name = torch.cuda.get_device_name()
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        device_name = "CPU"
    dtype_name = str(prepared["dtype"]).removeprefix("torch.")
    shape = model.config
    if config.init_from or config.model_type != "gpt2":
        per_token = model_flops_per_token(model, config.max_length)
    else:
        per_token = flops_per_token(config, model.config.vocab_size)
    peak = peak_flops(device_name, dtype_name)
    return {
        "tokens_per_second": tokens_per_second,
        "step_time_ms": elapsed / steps * 1000,
        "peak_memory_mb": peak_memory,
        "mfu": tokens_per_second * per_token / peak if peak else None,
        "device": torch_device.type,
        "device_name": device_name,
        "flops_per_token": per_token,
        "flops_formula": FLOPS_FORMULA,
        "peak_flops": peak,
        "torch": torch.__version__,
        "compiled": run.model is not run.eager_model,
        "loss": last_loss,  # the last step's: a finite number says the precision path trains
        "grad_scale": run.scaler.get_scale() if run.scaler is not None else None,  # fp16's GradScaler, else None
        "cpu_dropout_kernels": any(isinstance(module, kernel.CpuDropout) for module in model.modules()),
        "model": type(model).__name__,
        "parameters": kernel.count_parameters(model)["total"],
        "stand_in": prepared["stand_in"],  # why another model was timed, or None
        "config": {"n_embd": shape.hidden_size, "n_layer": shape.num_hidden_layers,
                   "n_head": shape.num_attention_heads, "vocab_size": prepared["vocab_size"],
                   "max_length": config.max_length,
                   "micro_batch_size": run.micro_batch_size,
                   "gradient_accumulation_steps": run.accumulation, "dtype": dtype_name},
    }


def run_benchmark(preset: str = "tiny", config_path: str | Path | None = None, overrides=(), steps: int = 20,
                  warmup: int = 3, device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    config = load_config(config_path, overrides) if config_path else load_preset(preset, overrides)
    result = benchmark_kernel(config, steps=steps, warmup=warmup, device=device, dtype=dtype)
    if result["stand_in"]:
        print(f"Note: {result['stand_in']}", file=sys.stderr, flush=True)
    return result
