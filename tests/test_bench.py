"""`kaggle-runner bench`: the kernel's own step, timed, reported as the JSON contract promises."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kaggle_runner.bench import flops_per_token, peak_flops
from kaggle_runner.cli import cli
from kaggle_runner.config import load_preset


def test_bench_json_reports_tokens_time_memory_and_the_shape(cli_runner):
    result = cli_runner.invoke(cli, ["bench", "--preset", "tiny", "--set", "n_layer=2", "--steps", "2",
                                     "--warmup", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["config"] == {"n_embd": 128, "n_layer": 2, "n_head": 4, "vocab_size": 2048, "max_length": 128,
                                "micro_batch_size": 8, "gradient_accumulation_steps": 2, "dtype": "float32"}
    assert report["device"] == "cpu" and report["mfu"] is None  # no peak is known for a CPU
    assert report["tokens_per_second"] > 0 and report["peak_memory_mb"] > 0
    # tokens/s and step time describe the same steps: 16 windows of 128 tokens each
    assert report["tokens_per_second"] * report["step_time_ms"] / 1000 == pytest.approx(16 * 128)
    assert report["cpu_dropout_kernels"] is True and report["compiled"] is False


def test_flops_per_token_is_the_issues_arithmetic_for_the_seed_shape():
    seed = load_preset("seed")
    # 19.16M matmul parameters (blocks plus the tied LM head over 50,304 padded tokens) -> 1.276e8 FLOPs/token
    assert flops_per_token(seed, 50304) == 6 * (12 * 8 * 256**2 + 50304 * 256) + 12 * 8 * 256 * 512 == 127_598_592
    assert peak_flops("Tesla T4", "float16") == 65e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("Some Unknown GPU", "float16") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_bench_on_cuda_without_a_gpu_says_what_to_do(cli_runner):
    result = cli_runner.invoke(cli, ["bench", "--device", "cuda", "--steps", "1"])
    assert result.exit_code == 1 and "sees no CUDA device" in result.output and "--device cpu" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_bench_runs_the_t4_fp16_path_on_a_cpu_when_asked(cli_runner):
    """--dtype float16 (the precision key's fp16) autocasts and scales the loss as on a T4, here on the CPU."""
    result = cli_runner.invoke(cli, ["bench", "--preset", "tiny", "--set", "n_layer=1", "--steps", "2",
                                     "--warmup", "0", "--device", "cpu", "--dtype", "float16", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["config"]["dtype"] == "float16" and report["tokens_per_second"] > 0
    assert math.isfinite(report["loss"]) and report["grad_scale"] > 0  # a GradScaler ran the steps


def test_bench_finetune_preset_times_smollm2s_exact_architecture_when_the_hub_is_out_of_reach(cli_runner,
                                                                                             monkeypatch):
    """Offline (CI, a lent GPU machine) the figures are still the real model's: same shape, random weights."""
    from kaggle_runner import bench

    monkeypatch.setattr(bench, "hub_reachable", lambda timeout=3.0: False)  # as offline CI is, without waiting
    result = cli_runner.invoke(cli, ["bench", "--preset", "finetune", "--set", "max_length=32", "--set",
                                     "batch_size=1", "--set", "gradient_accumulation_steps=1", "--steps", "1",
                                     "--warmup", "0", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert "Note: init_from 'HuggingFaceTB/SmolLM2-135M' was not loaded" in result.output
    assert "its exact architecture" in report["stand_in"]
    assert report["model"] == "LlamaForCausalLM" and report["parameters"] == 134_515_008  # docs/kernel.md's count
    assert report["config"] == {"n_embd": 576, "n_layer": 30, "n_head": 9, "vocab_size": 49152, "max_length": 32,
                                "micro_batch_size": 1, "gradient_accumulation_steps": 1, "dtype": "float32"}
    assert report["tokens_per_second"] * report["step_time_ms"] / 1000 == pytest.approx(32)
    assert report["cpu_dropout_kernels"] is False  # a Llama keeps its own attention


def test_bench_times_a_tiny_stand_in_for_a_hub_model_it_does_not_know(cli_runner, monkeypatch):
    from kaggle_runner import bench

    monkeypatch.setattr(bench, "hub_reachable", lambda timeout=3.0: False)
    result = cli_runner.invoke(cli, ["bench", "--preset", "finetune", "--set", 'init_from="someone/their-model"',
                                     "--set", "max_length=64", "--set", "batch_size=2", "--set",
                                     "gradient_accumulation_steps=2", "--steps", "1", "--warmup", "0", "--device",
                                     "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert "nothing about the real model's speed" in report["stand_in"]
    assert report["config"]["n_embd"] == 64 and report["config"]["vocab_size"] == 8192
    assert report["tokens_per_second"] * report["step_time_ms"] / 1000 == pytest.approx(4 * 64)


@pytest.mark.slow  # builds a 0.5B-parameter model on the CPU
def test_known_architectures_build_the_hub_models_parameter_counts():
    from kaggle_runner.bench import known_architecture

    qwen = known_architecture("Qwen/Qwen2.5-0.5B")
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in qwen.parameters()) == 494_032_768  # Qwen2.5-0.5B's published count


def test_flops_per_token_of_any_model_matches_the_gpt2_formula_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    from kaggle_runner.bench import model_flops_per_token

    config = load_preset("tiny", ["n_embd=32", "n_layer=2", "n_head=4", "max_length=16"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=4))
    assert model_flops_per_token(model, 16) == flops_per_token(config, 128)
