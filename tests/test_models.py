"""Your model, your data: init_from (a folder, the path a hub id takes), model_type = "llama", hf: datasets and
.jsonl text files, with every kernel guarantee (exact resume, final_model/) on tiny models, offline."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from kaggle_runner.kernel_template import kernel

from kaggle_runner.config import ConfigError, load_preset
from tests.kernel_helpers import attach_checkpoint, render, run_kernel

# 8 steps of 4 windows of 32 tokens: a few seconds per kernel run on 2 cores.
SMALL = ["max_length=32", "batch_size=4", "gradient_accumulation_steps=1", "max_steps=8", "eval_steps=4",
         "save_steps=2", "log_steps=2", "eval_batches=2", "warmup_steps=2", "sample_tokens=4"]


def corpus_documents() -> list[str]:
    """Paragraphs of a few standard library modules' source: real text, no download."""
    documents = []
    for name in ("argparse", "textwrap"):
        source = (Path(sys.modules["os"].__file__).parent / f"{name}.py").read_text()
        documents += [p.strip() for p in source.split("\n\n") if len(p.strip()) > 80]
    return documents[:300]


def save_tiny_model(folder: Path, family: str) -> Path:
    """A random model of the family with a small trained BPE tokenizer, saved as a hub model would be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    specials = ["<s>", "</s>"] if family == "llama" else ["<|endoftext|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus_documents(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    if family == "gpt2":
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                       bos_token="<|endoftext|>")
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                    bos_token_id=0, eos_token_id=0))
    elif family == "qwen2":  # Qwen2.5's layout: biased q/k/v projections, grouped KV heads, no BOS token
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=0))
    else:  # a Llama-style tokenizer: its post-processor puts <s> before every text
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, bos_token_id=0, eos_token_id=1))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def save_dataset_without_validation(folder: Path) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"body": corpus_documents()})}).save_to_disk(str(folder))
    return folder


def write_jsonl_corpus(folder: Path) -> None:
    folder.mkdir(parents=True)
    documents = corpus_documents()
    for index in range(2):
        lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(documents) if i % 2 == index]
        (folder / f"part{index}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "notes.md").write_text("# Notes\n\n" + "\n\n".join(documents[:20]))


def weights(run, step: int) -> dict:
    return torch.load(run.working / f"checkpoints/checkpoint_epoch1_step{step}.pt", weights_only=True)["model"]


def deterministic_history(run) -> list:
    return [(h["kind"], h["step"], h.get("train_loss"), h.get("val_loss"), h.get("lr"))
            for h in json.loads((run.working / "training_history.json").read_text()) if h["kind"] != "sample"]


def check_exact_resume(tmp: Path, overrides: list[str], inputs: Path, env: dict | None = None) -> tuple:
    """An uninterrupted run of 8 steps, and a chain segment resumed from its step-4 checkpoint (what a segment
    stopped at step 4 leaves: tests/test_kernel.py proves those bytes equal) that segment_steps stops at step 6:
    bitwise the same weights, optimizer state and history at step 6. Two kernel runs, not three."""
    straight = run_kernel(render(tmp / "a", [*overrides, "max_checkpoints=4"]), tmp / "straight", input_dir=inputs,
                          env=env)
    assert straight.returncode == 0, straight.stdout[-3000:]
    chain = attach_checkpoint(straight.working, inputs, checkpoint="checkpoints/checkpoint_epoch1_step4.pt")
    second = run_kernel(render(tmp / "b", [*overrides, "max_checkpoints=4", "segment_steps=2"], chain),
                        tmp / "second", input_dir=inputs)
    assert second.returncode == 0 and second.run_state()["reason"] == "step_budget", second.stdout[-3000:]
    assert second.events("start")[0]["resumed_from"]["global_step"] == 4 and second.run_state()["global_step"] == 6
    assert "Data: reusing tokens" in second.stdout
    a, b = (torch.load(run.working / "checkpoints/checkpoint_epoch1_step6.pt", weights_only=True)
            for run in (straight, second))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][k]["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
               for k in a["optimizer"]["state"])
    assert deterministic_history(second) == [e for e in deterministic_history(straight) if e[1] <= 6]
    entries = json.loads((second.working / "training_history.json").read_text())
    assert [h["segment"] for h in entries if h["kind"] != "sample"] == [1, 1, 1, 2]  # train 2, 4, eval 4 | 6
    assert entries[-1]["wall_time"] >= entries[-3]["wall_time"]
    return straight, second


def check_final_model(run, text: str = "Return the parser") -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run.working / "final_model")
    tokenizer = AutoTokenizer.from_pretrained(run.working / "final_model")
    assert tokenizer.model_max_length == 32
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] >= len(tokenizer)
    saved = torch.load(run.working / "checkpoints/checkpoint_epoch1_step8.pt", weights_only=True)["model"]
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items() if name in saved)


@pytest.mark.slow
def test_pretrained_gpt2_folder_on_an_hf_dataset_without_validation_split(tmp_path):
    """init_from a GPT-2 folder (dropout on: the CPU dropout kernels apply), gradient checkpointing, and
    dataset = hf:<folder saved with save_to_disk> whose validation split is carved from train."""
    model = save_tiny_model(tmp_path / "gpt2-tiny", "gpt2")
    data = save_dataset_without_validation(tmp_path / "hf-data")
    overrides = [*SMALL, f"init_from={json.dumps(str(model))}", f"dataset={json.dumps('hf:' + str(data))}",
                 'text_column="body"', "gradient_checkpointing=true"]
    straight, second = check_exact_resume(tmp_path, overrides, tmp_path / "input")
    assert "has no validation split; 6 of 300 documents carved from train (fixed by seed 42)" in straight.stdout
    assert "Model: pretrained" in straight.stdout and "GPT2LMHeadModel" in straight.stdout
    start = straight.events("start")[0]
    assert start["parameters"] - start["parameters_without_embeddings"] == (320 + 64) * 32  # wte + wpe
    check_final_model(straight)


@pytest.mark.slow
def test_pretrained_llama_folder_on_jsonl_files_in_an_attached_dataset(tmp_path):
    """The finetune preset's path on a T4, on the CPU: init_from a Llama folder, gradient checkpointing, fp16
    autocast with a GradScaler (whose state every checkpoint carries). Its tokenizer adds <s>; documents are
    joined by its </s>; .jsonl and .md files are found by the dataset's slug under datasets/<owner>/<slug>/."""
    model = save_tiny_model(tmp_path / "llama-tiny", "llama")
    inputs = tmp_path / "input"
    write_jsonl_corpus(inputs / "datasets" / "alice" / "my-corpus")
    overrides = [*SMALL, f"init_from={json.dumps(str(model))}", 'dataset="text-files"',
                 'text_files_path="my-corpus"', "gradient_checkpointing=true", 'precision="fp16"']
    straight, second = check_exact_resume(tmp_path, overrides, inputs)
    assert f"Data: 3 text file(s) from {inputs / 'datasets/alice/my-corpus'}" in straight.stdout
    assert "LlamaForCausalLM" in straight.stdout and "precision float16" in straight.stdout
    scalers = [torch.load(run.working / "checkpoints/checkpoint_epoch1_step6.pt", weights_only=True)["scaler"]
               for run in (straight, second)]
    assert scalers[0] and scalers[0]["scale"] > 0 and scalers[0] == scalers[1]  # resumed with the scale it had
    assert all(h["train_loss"] < 10 for h in json.loads((straight.working / "training_history.json").read_text())
               if h["kind"] == "train")  # finite, and a tiny model's loss: fp16 trained it
    tokens = next((straight.working / "token_cache").glob("tokens-train-*.npy"))
    import numpy as np

    ids = np.load(tokens)
    assert 0 not in ids and (ids == 1).sum() > 100  # no <s> inside the packed data; </s> between documents
    check_final_model(straight)


@pytest.mark.slow
def test_pretrained_qwen2_folder_trains_and_its_final_model_loads(tmp_path):
    """A third family through the same AutoModelForCausalLM path (Qwen2.5's: attention biases, no BOS)."""
    model = save_tiny_model(tmp_path / "qwen2-tiny", "qwen2")
    inputs = tmp_path / "input"
    write_jsonl_corpus(inputs / "my-corpus")
    overrides = [*SMALL, f"init_from={json.dumps(str(model))}", 'dataset="text-files"', 'text_files_path="my-corpus"']
    run = run_kernel(render(tmp_path / "kernel", overrides), tmp_path / "working", input_dir=inputs)
    assert run.returncode == 0 and run.run_state()["reason"] == "complete", run.stdout[-3000:]
    assert "Qwen2ForCausalLM" in run.stdout
    evals = [h for h in json.loads((run.working / "training_history.json").read_text()) if h["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    check_final_model(run)


@pytest.mark.slow
def test_llama_from_scratch_trains_and_resumes_exactly(tmp_path):
    inputs = tmp_path / "input"
    write_jsonl_corpus(inputs / "my-corpus")  # the older mount layout: <input>/<slug>/
    overrides = [*SMALL, 'model_type="llama"', 'dataset="text-files"', 'text_files_path="my-corpus/*.jsonl"',
                 "n_embd=32", "n_head=4", "bpe_vocab_size=320", 'precision="bf16"']  # an Ampere GPU's autocast
    # Out of memory at step 3: the micro-batch halves for good, the effective batch and the resume stay exact.
    straight, second = check_exact_resume(tmp_path, overrides, inputs, env={"KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP": "3"})
    assert "Model: llama (LlamaForCausalLM)" in straight.stdout and "precision bfloat16" in straight.stdout
    assert "Out of memory at step 3: micro-batch now 2, accumulation 2 (effective batch unchanged)" in straight.stdout
    saved = torch.load(second.working / "checkpoints/checkpoint_epoch1_step6.pt", weights_only=True)
    assert (saved["micro_batch_size"], saved["accumulation"]) == (2, 2)
    config = json.loads((straight.working / "final_model/config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 32 and config["intermediate_size"] == 128
    assert config["max_position_embeddings"] == 32 and config["num_hidden_layers"] == 2
    evals = [h for h in json.loads((straight.working / "training_history.json").read_text()) if h["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    check_final_model(straight)


def test_the_shape_check_on_resume_covers_init_from_and_model_type(tmp_path, capsys):
    config = load_preset("tiny").kernel_config()
    path = tmp_path / "checkpoint.pt"
    old = {key: value for key, value in config.items() if key not in ("init_from", "model_type")}
    torch.save({"kernel_format": kernel.CHECKPOINT_FORMAT, "config": old, "global_step": 4, "epoch": 1}, path)
    point = kernel.ResumePoint(path, "0" * 64, None)
    assert kernel.load_checkpoint(point, config)["global_step"] == 4  # older checkpoints: GPT-2 from scratch
    for change, message in (({"model_type": "llama"}, "model_type 'gpt2' (config: 'llama')"),
                            ({"init_from": "a/b"}, "init_from None (config: 'a/b')")):
        with pytest.raises(kernel.KernelStop, match=re.escape(message)):
            kernel.load_checkpoint(point, {**config, **change})
    torch.save({"kernel_format": kernel.CHECKPOINT_FORMAT, "config": {**config, "init_from": "a/b", "n_embd": 1},
                "global_step": 4, "epoch": 1}, path)
    assert kernel.load_checkpoint(point, {**config, "init_from": "a/b"})["global_step"] == 4  # its own shape


# ---- fast checks: no kernel subprocess ----------------------------------------------------------------------
def test_a_window_longer_than_the_pretrained_models_positions_is_a_config_error(tmp_path):
    folder = save_tiny_model(tmp_path / "gpt2-tiny", "gpt2")  # 64 learned positions
    config = {**load_preset("tiny").kernel_config(), "init_from": str(folder), "max_length": 65}
    with pytest.raises(kernel.KernelStop, match="max_length 65 is longer than init_from .* \\(64 positions\\); "
                                                "set max_length to at most 64"):
        kernel.build_model(config, 0)
    assert kernel.build_model({**config, "max_length": 64}, 0).config.n_positions == 64


def test_a_pretrained_tokenizers_own_truncation_and_padding_are_switched_off(tmp_path, monkeypatch):
    """Left on, they would cut or pad every packed chunk of text, silently."""
    folder = save_tiny_model(tmp_path / "gpt2-tiny", "gpt2")
    saved = json.loads((folder / "tokenizer.json").read_text())
    saved["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(saved))
    monkeypatch.setattr(kernel, "PRETRAINED_TOKENIZER", {})
    tokenizer = kernel.build_tokenizer({"init_from": str(folder)}, {}, None)
    assert tokenizer.truncation is None and tokenizer.padding is None
    assert len(tokenizer.encode("Return the parser " * 20, add_special_tokens=False).ids) > 8


def test_carved_validation_split_is_disjoint_and_fixed_by_the_seed():
    documents = [f"document {i}" for i in range(250)]
    a, b = kernel.carve_validation(documents, 42, "x"), kernel.carve_validation(documents, 42, "x")
    assert a == b and len(a["validation"]) == 5 and len(a["train"]) == 245
    assert set(a["train"]).isdisjoint(a["validation"]) and set(a["train"]) | set(a["validation"]) == set(documents)
    assert kernel.carve_validation(documents, 7, "x")["validation"] != a["validation"]
    assert len(kernel.carve_validation(documents[:3], 42, "x")["validation"]) == 1  # at least one
    with pytest.raises(kernel.KernelStop, match="too few"):
        kernel.carve_validation(documents[:1], 42, "x")


def test_text_file_suffixes_match_in_any_case_as_the_corpus_upload_takes_them(tmp_path):
    (tmp_path / "NOTES.MD").write_text("upper")
    (tmp_path / "Data.JSONL").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "image.PNG").write_bytes(b"\x89PNG")
    files = kernel.text_files({"text_files_path": str(tmp_path)})
    assert [Path(f).name for f in files] == ["Data.JSONL", "NOTES.MD"]
    assert kernel.read_text_file(files[0], "text") == ["a", "b"]


def test_jsonl_lines_are_documents_and_a_missing_field_is_named(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    assert kernel.read_text_file(str(path), "text") == ["one", "two"]
    with pytest.raises(kernel.KernelStop, match="no text field 'body'"):
        kernel.read_text_file(str(path), "body")


def test_hf_dataset_split_and_column_errors_name_what_exists(tmp_path):
    data = save_dataset_without_validation(tmp_path / "d")
    config = {**load_preset("tiny").kernel_config(), "dataset": f"hf:{data}"}
    with pytest.raises(kernel.KernelStop, match="no column 'text' \\(it has body\\)"):
        kernel.load_documents(config)
    with pytest.raises(kernel.KernelStop, match="no split 'training' \\(it has train\\)"):
        kernel.load_documents({**config, "text_column": "body", "train_split": "training"})


def test_a_folder_laid_out_as_a_hub_dataset_goes_through_load_dataset_as_a_hub_id_does(tmp_path, monkeypatch):
    """A hub dataset repository is a folder of data files (data/<split>-*.parquet); load_dataset reads such a
    folder with the same builders as after a download. Both splits here: the named validation split is used."""
    import datasets
    from datasets import Dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    documents = corpus_documents()
    files = tmp_path / "repo" / "data"
    files.mkdir(parents=True)
    Dataset.from_dict({"story": documents[:200]}).to_parquet(files / "train-00000-of-00001.parquet")
    Dataset.from_dict({"story": documents[200:220]}).to_parquet(files / "validation-00000-of-00001.parquet")
    config = {**load_preset("tiny").kernel_config(), "dataset": f"hf:{tmp_path / 'repo'}", "text_column": "story"}
    splits = kernel.load_documents(config)
    assert splits["train"] == documents[:200] and splits["validation"] == documents[200:220]


def test_token_cache_fingerprint_covers_the_data_keys_and_the_corpus_bytes():
    config = load_preset("tiny").kernel_config()
    prints = {kernel.data_fingerprint("{}", {**config, **change}, "") for change in (
        {}, {"dataset": "hf:a/b"}, {"dataset": "hf:a/b", "dataset_config": "x"},
        {"dataset": "hf:a/b", "text_column": "body"}, {"dataset": "hf:a/b", "train_split": "t"},
        {"dataset": "hf:a/b", "validation_split": "v"}, {"dataset": "hf:a/b", "seed": 1})}
    prints.add(kernel.data_fingerprint("{}", config, "another corpus's digest"))
    assert len(prints) == 8


def test_the_corpus_digest_follows_the_bytes_of_text_files_and_of_an_hf_folder(tmp_path):
    write_jsonl_corpus(tmp_path / "texts")
    save_dataset_without_validation(tmp_path / "hf-data")
    configs = [{"dataset": "text-files", "text_files_path": str(tmp_path / "texts")},
               {"dataset": f"hf:{tmp_path / 'hf-data'}"}]
    before = [kernel.data_content(config) for config in configs]
    assert all(len(digest) == 64 for digest in before) and kernel.data_content({"dataset": "stdlib-docs"}) == ""
    with open(tmp_path / "texts" / "notes.md", "a") as handle:
        handle.write("one more line\n")
    arrow = next((tmp_path / "hf-data").rglob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes() + b"\0")
    assert [kernel.data_content(config) for config in configs][0] != before[0]
    assert [kernel.data_content(config) for config in configs][1] != before[1]


def test_data_dir_warns_only_when_a_dataset_was_also_given():
    from kaggle_runner.config import RunConfig

    assert RunConfig(data_dir="corpus").warnings() == []  # the README's way: data_dir in place of dataset
    assert "not on dataset 'stdlib-docs'" in RunConfig(data_dir="corpus", dataset="stdlib-docs").warnings()[0]


@pytest.mark.slow
def test_a_corpus_changed_under_the_same_name_never_reuses_the_old_tokens(tmp_path):
    """A new data_dir version keeps its dataset's name, and a tokenizer that does not depend on the text
    (init_from's) gives the same fingerprint to both: the token dataset of the old chain must not match."""
    model = save_tiny_model(tmp_path / "llama-tiny", "llama")
    inputs = tmp_path / "input"
    corpus = inputs / "datasets" / "alice" / "my-corpus"
    write_jsonl_corpus(corpus)
    overrides = [*SMALL, f"init_from={json.dumps(str(model))}", 'dataset="text-files"',
                 'text_files_path="my-corpus"', "segment_steps=2"]
    first = run_kernel(render(tmp_path / "a", overrides), tmp_path / "first", input_dir=inputs)
    assert first.run_state()["reason"] == "step_budget", first.stdout[-3000:]
    chain = attach_checkpoint(first.working, inputs)  # its checkpoint and its token arrays, as the chain attaches
    again = run_kernel(render(tmp_path / "b", overrides, chain), tmp_path / "again", input_dir=inputs)
    assert "Data: reusing tokens" in again.stdout, again.stdout[-3000:]  # the same corpus: tokenized once
    (corpus / "notes.md").write_text("# Other notes\n\n" + "A different sentence, line after line.\n" * 400)
    changed = run_kernel(render(tmp_path / "c", overrides, chain), tmp_path / "changed", input_dir=inputs)
    assert changed.returncode == 0, changed.stdout[-3000:]
    assert "Data: reusing tokens" not in changed.stdout and "Data: 3 text file(s)" in changed.stdout
    old, new = ({p.name for p in (run.working / "token_cache").glob("*.npy")} for run in (first, changed))
    assert old and new and not old & new


def test_count_parameters_needs_no_gpt2_attributes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    counts = kernel.count_parameters(model)
    assert counts["total"] - counts["without_embeddings"] == 100 * 16


@pytest.mark.parametrize(("overrides", "message"), [
    (['dataset="hf:"'], "hf: needs a Hugging Face dataset id"),
    (['dataset="hf: x"'], "hf: needs a Hugging Face dataset id"),
    (['dataset="wikipedia"'], "or hf:<dataset id or folder>"),
    (['init_from=""'], "init_from"),
    (['init_from="a/b"', 'model_type="llama"'], "is for models trained from scratch"),
    (['model_type="mamba"'], "model_type"),
    (['text_column=""'], "text_column"),
    (['validation_split=""'], "validation_split"),
    (['precision="fp8"'], "precision"),
])
def test_new_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("tiny", overrides)


def test_finetune_preset_and_new_keys_reach_the_kernel():
    config = load_preset("finetune")
    assert config.init_from == "HuggingFaceTB/SmolLM2-135M" and config.gradient_checkpointing
    assert config.dataset == "wikitext-2"  # WikiText's rows are lines: the built-in name keeps articles whole
    assert config.max_length == 512 and config.enable_internet
    settings = load_preset("tiny", ['dataset="hf:roneneldan/TinyStories"', 'dataset_config="x"']).kernel_config()
    assert {"init_from", "model_type", "gradient_checkpointing", "dataset_config", "text_column", "train_split",
            "validation_split", "precision"} <= set(settings)
