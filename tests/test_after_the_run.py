"""After the run: `generate` samples from the fetched model, `report` draws the run at a glance.

generate runs on a real (tiny, random) GPT-2 saved the way the kernel saves final_model/ and best_model.pt;
report runs on a stub chain of two segments, so the store, the segment table and the history are the
launcher's own.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from kaggle_runner.cli import cli
from tests.chain_helpers import STUB_CHAIN, sets

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

CONTEXT = 32
EOS = "<|endoftext|>"
TEXT = ["The quick brown fox jumps over the lazy dog.", "A small model trained on a laptop writes text.",
        "Kaggle sessions end; the chain resumes from the newest checkpoint.", "Loss goes down, step by step."] * 8


def _tiny_gpt(tokenizer, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=(vocab + 63) // 64 * 64, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1, tie_word_embeddings=True,
                        activation_function="gelu_pytorch_tanh")
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """outputs as the kernel leaves them: final_model/ (save_pretrained) and best_model.pt (its payload)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("trained")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    _tiny_gpt(tokenizer, seed=1).save_pretrained(folder / "final_model")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                            model_max_length=CONTEXT).save_pretrained(folder / "final_model")
    best = _tiny_gpt(tokenizer, seed=2)
    torch.save({"kernel_format": 2, "model": best.state_dict(), "config": {"n_head": 2, "max_length": CONTEXT},
                "global_step": 10, "epoch": 1, "val_loss": 0.5, "tokenizer_json": tokenizer.to_str(),
                "vocab_size": tokenizer.get_vocab_size()}, folder / "best_model.pt")
    return folder


@pytest.fixture
def fetched(tmp_path, monkeypatch, trained) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, tmp_path / "outputs/r")
    return tmp_path


def generate(cli_runner, *args: str):
    return cli_runner.invoke(cli, ["generate", "r", *args])


def test_generate_prints_text_and_a_seed_repeats_it(fetched, cli_runner):
    first = generate(cli_runner, "The quick", "--tokens", "12", "--seed", "7")
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("The quick") and len(first.stdout.strip()) > len("The quick")
    again = generate(cli_runner, "The quick", "--tokens", "12", "--seed", "7")
    assert again.stdout == first.stdout
    other = [generate(cli_runner, "The quick", "--tokens", "12", "--seed", str(seed)).stdout for seed in (8, 9, 10)]
    assert any(text != first.stdout for text in other)
    greedy = generate(cli_runner, "The quick", "--tokens", "12", "--temperature", "0")
    assert greedy.exit_code == 0 and greedy.stdout == generate(cli_runner, "The quick", "--tokens", "12",
                                                               "--temperature", "0").stdout


def test_a_prompt_longer_than_the_context_is_cut_from_the_left(fetched, cli_runner):
    prompt = " ".join(TEXT[:6])  # far more than 32 tokens
    result = generate(cli_runner, prompt, "--tokens", "200", "--seed", "1", "--top-k", "0")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "context of 32" in result.stderr
    assert "the model sees its last 16" in result.stderr  # half the context stays the prompt's
    assert "Loading weights" not in result.output
    assert result.stdout.strip() and not result.stdout.startswith(TEXT[0][:10])


def test_best_uses_best_model_pt_as_a_hugging_face_folder(fetched, cli_runner):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = generate(cli_runner, "Loss goes", "--tokens", "12", "--seed", "3")
    best = generate(cli_runner, "Loss goes", "--tokens", "12", "--seed", "3", "--best")
    assert best.exit_code == 0, best.output
    assert best.stdout.startswith("Loss goes") and best.stdout != final.stdout
    folder = fetched / "outputs/r/best_model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    payload = torch.load(fetched / "outputs/r/best_model.pt", weights_only=True)
    for key, tensor in payload["model"].items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert AutoTokenizer.from_pretrained(folder).model_max_length == CONTEXT
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert generate(cli_runner, "Loss goes", "--tokens", "12", "--seed", "3", "--best").stdout == best.stdout
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # built once, reused
    # Before training completes there is no final_model/: the payload alone rebuilds the model.
    shutil.rmtree(folder)
    shutil.rmtree(fetched / "outputs/r/final_model")
    assert generate(cli_runner, "Loss goes", "--tokens", "12", "--seed", "3", "--best").stdout == best.stdout


def test_generate_fetches_the_outputs_when_they_are_not_here(fetched, cli_runner, monkeypatch, trained):
    shutil.rmtree(fetched / "outputs/r")
    calls = []

    def fake_fetch(workspace, name, out_dir=None, console=None, endpoint=None):
        calls.append((name, out_dir))
        shutil.copytree(trained, out_dir)
        return Path(out_dir)

    monkeypatch.setattr("kaggle_runner.launcher.fetch_run", fake_fetch)
    result = generate(cli_runner, "The", "--tokens", "5", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert calls == [("r", str(Path("outputs/r")))]
    assert generate(cli_runner, "The", "--tokens", "5", "--seed", "1").stdout == result.stdout
    assert len(calls) == 1


def test_without_torch_generate_names_the_extra(fetched, cli_runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    result = generate(cli_runner, "The")
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "pip install 'kaggle-runner[local]'" in result.output


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the report extra is not installed")
def test_report_draws_every_segment_and_the_samples(stub_project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "r", *sets(STUB_CHAIN)])  # 20 steps, two segments
    assert result.exit_code == 0, result.output
    result = cli_runner.invoke(cli, ["report", "r"])
    assert result.exit_code == 0, result.output
    page, chart = Path("outputs/r/report.html"), Path("outputs/r/report.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    text = page.read_text()
    assert "Run r" in text and "data:image/png;base64," in text
    assert "stub sample at step 20: &lt;&amp;&gt;" in text  # escaped
    rows = [line for line in text.splitlines() if line.startswith("<tr><td>")]
    assert len(rows) == 2 and "<td>1</td><td>1</td><td>COMPLETE</td>" in rows[0] and "0 → 10" in rows[0]
    assert "10 → 20" in rows[1] and "<td>2</td><td>2</td>" in rows[1]
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    # The format before "kind": every entry is an evaluation; -o names the page, the PNG goes beside it.
    history = json.loads(Path("outputs/r/training_history.json").read_text())
    old = [{k: v for k, v in h.items() if k != "kind"} for h in history if h["kind"] == "eval"]
    Path("outputs/r/training_history.json").write_text(json.dumps(old))
    result = cli_runner.invoke(cli, ["report", "r", "-o", "elsewhere/old.html"])
    assert result.exit_code == 0, result.output
    assert Path("elsewhere/old.png").stat().st_size > 10_000
    assert "wrote no samples" in Path("elsewhere/old.html").read_text()


def test_without_matplotlib_report_names_the_extra(tmp_path, cli_runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = cli_runner.invoke(cli, ["report", "r"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "pip install 'kaggle-runner[report]'" in result.output


def test_unknown_run_is_one_line(tmp_path, cli_runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli_runner.invoke(cli, ["report", "nope"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0


@pytest.mark.parametrize("plant", ["auto_map", "python_file", "unknown_type", "pickled_weights"])
def test_generate_never_runs_code_from_the_outputs_and_never_asks(tmp_path, trained, cli_runner, plant):
    outputs = tmp_path / "outputs"
    shutil.copytree(trained, outputs)
    final = outputs / "final_model"
    config = json.loads((final / "config.json").read_text())
    if plant == "auto_map":  # transformers would ask "Do you wish to run the custom code? [y/N]"
        config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
        (final / "evil.json").write_text("{}")
    elif plant == "python_file":
        (final / "evil.py").write_text("import os; os.system('touch pwned')\n")
    elif plant == "unknown_type":
        config["model_type"] = "evil-remote-model"
    else:  # a pickle runs code when it is loaded
        (final / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    (final / "config.json").write_text(json.dumps(config))
    for best in ([], ["--best"]):
        result = cli_runner.invoke(cli, ["generate", "run", "Hello", "--outputs", str(outputs), *best], input="y\n")
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "[y/N]" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not Path("pwned").exists() and not (outputs / "best_model").exists()


def test_best_weights_need_a_torch_whose_safe_loads_are_safe(tmp_path, trained, cli_runner, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    outputs = tmp_path / "outputs"
    shutil.copytree(trained, outputs)
    result = cli_runner.invoke(cli, ["generate", "run", "Hello", "--outputs", str(outputs), "--best"])
    assert result.exit_code == 1 and "CVE-2025-32434" in result.output and "2.6" in result.output, result.output
