"""The kernel's training math, checked on the CPU: its dropout and attention kernels (the same math as PyTorch's,
only drawn faster), and the module torch.compile compiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kaggle_runner.kernel_template import kernel

from kaggle_runner.bench import synthetic_data, vocab_size_of
from kaggle_runner.config import load_preset
from tests.kernel_helpers import FAST


def test_cpu_dropout_drops_p_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(1_000_000, requires_grad=True)
    out = kernel.cpu_dropout(x, 0.1)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 65536 / (65536 - 6554)))  # p = 6554/65536
    assert abs(out.mean().item() - 1.0) < 0.005
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # gradient flows through kept elements only, equally scaled


def test_cpu_dropout_masks_follow_the_seed_and_differ_between_calls():
    x = torch.ones(4096)
    torch.manual_seed(1)
    first, second = kernel.cpu_dropout(x, 0.5), kernel.cpu_dropout(x, 0.5)
    torch.manual_seed(1)
    assert torch.equal(kernel.cpu_dropout(x, 0.5), first)  # resume restores the RNG: same masks again
    assert not torch.equal(first, second)


def test_cpu_attention_is_causal_sdpa_when_nothing_is_dropped():
    torch.manual_seed(0)
    batch, heads, length, head_dim = 2, 4, 16, 8
    fused = torch.randn(batch, length, 3 * heads * head_dim, requires_grad=True)
    query, key, value = (t.view(batch, length, heads, head_dim).transpose(1, 2)
                         for t in fused.split(heads * head_dim, dim=2))
    # p below the mask's resolution of 1/65536 takes the CPU path but drops nothing
    ours, _ = kernel.cpu_attention(None, query, key, value, None, dropout=1e-7, scaling=head_dim ** -0.5)
    (ours_grad,) = torch.autograd.grad(ours.square().sum(), fused)
    theirs = F.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(1, 2)
    (theirs_grad,) = torch.autograd.grad(theirs.square().sum(), fused)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-4)


def test_cpu_training_model_evaluates_like_the_plain_gpt2_it_exports():
    settings = load_preset("tiny", FAST).kernel_config()
    plain = kernel.build_model(settings, 256).eval()
    ours = kernel.prepare_model(settings, 256, torch.device("cpu"))
    assert any(isinstance(m, kernel.CpuDropout) for m in ours.modules())
    assert ours.config._attn_implementation == kernel.CPU_ATTENTION
    tokens = torch.randint(0, 256, (2, 32))
    ours.eval()
    assert torch.allclose(ours(input_ids=tokens).logits, plain(input_ids=tokens).logits, atol=1e-5)
    ours.train()
    torch.manual_seed(3)
    first = ours(input_ids=tokens).logits
    torch.manual_seed(3)
    assert torch.equal(ours(input_ids=tokens).logits, first)  # dropout active, and seeded
    assert not torch.allclose(first, plain(input_ids=tokens).logits, atol=1e-3)


def test_what_torch_compile_sees_includes_the_loss():
    """The loss over the vocabulary is the step's largest tensor: it must be inside the compiled graph, where
    inductor fuses it, not left to run eagerly after the model's logits."""
    config = load_preset("tiny", FAST)
    settings = config.kernel_config()
    vocab = vocab_size_of(config)
    data = synthetic_data(config, vocab, config.batch_size * config.gradient_accumulation_steps)
    model = kernel.prepare_model(settings, vocab, torch.device("cpu"))
    run = kernel.build_training(settings, data, model, torch.device("cpu"), torch.float32, total_steps=1)
    traced_ops: set[str] = set()

    def recording_backend(graph_module, example_inputs):
        traced_ops.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    batch = kernel.gather_windows(data["train"], range(2), config.max_length)
    loss = torch.compile(run.eager_model, backend=recording_backend)(batch)
    assert loss.dim() == 0
    assert any("cross_entropy" in op for op in traced_ops), sorted(traced_ops)
    torch.manual_seed(0)
    assert torch.equal(run.eager_model.eval()(batch), kernel.lm_loss(model.eval(), batch))


def test_gpu_check_knows_which_devices_torch_can_run_on():
    current = ["sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]  # a torch 2.x CUDA 12 build
    assert not kernel.arch_supported(6, 0, current)  # P100: retired from the build
    assert kernel.arch_supported(7, 5, current)  # T4
    assert kernel.arch_supported(8, 9, current)  # L4 runs sm_86 cubins
    assert kernel.arch_supported(10, 0, current)  # newer than the build: PTX is compiled for it
    assert not kernel.arch_supported(10, 0, ["sm_75", "sm_80"])
    assert kernel.arch_supported(9, 0, ["sm_90a"])
