"""A causal language model training kernel for Kaggle, rendered by kaggle-runner below a CONFIG block (see
train.py.j2).

It trains GPT-2 (or a Llama) from scratch, or fine-tunes any AutoModelForCausalLM (init_from), keeps rotating
checkpoints plus best_model.pt, and when a session ends early (time budget, segment_steps, SIGTERM) it saves a
checkpoint from which the chain's next session resumes (bitwise the same trajectory on a CPU). The same script
runs under torchrun on any machine. It talks to the launcher only through files and JSON log lines.

Contents, in reading order:
  Model               GPT-2, Llama or a pretrained model; its loss, optimizer, schedule, precision, compile
  Data                documents, tokenizer, packed token arrays, windows
  The training state  TrainingState: what a step changes and a checkpoint keeps
  The step and loop   optimizer_step (out-of-memory halving), divergence, evaluation, samples, stops, train
  Checkpoints         save and rotate; resume only from the chain's own verified checkpoint
  Platform survival   the GPU check, the session event, processes (DDP), signals, atomic files, CPU speedups
  main                one session: check, set up, train, one ending

It imports only what Kaggle's image has (torch, transformers, tokenizers, datasets, numpy); tests import it
as kaggle_runner.kernel_template.kernel.
"""

# ===================================================================================================
# Imports and the outside world: where inputs are, where outputs go, how we report
# ===================================================================================================
import ast
import contextlib
import glob
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# The contract with the launcher: the files this kernel writes, the JSON events it prints, why it stops
# ---------------------------------------------------------------------------------------------------
# Literals only: kaggle_runner/contract.py reads them from this file without running it, and the launcher
# reads nothing a kernel writes except through them (tests/test_contract.py checks both sides).
MANIFEST_NAME = "manifest.json"  # {"files": {relpath: {"sha256", "size", "kind", ...}}}: every output that counts
RUN_STATE_NAME = "run_state.json"  # how the session ended: status, reason, message, step, resumed_from, image
HISTORY_NAME = "training_history.json"  # train, eval and sample entries of every session so far
BEST_MODEL_NAME = "best_model.pt"  # the weights with the lowest validation loss
CHECKPOINT_DIR = "checkpoints"  # rotating checkpoints, checkpoint_epoch<E>_step<S>.pt
FINAL_MODEL_DIR = "final_model"  # the trained model in Hugging Face format, once training completes
TOKEN_CACHE_DIR = "token_cache"  # packed token arrays, so later sessions of the chain skip tokenizing
MANIFEST_FORMAT = 1
# The kind of each manifest entry.
FILE_KINDS = ("checkpoint", "best", "history", "final_model", "token_cache")
# JSON lines on stdout, {"event": <name>, ...}: session (who and where), start, progress, eval, sample,
# checkpoint, oom (the micro-batch halved), end (as run_state.json says).
EVENTS = ("session", "start", "progress", "eval", "sample", "checkpoint", "oom", "end")
# Why a session ended: run_state.json's "reason". kaggle_runner/chain.py decides what each one means.
STOP_REASONS = {
    "complete": "training finished; final_model/ is written",
    "step_budget": "ran its segment_steps; a checkpoint is saved",
    "time_budget": "reached session_timeout_seconds - safety_margin_seconds; a checkpoint is saved",
    "interrupted": "SIGTERM or SIGINT; a checkpoint is saved",
    "resume_missing": "the chain's checkpoint is not among the inputs (Kaggle attached an older version)",
    "resume_error": "the chain's checkpoint could not be read, or holds another model",
    "data_error": "the data could not be loaded or tokenized",
    "config_error": "the configuration cannot work with this model, data or disk",
    "out_of_memory": "out of memory even at micro-batch 1",
    "diverged": "the training loss stayed NaN or infinite",
    "no_gpu": "the session came without a usable GPU",
    "error": "an unexpected exception; the log has its traceback",
}

CHECKPOINT_FORMAT = 2  # bumped when the checkpoint layout changes (2: tensors and plain types only)
EOS_TOKEN = "<|endoftext|>"
DIVERGENCE_STEPS = 3  # optimizer steps in a row with a non-finite loss before the run stops as diverged


def input_root() -> Path:
    """Attached datasets and kernel outputs: /kaggle/input on Kaggle, overridable for local runs."""
    return Path(os.environ.get("KAGGLE_RUNNER_INPUT_DIR", "/kaggle/input"))


def working_dir() -> Path:
    """Everything written here is the version's output (on Kaggle the cwd is /kaggle/working)."""
    return Path.cwd()


def scratch_dir() -> Path:
    path = Path(os.environ.get("KAGGLE_RUNNER_SCRATCH_DIR", Path(tempfile.gettempdir()) / "kaggle-runner"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(message: str) -> None:
    if is_primary():
        print(message, flush=True)


def emit(event: str, **fields) -> None:
    """One JSON line the launcher parses from the log; humans read the line printed next to it."""
    if is_primary():
        print(json.dumps({"event": event, **fields}, default=float), flush=True)


class KernelStop(Exception):
    """Training cannot go on; carries the reason written to run_state.json and the exit code."""

    def __init__(self, reason: str, message: str, exit_code: int = 1):
        super().__init__(message)
        self.reason = reason
        self.exit_code = exit_code


# ===================================================================================================
# Model: GPT-2, Llama or a pretrained model with its loss, the optimizer and schedule, precision, compile
# ===================================================================================================
PRETRAINED_TOKENIZER: dict = {}  # init_from's tokenizer, loaded once per process


def model_family(config: dict) -> str:
    """What the shape check on resume and the log call the model: init_from's id, or the architecture."""
    return f"pretrained {config['init_from']}" if config.get("init_from") else config.get("model_type", "gpt2")


def pretrained_source(config: dict) -> str:
    """init_from as a local folder when it is one (as given, under the input root, or inside an attached
    dataset under either mount layout), else the Hugging Face hub id as given."""
    name = config["init_from"]
    for pattern in text_file_patterns(name):
        for match in sorted(glob.glob(pattern)):
            if os.path.isfile(os.path.join(match, "config.json")):
                return match
    return name


def load_pretrained(config: dict, what: str):
    """init_from's model (in float32: the optimizer keeps full-precision weights) or its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = pretrained_source(config)

    def load():
        if what == "tokenizer":
            return AutoTokenizer.from_pretrained(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa")
        except (ValueError, ImportError):  # an architecture without SDPA attention
            model = AutoModelForCausalLM.from_pretrained(source)
        return model.float()

    if os.path.isdir(source):
        try:
            return load()
        except Exception as exc:
            raise KernelStop("config_error", f"init_from {source!r} holds no loadable {what} "
                             f"({type(exc).__name__}: {str(exc)[:300]})") from None
    try:
        return with_retries(f"Downloading {what} {source}", load, attempts=download_attempts(config))
    except Exception as exc:
        raise KernelStop("config_error", f"could not load {what} {source!r} from the Hugging Face hub "
                         f"({type(exc).__name__}: {str(exc)[:300]}). {offline_hint(config)}") from None


def pretrained_tokenizer(config: dict):
    if "tokenizer" not in PRETRAINED_TOKENIZER:
        PRETRAINED_TOKENIZER["tokenizer"] = load_pretrained(config, "tokenizer")
    return PRETRAINED_TOKENIZER["tokenizer"]


def build_model(config: dict, vocab_size: int, eos_id: int | None = None):
    """init_from's pretrained model, or GPT-2 / Llama from scratch (seeded, vocabulary padded to 64)."""
    if config.get("init_from"):
        model = load_pretrained(config, "model")
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if positions and config["max_length"] > positions:  # GPT-2's learned positions end there: an index error
            raise KernelStop("config_error", f"max_length {config['max_length']} is longer than init_from "
                             f"{config['init_from']!r} was trained for ({positions} positions); set max_length "
                             f"to at most {positions}")
        return model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    padded_vocab = (vocab_size + 63) // 64 * 64  # multiples of 64 keep the LM head's matmul on fast paths
    if config.get("model_type", "gpt2") == "llama":
        n_embd = config["n_embd"]
        model_config = LlamaConfig(
            vocab_size=padded_vocab, hidden_size=n_embd, num_hidden_layers=config["n_layer"],
            num_attention_heads=config["n_head"], num_key_value_heads=config["n_head"],
            # SwiGLU's three matrices at 8/3 x width cost what GPT-2's two at 4x do; rounded up to 64.
            intermediate_size=(8 * n_embd // 3 + 63) // 64 * 64, max_position_embeddings=config["max_length"],
            attention_dropout=config["dropout"], tie_word_embeddings=True, attn_implementation="sdpa",
            bos_token_id=eos_id, eos_token_id=eos_id,
        )
        torch.manual_seed(config["seed"])
        return LlamaForCausalLM(model_config)
    model_config = GPT2Config(
        vocab_size=padded_vocab, n_positions=config["max_length"], n_embd=config["n_embd"],
        n_layer=config["n_layer"], n_head=config["n_head"], resid_pdrop=config["dropout"],
        embd_pdrop=config["dropout"], attn_pdrop=config["dropout"], bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1, tie_word_embeddings=True, attn_implementation="sdpa",
        # GPT-2's tanh GELU as one fused kernel instead of gelu_new's five elementwise ops (same formula).
        activation_function="gelu_pytorch_tanh",
    )
    torch.manual_seed(config["seed"])
    return GPT2LMHeadModel(model_config)


def prepare_model(config: dict, vocab_size: int, device: torch.device, eos_id: int | None = None, model=None):
    """The model (build_model's, unless given: bench brings init_from's architecture with random weights) on
    its device; activations recomputed in the backward pass when gradient_checkpointing is on; CPU dropout
    kernels where eager CPU training of a GPT-2 uses dropout (other models stay as they are)."""
    model = (build_model(config, vocab_size, eos_id) if model is None else model).to(device)
    if config.get("gradient_checkpointing"):
        # Non-reentrant checkpointing restores the RNG state for the recomputation: same dropout masks.
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    uses_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    if (device.type == "cpu" and getattr(model.config, "model_type", None) == "gpt2" and uses_dropout
            and not compile_wanted(config, device)):
        use_cpu_dropout_kernels(model)
    return model


def count_parameters(model) -> dict:
    """Parameters with and without the embedding tables (token and, for GPT-2, position); a tied LM head once."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = {id(p): p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
                  for p in m.parameters()}
    return {"total": total, "without_embeddings": total - sum(embeddings.values())}


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token loss; labels are the inputs shifted once, here and nowhere else."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


class LossModule(torch.nn.Module):
    """The model and its loss as one module: what DDP wraps and torch.compile compiles.

    The logits (micro-batch x length x 50k vocabulary) are the step's largest tensor. Left outside the compiled
    graph, the fp32 upcast, softmax and their backward ran as separate eager kernels: 40 of the 57 ms of GPU
    time per seed-shape step on an H100. Inside it, inductor fuses them into a few passes over the logits.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.model, batch)


def build_optimizer(model, config: dict):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    try:  # fused AdamW: one kernel for all parameters, on CUDA and (torch >= 2.4) on CPU
        return torch.optim.AdamW(groups, lr=config["learning_rate"], betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config["learning_rate"], betas=(0.9, 0.95))


def build_scheduler(optimizer, config: dict, total_steps: int):
    warmup, floor = config["warmup_steps"], config["min_lr_ratio"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device_and_dtype(prefer: str = "auto", precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device, and the dtype the step autocasts to. auto: bf16 from Ampere (sm_80) on, fp16 with a
    GradScaler below it (a T4), fp32 on a CPU. An explicit precision holds on any device: fp16 on a CPU runs
    a T4's path (autocast and GradScaler), slowly, which is how the tests check it."""
    if prefer != "cpu" and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        # sm_75 (T4) reports bf16 as supported but emulates it slowly: decide by compute capability.
        major, _ = torch.cuda.get_device_capability()
        device, dtype = torch.device("cuda", local_rank), torch.bfloat16 if major >= 8 else torch.float16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    return device, PRECISIONS.get(precision, dtype)


def compile_wanted(config: dict, device: torch.device) -> bool:
    return config["compile"] == "on" or (config["compile"] == "auto" and device.type == "cuda")


def maybe_compile(model, config: dict, device: torch.device):
    if not compile_wanted(config, device):
        return model
    try:
        return torch.compile(model)
    except Exception as exc:
        log(f"torch.compile unavailable ({type(exc).__name__}: {exc}); training uncompiled")
        return model


# ===================================================================================================
# Data: documents per split, a tokenizer, and one packed token array per split
# ===================================================================================================
TEXT_SUFFIXES = {".txt", ".md", ".text", ".raw", ".jsonl"}  # .jsonl: one JSON object per line
VALIDATION_FRACTION = 0.02  # of the documents, carved from train when a dataset has no validation split


def with_retries(what: str, fn, attempts: int = 4, first_delay: float = 5.0):
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # the hub raises many types; all mean "try again, then explain"
            if attempt == attempts:
                raise
            delay = first_delay * 2 ** (attempt - 1)
            log(f"{what} failed ({type(exc).__name__}: {exc}); retry {attempt}/{attempts - 1} in {delay:.0f}s")
            time.sleep(delay)


def no_internet(config: dict) -> str | None:
    """Why this session has no internet, when that is known before trying: then one try says enough (a
    failure that cannot succeed is not retried), and the advice fits the cause."""
    if not config.get("enable_internet", True):
        return "enable_internet = false"
    return os.environ.get("KAGGLE_RUNNER_NO_INTERNET") or None  # set by the local emulator, which has none


def download_attempts(config: dict) -> int:
    return 1 if no_internet(config) else 4  # the hub clients retry on their own too


def offline_hint(config: dict) -> str:
    """What to do about a download that failed, for where this session runs."""
    if os.environ.get("KAGGLE_RUNNER_NO_INTERNET"):
        return (f"This session has no internet ({os.environ['KAGGLE_RUNNER_NO_INTERNET']}), so nothing comes "
                "from the Hugging Face hub: set init_from to a save_pretrained folder on this machine (a hub "
                "model already in this machine's Hugging Face cache works too), and train on data_dir or "
                "dataset = \"hf:<a folder saved with save_to_disk>\".")
    if not config.get("enable_internet", True):
        return ("This kernel runs without internet (enable_internet = false): attach what it needs as a Kaggle "
                "dataset (a save_pretrained folder for init_from; text files for dataset = \"text-files\").")
    return ("Turn internet on (enable_internet = true in kaggle-runner.toml; Kaggle gives internet only to "
            "phone-verified accounts), or attach the model or data as a Kaggle dataset: a save_pretrained "
            "folder for init_from, text files for dataset = \"text-files\" with text_files_path pointing into it.")


def stdlib_documents() -> dict[str, list[str]]:
    """Docstrings of the standard library, read with ast (importing modules has side effects).

    Parsing the whole library takes about 9 s of CPU, so the result is kept in this user's cache folder
    (keyed by the Python build) for later runs on the same machine: the test suite's many kernels parse once.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(f"{sys.version}|{stdlib}".encode()).hexdigest()[:16]
    cache = own_cache_dir()
    cached = cache / f"stdlib-docs-{key}.json" if cache else None
    if cached and cached.is_file():
        with contextlib.suppress(OSError, ValueError):
            splits = json.loads(cached.read_text(encoding="utf-8"))
            if isinstance(splits, dict) and all(isinstance(splits.get(s), list) for s in ("train", "validation")):
                return splits
    splits = parse_stdlib_documents(stdlib)
    if cached:
        with contextlib.suppress(OSError):
            atomic_write(cached, lambda handle: handle.write(json.dumps(splits).encode()))
    return splits


def own_cache_dir() -> Path | None:
    """A cache folder only this user can write ($KAGGLE_RUNNER_CACHE_DIR, or one in the temp folder); None if
    that folder belongs to someone else (another local user could plant data there)."""
    path = Path(os.environ.get("KAGGLE_RUNNER_CACHE_DIR")
                or Path(tempfile.gettempdir()) / f"kaggle-runner-cache-{os.getuid()}")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid != os.getuid():
            return None
    except OSError:
        return None
    return path


def parse_stdlib_documents(stdlib: Path) -> dict[str, list[str]]:
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not ({"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(p.parts)))
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for index, path in enumerate(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
        text = "\n\n".join(d for d in docs if d and len(d) > 40)
        if text:
            splits["validation" if index % 10 == 0 else "train"].append(text)
    return splits


WIKITEXT = {"wikitext-103": "wikitext-103-raw-v1", "wikitext-2": "wikitext-2-raw-v1"}  # dataset -> hub config


def wikitext_documents(config: dict) -> dict[str, list[str]]:
    """WikiText-103 or -2 from the hub. Its rows are lines, not documents: joined, each article stays whole."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise KernelStop("data_error", "the 'datasets' package is missing; pip install datasets") from exc
    name = config["dataset"]

    def load():
        return load_dataset("Salesforce/wikitext", WIKITEXT[name])

    try:
        data = with_retries(f"Downloading {name}", load, attempts=download_attempts(config))
    except Exception as exc:
        raise KernelStop("data_error", f"could not download {name} from the Hugging Face hub "
                         f"({type(exc).__name__}: {exc}). {offline_hint(config)}") from None
    splits = {}
    for split in ("train", "validation"):
        if split not in data:
            raise KernelStop("data_error", f"{name} has no '{split}' split")
        # Articles start with ' = Title = ' lines; joining lines keeps each article's text contiguous.
        splits[split] = ["".join(data[split]["text"])]
    return splits


def text_file_patterns(path: str) -> list[str]:
    """Where text_files_path may point. Kaggle mounts a dataset at <input>/datasets/<owner>/<slug>/ or at
    <input>/<slug>/ (both seen in 2026), so a relative path is tried inside every attached dataset too."""
    if os.path.isabs(path):
        return [path]
    root = input_root()
    return [path, str(root / path), str(root / "datasets" / "*" / path), str(root / "*" / path),
            str(root / "datasets" / "*" / "*" / path)]


def carve_validation(documents: list[str], seed: int, what: str) -> dict[str, list[str]]:
    """A validation split carved from the training documents: 2% of them (at least one), chosen by the seed,
    disjoint from what remains for training; both keep their original order."""
    if len(documents) < 2:
        raise KernelStop("data_error", f"{what} has {len(documents)} document(s): too few to carve a validation "
                         "split from; add data or a validation split")
    count = max(1, int(len(documents) * VALIDATION_FRACTION))
    chosen = set(np.random.default_rng(seed).permutation(len(documents))[:count].tolist())
    log(f"Data: {what} has no validation split; {count} of {len(documents)} documents carved from train "
        f"(fixed by seed {seed})")
    return {"train": [d for i, d in enumerate(documents) if i not in chosen],
            "validation": [documents[i] for i in sorted(chosen)]}


def read_text_file(path: str, column: str) -> list[str]:
    """A text file's documents: the whole file, or for .jsonl one per line (the `column` field of its object)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not path.lower().endswith(".jsonl"):
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise KernelStop("data_error", f"{path} line {number} is not JSON ({exc})") from None
        value = row.get(column) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise KernelStop("data_error", f"{path} line {number} has no text field {column!r} (set text_column)")
        documents.append(value)
    return documents


def text_files(config: dict) -> list[str]:
    """The files text_files_path names: a file, a glob, or a folder's text files (by suffix, in any case)."""
    path = config["text_files_path"]
    patterns = text_file_patterns(path)
    files: list[str] = []
    for pattern in patterns:
        for match in sorted(glob.glob(pattern, recursive=True)):
            if os.path.isdir(match):
                files += sorted(str(p) for p in Path(match).rglob("*")
                                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            elif os.path.isfile(match):
                files.append(match)
        if files:
            break
    if not files:
        raise KernelStop("data_error", f"text_files_path {path!r} matches no text files (looked in "
                         f"{', '.join(patterns)}). Attach the dataset that holds them to the kernel.")
    return files


def text_file_documents(config: dict) -> dict[str, list[str]]:
    files = text_files(config)
    log(f"Data: {len(files)} text file(s) from {os.path.dirname(files[0])}")
    column = config.get("text_column", "text")
    per_file = [read_text_file(f, column) for f in files]
    if len(per_file) == 1 and files[0].lower().endswith(".jsonl"):  # one .jsonl file: carve documents
        return carve_validation(per_file[0], config["seed"], os.path.basename(files[0]))
    if len(per_file) == 1:  # one text file: its last 5% is the validation split
        text = per_file[0][0]
        cut = int(len(text) * 0.95)
        return {"train": [text[:cut]], "validation": [text[cut:]]}
    return {"train": [d for i, docs in enumerate(per_file) if i % 10 != 0 for d in docs],
            "validation": [d for i, docs in enumerate(per_file) if i % 10 == 0 for d in docs]}


def local_folder(path: str) -> str | None:
    """`path` as an existing folder: as given, under the input root, or inside an attached dataset."""
    for pattern in text_file_patterns(path):
        for match in sorted(glob.glob(pattern)):
            if os.path.isdir(match):
                return match
    return None


def hf_documents(config: dict) -> dict[str, list[str]]:
    """dataset = "hf:<id>": datasets.load_dataset(id, dataset_config), for a hub id or a folder of data files laid
    out as a hub repository (parquet, json, csv, txt: the hub's own path, minus the download), or load_from_disk
    for a folder written by Dataset(Dict).save_to_disk; then one path: splits, text_column, a carved validation
    split."""
    try:
        from datasets import load_dataset, load_from_disk
    except ImportError as exc:
        raise KernelStop("data_error", "the 'datasets' package is missing; pip install datasets") from exc
    name, subset = config["dataset"][3:], config.get("dataset_config")
    folder = local_folder(name)
    try:
        if folder and any(os.path.isfile(os.path.join(folder, f)) for f in ("dataset_dict.json", "state.json")):
            data = load_from_disk(folder)
        elif folder:
            data = load_dataset(folder, subset)
        else:
            data = with_retries(f"Downloading dataset {name}", lambda: load_dataset(name, subset),
                                attempts=download_attempts(config))
    except Exception as exc:
        where = f"folder {folder}" if folder else f"{name} ({subset or 'default'} config) from the Hugging Face hub"
        raise KernelStop("data_error", f"could not load dataset {where} ({type(exc).__name__}: {str(exc)[:300]}). "
                         f"{'' if folder else offline_hint(config)}") from None
    if not hasattr(data, "keys"):  # one Dataset, not a DatasetDict: it is the training split
        data = {config["train_split"]: data}
    splits, column = list(data.keys()), config["text_column"]

    def texts(split: str) -> list[str]:
        if column not in data[split].column_names:
            raise KernelStop("data_error", f"split {split!r} of {name} has no column {column!r} (it has "
                             f"{', '.join(data[split].column_names)}); set text_column")
        return [t for t in data[split][column] if isinstance(t, str) and t.strip()]

    if config["train_split"] not in data:
        raise KernelStop("data_error", f"{name} has no split {config['train_split']!r} (it has {', '.join(splits)}); "
                         "set train_split")
    if config["validation_split"] in data:
        return {"train": texts(config["train_split"]), "validation": texts(config["validation_split"])}
    return carve_validation(texts(config["train_split"]), config["seed"], f"{name} ({config['train_split']})")


def load_documents(config: dict) -> dict[str, list[str]]:
    source = config["dataset"]
    if source.startswith("hf:"):
        splits = hf_documents(config)
    elif source in WIKITEXT:
        splits = wikitext_documents(config)
    elif source == "stdlib-docs":
        splits = stdlib_documents()
    else:
        splits = text_file_documents(config)
    for split in ("train", "validation"):
        if not any(doc.strip() for doc in splits.get(split, [])):
            raise KernelStop("data_error", f"the {split} split of {source!r} is empty")
    return splits


def train_bpe_tokenizer(documents: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def gpt2_tokenizer(config: dict):
    from transformers import AutoTokenizer

    try:
        return with_retries("Downloading the GPT-2 tokenizer",
                            lambda: AutoTokenizer.from_pretrained("gpt2").backend_tokenizer,
                            attempts=download_attempts(config))
    except Exception as exc:
        raise KernelStop("data_error", f"could not download the GPT-2 tokenizer ({type(exc).__name__}). "
                         f"{offline_hint(config)} Or set tokenizer = \"bpe\" to train one offline.") from None


def build_tokenizer(config: dict, documents: dict[str, list[str]], saved_json: str | None):
    """A resumed run reuses the checkpoint's tokenizer, so token ids mean the same in every segment."""
    from tokenizers import Tokenizer

    if saved_json:
        return Tokenizer.from_str(saved_json)
    if config.get("init_from"):  # fine-tuning: the model's own tokenizer
        tokenizer = pretrained_tokenizer(config).backend_tokenizer
        # A tokenizer.json may switch on truncation or padding: either would cut or pad every packed chunk.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return tokenizer
    if config["tokenizer"] == "gpt2":
        return gpt2_tokenizer(config)
    return train_bpe_tokenizer(documents["train"], config["bpe_vocab_size"])


def eos_token(config: dict) -> str | None:
    """The token between documents: GPT-2's and the trained BPE's <|endoftext|>, else the pretrained tokenizer's
    end-of-sequence token (its beginning-of-sequence one if it has none)."""
    if not config.get("init_from"):
        return EOS_TOKEN
    tokenizer = pretrained_tokenizer(config)
    return tokenizer.eos_token or tokenizer.bos_token


def tokenize_split(tokenizer, documents: list[str], cache_key: str, eos: int | None) -> np.ndarray:
    """All documents as one packed id array (EOS between documents), memory-mapped from scratch space.
    Special tokens a pretrained tokenizer's post-processor would add (BOS per chunk) are left out."""
    path = scratch_dir() / f"tokens-{cache_key}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    dtype = np.uint16 if tokenizer.get_vocab_size() < 2**16 else np.uint32
    pieces = []
    for doc in documents:
        # Long documents (WikiText's split is one) are cut at line ends so encode_batch can parallelise.
        chunks, start = [], 0
        while start < len(doc):
            end = doc.find("\n", start + (1 << 16)) if len(doc) - start > 1 << 16 else -1
            end = len(doc) if end == -1 else end + 1
            chunks.append(doc[start:end])
            start = end
        for i in range(0, len(chunks), 256):
            for encoding in tokenizer.encode_batch(chunks[i:i + 256], add_special_tokens=False):
                pieces.append(np.asarray(encoding.ids, dtype=dtype))
        if eos is not None:
            pieces.append(np.asarray([eos], dtype=dtype))
    tokens = np.concatenate(pieces)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


DATA_KEYS = ("dataset", "text_files_path", "dataset_config", "text_column", "train_split", "validation_split")


def data_content(config: dict) -> str:
    """What the corpus holds, beyond the keys that name it: the bytes of text-files' files and of an hf: folder.
    A corpus changed under the same name (a new data_dir version, an edited folder) must never meet the tokens
    of the old one. Built-in datasets and hub ids are fixed by their names ("" here)."""
    if config["dataset"] == "text-files":
        files = text_files(config)
    elif config["dataset"].startswith("hf:") and (folder := local_folder(config["dataset"][3:])):
        files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())
    else:
        return ""
    digest = hashlib.sha256()
    for path in files:  # names relative to nothing: the same corpus hashes alike under either mount layout
        digest.update(f"{os.path.basename(path)}\0{sha256_of(Path(path))}\n".encode())
    return digest.hexdigest()


def data_fingerprint(tokenizer_json: str, config: dict, content: str) -> str:
    """Names token arrays: the same tokenizer on the same corpus (and the same carved validation split) gives the
    same ids. `content` is data_content's digest."""
    keys = [config.get(key) for key in DATA_KEYS] + [content]
    if config["dataset"].startswith("hf:") or config["dataset"] == "text-files":
        keys.append(config["seed"])  # chooses the carved validation documents
    source = tokenizer_json + json.dumps(keys)
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def token_file_name(split: str, fingerprint: str) -> str:
    return f"tokens-{split}-{fingerprint}.npy"


def token_folders(config: dict) -> list[tuple[Path, Path, bool]]:
    """Where earlier sessions' token arrays can be attached: (folder, where its manifest is, from a kernel's
    outputs). The chain's token dataset '<slug>-data' (the dataset route), and token_cache/ of the kernel the chain
    checkpoint names (the outputs route). No other input is searched."""
    root, name = input_root(), f"{config['slug']}-data"
    found = [(folder, folder, False) for folder in [*sorted(root.glob(f"datasets/*/{name}")), root / name]]
    kernel = (config.get("chain_checkpoint") or {}).get("kernel")
    if kernel:
        found += [(outputs / TOKEN_CACHE_DIR, outputs, True) for outputs in kernel_output_folders(kernel)]
    return found


def find_cached_tokens(name: str, config: dict) -> tuple[Path, bool] | None:
    """Token arrays an earlier segment left, listed in the manifest beside them with a matching sha256: (path,
    whether they came from a kernel's outputs)."""
    for folder, manifest_root, from_kernel in token_folders(config):
        path = folder / name
        if not path.is_file():
            continue
        info = read_manifest(manifest_root)["files"].get(path.relative_to(manifest_root).as_posix())
        if info and path.stat().st_size == info.get("size") and sha256_of(path) == info.get("sha256"):
            return path, from_kernel
        log(f"Skipping cached tokens {path}: not listed in the manifest beside it, or its checksum differs")
    return None


def keep_tokens_for_later(splits: dict, fingerprint: str) -> None:
    """Token arrays as outputs, so the launcher can attach them to later segments: tokenize once per chain."""
    if not is_primary():
        return
    for split, tokens in splits.items():
        name = token_file_name(split, fingerprint)
        target = working_dir() / TOKEN_CACHE_DIR / name
        if not target.exists():
            atomic_write(target, lambda handle, tokens=tokens: np.save(handle, np.asarray(tokens)))
            record_in_manifest(working_dir(), f"{TOKEN_CACHE_DIR}/{name}", kind="token_cache")


def prepare_data(config: dict, saved_tokenizer_json: str | None = None) -> dict:
    started = time.time()
    splits, tokenizer = None, None
    content = data_content(config)
    if saved_tokenizer_json and config.get("cache_tokens", True):
        fingerprint = data_fingerprint(saved_tokenizer_json, config, content)
        cached = {split: find_cached_tokens(token_file_name(split, fingerprint), config)
                  for split in ("train", "validation")}
        if all(cached.values()):  # no documents to load, nothing to tokenize
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(saved_tokenizer_json)
            splits = {split: np.load(path, mmap_mode="r") for split, (path, _) in cached.items()}
            log(f"Data: reusing tokens from {cached['train'][0].parent}")
            if any(from_kernel for _, from_kernel in cached.values()) and config.get("cache_tokens", True):
                keep_tokens_for_later(splits, fingerprint)  # this version's outputs carry them to the next
    if splits is None:
        documents = load_documents(config)
        tokenizer = build_tokenizer(config, documents, saved_tokenizer_json)
        fingerprint = data_fingerprint(tokenizer.to_str(), config, content)
        eos = eos_token(config)
        eos_id = tokenizer.token_to_id(eos) if eos else None
        splits = {split: tokenize_split(tokenizer, documents[split], f"{split}-{fingerprint}", eos_id)
                  for split in ("train", "validation")}
        if config.get("cache_tokens", True):
            keep_tokens_for_later(splits, fingerprint)
    eos = eos_token(config)
    windows = {split: (len(tokens) - 1) // config["max_length"] for split, tokens in splits.items()}
    for split, count in windows.items():
        if count < 1:
            raise KernelStop("data_error", f"the {split} split has {len(splits[split])} tokens, fewer than one "
                             f"window of max_length={config['max_length']}")
    log(f"Data: {config['dataset']}, {len(splits['train']):,} train / {len(splits['validation']):,} validation "
        f"tokens, vocabulary {tokenizer.get_vocab_size():,} ({time.time() - started:.1f}s)")
    return {"tokenizer": tokenizer, "tokenizer_json": tokenizer.to_str(), "train": splits["train"],
            "eos_id": tokenizer.token_to_id(eos) if eos else None,
            "validation": splits["validation"], "train_windows": windows["train"],
            "validation_windows": windows["validation"]}


def epoch_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    """The order of training windows in an epoch: fixed by (seed, epoch), so a resumed run repeats it."""
    return np.random.default_rng(seed * 1000 + epoch).permutation(n_windows)


def gather_windows(tokens: np.ndarray, window_ids, length: int) -> torch.Tensor:
    """Contiguous windows of length+1 tokens (input and its one-token shift): no padding anywhere."""
    rows = np.stack([np.asarray(tokens[i * length:i * length + length + 1], dtype=np.int64) for i in window_ids])
    return torch.from_numpy(rows)


# ===================================================================================================
# The training state: what a step changes, and what a checkpoint keeps
# ===================================================================================================
@dataclass(eq=False)
class TrainingState:
    """One session's training: what it trains with, where it stands, and how this session is going.

    CHECKPOINTED names the fields a checkpoint saves and a resume restores (checkpoint_payload and
    restore_checkpoint both read it); the model, optimizer, scheduler, scaler and RNG states travel with them.
    """

    CHECKPOINTED: ClassVar[tuple[str, ...]] = ("epoch", "global_step", "position", "micro_batch_size",
                                               "accumulation", "best_val_loss", "history", "segment")

    # What training works with
    data: dict
    device: torch.device
    raw_model: torch.nn.Module  # the *ForCausalLM model whose weights are saved
    eager_model: torch.nn.Module  # its LossModule, DDP-wrapped on several processes
    model: torch.nn.Module  # what a step calls: eager_model, compiled when compile is on
    compiled: bool  # model is a torch.compile of eager_model (a failure at its first step falls back to eager)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # a GradScaler for fp16 (T4), else None
    autocast: Callable
    total_steps: int
    windows_per_step: int  # windows one optimizer step covers: batch_size x gradient_accumulation_steps
    tokens_per_step: int
    tokenizer_json: str | None
    vocab_size: int  # the tokenizer's, not the padded embedding's
    order: np.ndarray  # this epoch's window order
    # Where training stands (saved in checkpoints; see CHECKPOINTED)
    micro_batch_size: int  # halved by an out-of-memory error, and stays halved
    accumulation: int
    epoch: int = 1
    global_step: int = 0
    position: int = 0  # windows of this epoch's order already trained on
    best_val_loss: float | None = None
    history: list = field(default_factory=list)  # training_history.json: train, eval and sample entries
    segment: int = 1  # sessions of this run so far, this one included: 1, then +1 per resume
    # This session
    ddp: Any = None
    first_step: int = 0  # global_step when this session began (segment_steps counts from here)
    resumed_from: dict | None = None
    newest_checkpoint: str | None = None
    last_saved_step: int | None = None
    keep_checkpoints: int = 1  # max_checkpoints, or fewer when they would not fit output_budget_gb
    checkpoint_bytes: int = 0  # the largest checkpoint saved so far (0: none yet, estimated)
    tokens_this_segment: int = 0
    wall_time_before: float = 0.0
    segment_started: float = field(default_factory=time.time)
    deadline: float = math.inf
    # On the device, so no step waits for the host: [non-finite losses in a row now, longest such run]
    nonfinite: torch.Tensor | None = None


def build_training(config: dict, data: dict, raw_model, device: torch.device, dtype: torch.dtype,
                   total_steps: int) -> TrainingState:
    """Optimizer, schedule, precision and counters around a model: what optimizer_step needs (bench uses it)."""
    optimizer = build_optimizer(raw_model, config)
    loss_module = LossModule(raw_model)
    if dtype != torch.float32:
        def autocast():
            return torch.autocast(device.type, dtype=dtype)
    else:
        autocast = contextlib.nullcontext
    windows = windows_per_step(config)
    return TrainingState(
        data=data, device=device, raw_model=raw_model, eager_model=loss_module, model=loss_module, compiled=False,
        optimizer=optimizer, scheduler=build_scheduler(optimizer, config, total_steps),
        scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None, autocast=autocast,
        total_steps=total_steps, windows_per_step=windows, tokens_per_step=windows * config["max_length"],
        tokenizer_json=data.get("tokenizer_json"), vocab_size=raw_model.config.vocab_size,
        order=epoch_order(config["seed"], 1, data["train_windows"]),
        micro_batch_size=config["batch_size"], accumulation=config["gradient_accumulation_steps"],
        nonfinite=torch.zeros(2, dtype=torch.int32, device=device))


def windows_per_step(config: dict) -> int:
    """The windows one optimizer step covers, across its accumulation and every process."""
    return config["batch_size"] * config["gradient_accumulation_steps"]


# ===================================================================================================
# The step and the loop
# ===================================================================================================
def optimizer_step(state: TrainingState, config: dict) -> torch.Tensor:
    """One optimizer step over batch_size * gradient_accumulation_steps windows; returns the loss on the device
    (read it only at log steps: a host sync every step would stall the GPU's queue).

    On out-of-memory the step starts over with half the micro-batch and twice the accumulation, so the
    effective batch, and the windows it covers, stay the same.
    """
    data, device, length = state.data, state.device, config["max_length"]
    order = state.order[state.position:state.position + state.windows_per_step]
    share = state.windows_per_step // world_size()
    mine = order[rank() * share:(rank() + 1) * share]
    while True:
        chunks = [mine[i:i + state.micro_batch_size] for i in range(0, len(mine), state.micro_batch_size)]
        state.accumulation = len(chunks)
        try:
            state.optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for i, ids in enumerate(chunks):
                if state.ddp is not None:  # gradients cross processes once per optimizer step
                    state.ddp.require_backward_grad_sync = i == len(chunks) - 1
                batch = gather_windows(data["train"], ids, length)
                if device.type == "cuda":
                    batch = batch.pin_memory()
                batch = batch.to(device, non_blocking=True)
                with state.autocast():
                    loss = state.model(batch) / (len(mine) / len(ids))
                if state.scaler is not None:
                    state.scaler.scale(loss).backward()
                else:
                    loss.backward()
                total += loss.detach()
            break
        except torch.OutOfMemoryError as exc:
            state.optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if state.micro_batch_size == 1:
                raise KernelStop("out_of_memory", f"out of memory at micro-batch 1 ({exc}); reduce max_length, "
                                 "n_embd or n_layer") from None
            state.micro_batch_size //= 2
            state.accumulation = math.ceil(len(mine) / state.micro_batch_size)
            log(f"Out of memory at step {state.global_step + 1}: micro-batch now {state.micro_batch_size}, "
                f"accumulation {state.accumulation} (effective batch unchanged); retrying the step")
            emit("oom", global_step=state.global_step + 1, micro_batch_size=state.micro_batch_size,
                 accumulation=state.accumulation)
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    torch.nn.utils.clip_grad_norm_(state.raw_model.parameters(), config["max_grad_norm"])
    if state.scaler is not None:  # skips the update when fp16 gradients overflowed: normal, not divergence
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.scheduler.step()
    state.position += state.windows_per_step
    state.global_step += 1
    in_a_row = (state.nonfinite[0] + 1) * (~torch.isfinite(total)).int()
    state.nonfinite = torch.stack((in_a_row, torch.maximum(state.nonfinite[1], in_a_row)))
    return total


def loss_is_finite(state: TrainingState) -> bool:
    """Whether the last step's loss was finite; stops the run as diverged after DIVERGENCE_STEPS non-finite
    losses in a row. Reads the device-side counter: call it at log, eval and save steps, not every step."""
    in_a_row, longest = (agree(int(value)) for value in state.nonfinite.tolist())
    if longest >= DIVERGENCE_STEPS:
        raise KernelStop("diverged", f"the training loss was not finite for {longest} optimizer steps in a row "
                         f"(seen at step {state.global_step}); lower learning_rate or raise warmup_steps. The newest "
                         f"checkpoint, {state.newest_checkpoint}, is the last one with a finite loss.")
    return in_a_row == 0


@torch.no_grad()
def evaluate(state: TrainingState, config: dict) -> float:
    """Mean loss over a fixed subset of the validation split (the same windows every time)."""
    model, device = state.model, state.device
    model.eval()
    length, batch = config["max_length"], state.micro_batch_size
    n_windows = min(state.data["validation_windows"], config["eval_batches"] * config["batch_size"])
    losses, weights = [], []
    for start in range(0, n_windows, batch):
        ids = range(start, min(start + batch, n_windows))
        windows = gather_windows(state.data["validation"], ids, length).to(device, non_blocking=True)
        with state.autocast():
            losses.append(model(windows).float().item())
        weights.append(len(ids))
    model.train()
    return float(np.average(losses, weights=weights))


@torch.no_grad()
def sample_text(state: TrainingState, config: dict) -> str:
    """Continue sample_prompt; runs on its own RNG so training draws the same numbers with or without it."""
    tokenizer, model, device = state.data["tokenizer"], state.raw_model, state.device
    ids = tokenizer.encode(config["sample_prompt"]).ids or [state.data.get("eos_id") or 0]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config["seed"])
        model.eval()
        tokens = torch.tensor([ids], device=device)
        for _ in range(config["sample_tokens"]):
            logits = model(input_ids=tokens[:, -config["max_length"]:]).logits[0, -1, :state.vocab_size]
            top = torch.topk(logits.float(), k=min(40, logits.numel()))
            choice = top.indices[torch.multinomial(F.softmax(top.values / 0.8, dim=-1), 1)]
            tokens = torch.cat([tokens, choice.view(1, 1)], dim=1)
        model.train()
    return tokenizer.decode(tokens[0].tolist())


def history_entry(state: TrainingState, kind: str, train_loss: float | None, **fields) -> dict:
    """One training_history.json entry: wall_time counts training time over all sessions (not the gaps between
    them), segment numbers the session."""
    elapsed = time.time() - state.segment_started
    return {"kind": kind, "step": state.global_step, "epoch": state.epoch, "train_loss": train_loss, **fields,
            "lr": state.scheduler.get_last_lr()[0], "tokens_per_second": state.tokens_this_segment / max(elapsed, 1e-9),
            "wall_time": state.wall_time_before + elapsed, "segment": state.segment}


def record_sample(state: TrainingState, text: str) -> None:
    state.history.append({"kind": "sample", "step": state.global_step, "epoch": state.epoch, "text": text})
    write_history(state)
    emit("sample", epoch=state.epoch, text=text)


def record_evaluation(state: TrainingState, config: dict, train_loss: float | None) -> None:
    val_loss = evaluate(state, config)
    entry = history_entry(state, "eval", train_loss, val_loss=val_loss, perplexity=math.exp(min(val_loss, 50)))
    state.history.append(entry)
    write_history(state)
    log(f"  eval  step {entry['step']:>6}  val loss {val_loss:.4f}  perplexity {entry['perplexity']:.2f}")
    emit("eval", **{key: value for key, value in entry.items() if key not in ("kind", "segment")})
    if math.isfinite(val_loss) and (state.best_val_loss is None or val_loss < state.best_val_loss):
        state.best_val_loss = val_loss
        save_best_model(state, config, val_loss)


def log_progress(state: TrainingState, loss: float) -> None:
    entry = history_entry(state, "train", loss)
    state.history.append(entry)
    write_history(state)
    tokens_per_second, lr = entry["tokens_per_second"], entry["lr"]
    remaining = (state.total_steps - state.global_step) * state.tokens_per_step / max(tokens_per_second, 1e-9)
    memory = torch.cuda.max_memory_allocated() / 2**20 if state.device.type == "cuda" else None
    log(f"step {state.global_step:>6}/{state.total_steps}  epoch {state.epoch}  loss {loss:.4f}  lr {lr:.2e}  "
        f"{tokens_per_second:,.0f} tok/s" + (f"  gpu {memory:,.0f} MiB" if memory is not None else ""))
    emit("progress", global_step=state.global_step, total_steps=state.total_steps, epoch=state.epoch, loss=loss, lr=lr,
         tokens_per_second=tokens_per_second, eta_seconds=remaining, gpu_memory_mb=memory)


# Ways a session stops early with a checkpoint, in rising priority when ranks see different ones.
EARLY_STOPS = (None, "step_budget", "time_budget", "interrupted")


def stop_reason(state: TrainingState, config: dict) -> str | None:
    if STOP_REQUEST["signal"]:
        return "interrupted"
    if time.time() >= state.deadline:  # the platform guard: session_timeout_seconds - safety_margin_seconds
        return "time_budget"
    if config.get("segment_steps") and state.global_step - state.first_step >= config["segment_steps"]:
        return "step_budget"
    return None


def agreed_stop_reason(state: TrainingState, config: dict) -> str | None:
    """A stop every rank takes at the same step (the signal or deadline may reach them at different times)."""
    return EARLY_STOPS[agree(EARLY_STOPS.index(stop_reason(state, config)))]


def train(state: TrainingState, config: dict) -> str:
    """Runs until training completes ('complete') or a stop is requested (its reason)."""
    # The last logged training loss, from an earlier session too: an epoch-end evaluation reports it.
    last_loss = next((h["train_loss"] for h in reversed(state.history) if h.get("kind") == "train"), None)
    while state.global_step < state.total_steps:
        reason = agreed_stop_reason(state, config)
        if reason:
            return reason
        if state.position + state.windows_per_step > len(state.order):  # epoch end: leftover windows wait
            record_evaluation(state, config, last_loss)
            if config["sample_tokens"] and is_primary():
                text = sample_text(state, config)
                log(f"  sample after epoch {state.epoch}: {text!r}")
                record_sample(state, text)
            state.epoch += 1
            state.position = 0
            state.order = epoch_order(config["seed"], state.epoch, state.data["train_windows"])
            continue
        try:
            loss = optimizer_step(state, config)
        except (KernelStop, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            if not state.compiled:
                raise
            # torch.compile fails lazily, at the first step: fall back to eager and redo the step.
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]  # inductor's messages run to pages
            log(f"torch.compile failed ({type(exc).__name__}: {first_line}); training uncompiled")
            state.model, state.compiled = with_simulated_faults(state.eager_model, state), False
            continue
        state.tokens_this_segment += state.tokens_per_step
        step = state.global_step
        log_now = step % config["log_steps"] == 0 or step == state.total_steps
        eval_now = step % config["eval_steps"] == 0 and step < state.total_steps
        save_now = step % config["save_steps"] == 0
        if not (log_now or eval_now or save_now):
            continue
        finite = loss_is_finite(state)  # the one host sync: raises KernelStop('diverged')
        if log_now:
            last_loss = float(loss)
            log_progress(state, last_loss)
        if eval_now:
            record_evaluation(state, config, float(loss))
        if save_now and finite:
            save_checkpoint(state, config)
        elif save_now:
            log(f"Not saving a checkpoint at step {step}: its loss is not finite")
    record_evaluation(state, config, last_loss)
    loss_is_finite(state)
    return "complete"


def write_history(state: TrainingState) -> None:
    """training_history.json, listed in the manifest like every output the launcher fetches."""
    if is_primary():
        write_json(working_dir() / HISTORY_NAME, state.history)
        record_in_manifest(working_dir(), HISTORY_NAME, kind="history")


def finish(state: TrainingState, config: dict) -> None:
    """final_model/ in Hugging Face format: loads with AutoModelForCausalLM and AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    if not is_primary():
        return
    target = working_dir() / FINAL_MODEL_DIR
    state.raw_model.save_pretrained(target)
    # model_max_length: generation and pipelines stay inside the context the model was trained on.
    if config.get("init_from"):  # the model's own tokenizer, with its chat template and special tokens
        tokenizer = pretrained_tokenizer(config)
        tokenizer.model_max_length = config["max_length"]
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=state.data["tokenizer"], eos_token=EOS_TOKEN,
                                            bos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
                                            model_max_length=config["max_length"])
    tokenizer.save_pretrained(target)
    for path in sorted(p for p in target.rglob("*") if p.is_file()):  # the manifest covers what fetch takes
        record_in_manifest(working_dir(), path.relative_to(working_dir()).as_posix(), kind="final_model")
    if config["sample_tokens"]:
        text = sample_text(state, config)
        log(f"  sample at the end: {text!r}")
        record_sample(state, text)


# ===================================================================================================
# Checkpoints and resume: save with rotation; resume only from the chain's own checkpoint, verified
# ===================================================================================================
def rng_state() -> dict:
    """Every generator training draws from, as tensors and plain values: loads with weights_only=True."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "internal": list(internal), "gauss": gauss}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if state["cuda"] and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, ValueError):  # a different GPU count: keep fresh CUDA RNGs
            torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_payload(state: TrainingState, config: dict) -> dict:
    return {
        "kernel_format": CHECKPOINT_FORMAT,
        "config": config,  # read first on resume: a checkpoint of another model shape is refused
        "model": state.raw_model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": rng_state(),
        **{name: getattr(state, name) for name in TrainingState.CHECKPOINTED},
        "tokenizer_json": state.tokenizer_json, "vocab_size": state.vocab_size, "total_steps": state.total_steps,
        "world_size": world_size(),
    }


def restore_checkpoint(state: TrainingState, checkpoint: dict) -> None:
    state.raw_model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    if state.scaler is not None and checkpoint["scaler"]:
        state.scaler.load_state_dict(checkpoint["scaler"])
    for name in TrainingState.CHECKPOINTED:
        setattr(state, name, checkpoint.get(name, getattr(state, name)))  # `segment` is newer than format 2
    set_rng_state(checkpoint["rng"])


def save_torch(path: Path, payload: dict) -> None:
    atomic_write(path, lambda handle: torch.save(payload, handle))


def save_checkpoint(state: TrainingState, config: dict) -> str:
    """A checkpoint of where training stands, written atomically, never more than keep_checkpoints at once: the
    oldest goes first, so the outputs stay under output_budget_gb while it is written too."""
    root = working_dir()
    name = f"{CHECKPOINT_DIR}/checkpoint_epoch{state.epoch}_step{state.global_step}.pt"
    state.newest_checkpoint = name
    state.last_saved_step = state.global_step
    if not is_primary():
        return name
    rotate_checkpoints(root, state.keep_checkpoints - 1)
    save_torch(root / name, checkpoint_payload(state, config))
    record_in_manifest(root, name, kind="checkpoint", global_step=state.global_step, epoch=state.epoch)
    size = (root / name).stat().st_size
    if size > state.checkpoint_bytes:  # measured now: it may fit fewer than the estimate said
        state.checkpoint_bytes = size
        state.keep_checkpoints = max(1, checkpoints_that_fit(state, config))
    emit("checkpoint", path=name, global_step=state.global_step, epoch=state.epoch)
    return name


def checkpoints_that_fit(state: TrainingState, config: dict) -> int:
    """How many checkpoints the outputs keep: max_checkpoints, or as many as fit output_budget_gb beside
    best_model.pt (twice while it is rewritten), the final model and the token arrays. Kaggle saves at most
    20 GiB of /kaggle/working. A checkpoint's size is the model's and AdamW's until one is measured."""
    weights = sum(t.numel() * t.element_size() for t in state.raw_model.state_dict().values())
    moments = 2 * sum(p.numel() * 4 for p in state.raw_model.parameters() if p.requires_grad)
    checkpoint = state.checkpoint_bytes or weights + moments
    cache = working_dir() / TOKEN_CACHE_DIR
    tokens = sum(p.stat().st_size for p in cache.iterdir() if p.is_file()) if cache.is_dir() else 0
    fixed = 3 * weights + tokens + 2**20  # best (old and new while rewritten), final_model, tokens, small files
    budget = int(config.get("output_budget_gb", 19) * 2**30)
    return int(min(config["max_checkpoints"], max(0, budget - fixed) // max(checkpoint, 1)))


def plan_outputs(state: TrainingState, config: dict) -> None:
    """Say at the start how many checkpoints fit the output budget, and stop at once when not even one does."""
    state.keep_checkpoints = checkpoints_that_fit(state, config)
    weights = sum(t.numel() * t.element_size() for t in state.raw_model.state_dict().values())
    checkpoint = weights + 2 * sum(p.numel() * 4 for p in state.raw_model.parameters() if p.requires_grad)
    budget = config.get("output_budget_gb", 19)
    if state.keep_checkpoints < 1:
        raise KernelStop("config_error", f"the outputs cannot hold one checkpoint (about {checkpoint / 2**30:.2f} "
                         f"GiB) beside best_model.pt and the final model (about {3 * weights / 2**30:.2f} GiB) within "
                         f"output_budget_gb = {budget}; Kaggle saves at most 20 GiB of /kaggle/working. Raise "
                         "output_budget_gb (at most 20) or train a smaller model")
    fewer = state.keep_checkpoints < config["max_checkpoints"]
    log(f"Outputs: checkpoints of about {checkpoint / 2**20:,.0f} MiB; keeping {state.keep_checkpoints}"
        + (f" (not max_checkpoints = {config['max_checkpoints']}: more would not fit" if fewer else "")
        + (f" output_budget_gb = {budget})" if fewer else f" within output_budget_gb = {budget}")
        + (": each save replaces the last, so a session killed while saving would lose it" if
           state.keep_checkpoints == 1 and config["max_checkpoints"] > 1 else ""))


def rotate_checkpoints(root: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints; best_model.pt lives outside checkpoints/ and is never touched."""
    manifest = read_manifest(root)
    ours = sorted(((info.get("global_step", -1), rel) for rel, info in manifest["files"].items()
                   if info.get("kind") == "checkpoint"), reverse=True)
    stale = [rel for _, rel in ours[keep:]]
    for rel in stale:
        with contextlib.suppress(FileNotFoundError):
            (root / rel).unlink()
    if stale:
        drop_from_manifest(root, stale)


def save_best_model(state: TrainingState, config: dict, val_loss: float) -> None:
    if not is_primary():
        return
    save_torch(working_dir() / BEST_MODEL_NAME, {
        "kernel_format": CHECKPOINT_FORMAT, "model": state.raw_model.state_dict(), "config": config,
        "global_step": state.global_step, "epoch": state.epoch, "val_loss": val_loss,
        "tokenizer_json": state.tokenizer_json, "vocab_size": state.vocab_size,
    })
    record_in_manifest(working_dir(), BEST_MODEL_NAME, kind="best", global_step=state.global_step,
                       epoch=state.epoch, val_loss=val_loss)


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    sha256: str
    best_sha256: str | None  # best_model.pt is restored only with this sha256 (or its manifest's)
    root: Path | None = None  # the attached folder it was found in (default: the checkpoint's own folder):
    # best_model.pt, the manifest and the token arrays are there

    @property
    def folder(self) -> Path:
        return self.root or self.path.parent


def dataset_folders(dataset: str) -> list[Path]:
    """Where Kaggle mounts dataset owner/slug: <input>/datasets/<owner>/<slug>/ or <input>/<slug>/ (both seen
    in 2026)."""
    owner, _, slug = dataset.partition("/")
    return [input_root() / "datasets" / owner / slug, input_root() / slug]


def kernel_output_folders(kernel: str) -> list[Path]:
    """Where Kaggle mounts kernel owner/slug's outputs (a kernel source): <input>/notebooks/<owner>/<slug>/ or
    <input>/<slug>/ (both seen in 2026, beside Kaggle's own __script__.py and the like)."""
    owner, _, slug = kernel.partition("/")
    return [input_root() / "notebooks" / owner / slug, input_root() / slug]


def find_chain_checkpoint(chain: dict) -> ResumePoint:
    """The chain's checkpoint, by exact name and sha256: where its source (the checkpoint dataset, or the kernel
    whose outputs hold it) is mounted first, then anywhere under the input root. Other inputs are data: their
    manifests and checkpoints are never read."""
    name, wanted = chain["file"], chain["sha256"]
    source = "kernel" if chain.get("kernel") else "dataset"
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts) \
            or (source == "dataset" and len(parts) != 1):
        raise KernelStop("resume_error", f"chain_checkpoint file {name!r} is not a plain file name (or, from a "
                         "kernel's outputs, a relative path)")
    root = input_root()
    folders = kernel_output_folders(chain["kernel"]) if source == "kernel" else dataset_folders(chain["dataset"])
    candidates = [(folder / name, folder) for folder in folders]
    for path in sorted(root.rglob(parts[-1])) if root.is_dir() else []:
        ends_with_name = path.parts[-len(parts):] == parts
        candidates.append((path, path.parents[len(parts) - 1] if ends_with_name else path.parent))
    seen, mismatched = set(), []
    for path, folder in candidates:
        if not path.is_file() or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        if sha256_of(path) == wanted:
            return ResumePoint(path, wanted, chain.get("best_sha256"), folder)
        mismatched.append(str(path))
    found = []
    for folder in folders:
        holder = folder / PurePosixPath(name).parent
        if holder.is_dir():
            checkpoints = sorted(p.name for p in holder.iterdir() if p.suffix == ".pt" and p.name != BEST_MODEL_NAME)
            found.append(f"{holder} holds {', '.join(checkpoints) or 'no checkpoint'}")
    if mismatched:
        found.append(f"{', '.join(mismatched)} has another sha256")
    where = f"the outputs of kernel {chain['kernel']}" if source == "kernel" else f"dataset {chain['dataset']}"
    why = ("Kaggle attaches a kernel's newest finished outputs some time after it ends, so a push soon after can "
           "still see an older version's; push again later." if source == "kernel" else
           "Kaggle mounts the dataset version current when the kernel was pushed, so a push right after an "
           "upload can still see the previous version; push again once the new version is ready.")
    raise KernelStop("resume_missing", (
        f"the chain's checkpoint {name} (step {chain.get('global_step')}, sha256 {wanted[:12]}) from {where} is not "
        f"under {root}: " + ("; ".join(found) if found else f"{'that kernel' if source == 'kernel' else 'that dataset'}"
                                                            " is not attached") + ". " + why))


def find_resume_point(config: dict) -> ResumePoint | None:
    """The chain's checkpoint when the launcher names one; else the user's resume_from_checkpoint (their own
    config, so trusted); else None: train from scratch."""
    if config.get("chain_checkpoint"):
        return find_chain_checkpoint(config["chain_checkpoint"])
    explicit = config.get("resume_from_checkpoint")
    if not explicit:
        return None
    path = Path(explicit)
    if not path.is_file():
        raise KernelStop("config_error", f"resume_from_checkpoint {explicit!r} does not exist; attach the "
                         "dataset that holds it, or remove the key to start from scratch")
    return ResumePoint(path, sha256_of(path), None, path.parent)


SHAPE_KEYS = ("n_embd", "n_layer", "n_head", "max_length")
MODEL_KEYS = {"init_from": None, "model_type": "gpt2"}  # with their values in checkpoints older than these keys


def load_checkpoint(point: ResumePoint, config: dict) -> dict:
    """The checkpoint as tensors and plain values (weights_only=True runs no pickled code), refused with a
    clear message when it holds a model of another shape than the config's."""
    try:
        checkpoint = torch.load(point.path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KernelStop("resume_error", f"cannot read checkpoint {point.path} ({type(exc).__name__}: "
                         f"{str(exc)[:300]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kernel_format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("kernel_format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise KernelStop("resume_error", f"{point.path} is not a checkpoint this kernel can resume (format "
                         f"{found}, expected {CHECKPOINT_FORMAT})")
    saved = checkpoint.get("config") or {}
    differences = [f"{key} {saved.get(key, default)!r} (config: {config.get(key, default)!r})"
                   for key, default in MODEL_KEYS.items() if saved.get(key, default) != config.get(key, default)]
    # A pretrained model's shape and vocabulary come with it: init_from names them.
    shape_keys = ("max_length",) if config.get("init_from") else SHAPE_KEYS
    differences += [f"{key} {saved.get(key)} (config: {config[key]})" for key in shape_keys
                    if saved.get(key) != config[key]]
    if not config.get("init_from") and (saved.get("tokenizer") != config["tokenizer"] or (
            config["tokenizer"] == "bpe" and saved.get("bpe_vocab_size") != config["bpe_vocab_size"])):
        differences.append(f"vocabulary {saved.get('tokenizer')}/{saved.get('bpe_vocab_size')} "
                           f"(config: {config['tokenizer']}/{config['bpe_vocab_size']})")
    if differences:
        raise KernelStop("resume_error", f"checkpoint {point.path.name} holds a model of another shape: "
                         f"{', '.join(differences)}. A checkpoint resumes only into the same shape: put these "
                         "keys back, or start a new run under another slug.")
    log(f"Resuming from {point.path} (step {checkpoint['global_step']}, epoch {checkpoint['epoch']})")
    return checkpoint


def restore_best_model(point: ResumePoint) -> None:
    """Carry best_model.pt from where the verified checkpoint was attached into this version's output, if it
    verifies (so the next segment finds it here too, whichever route carries the chain)."""
    source, target = point.folder / BEST_MODEL_NAME, working_dir() / BEST_MODEL_NAME
    if not is_primary() or not source.is_file() or target.exists():
        return
    info = read_manifest(point.folder)["files"].get(BEST_MODEL_NAME) or {}
    wanted = point.best_sha256 or info.get("sha256")
    if not wanted or sha256_of(source) != wanted:
        log(f"Not restoring {source}: its sha256 does not match the chain's")
        return
    shutil.copyfile(source, target)
    record_in_manifest(working_dir(), BEST_MODEL_NAME,
                       **{"kind": "best", **{k: v for k, v in info.items() if k not in ("sha256", "size")}})


# ===================================================================================================
# Platform survival: the GPU check and the session event
# ===================================================================================================
def arch_supported(major: int, minor: int, arch_list: list[str]) -> bool:
    """Whether torch's CUDA build runs on a device of this compute capability: a cubin for sm_XY runs on
    sm_XZ with Z >= Y; PTX (compute_XY) is compiled for any device at or above XY."""
    if not arch_list:
        return True
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]*", arch)
        if not match:
            continue
        built = (int(match.group(2)), int(match.group(3)))
        if (match.group(1) == "sm" and built[0] == major and built[1] <= minor) or (
                match.group(1) == "compute" and built <= (major, minor)):
            return True
    return False


def gpu_problem() -> str | None:
    """Why this session has no GPU torch can use, or None. Kaggle sometimes gives a CPU, or a retired P100."""
    if not torch.cuda.is_available():
        return "no CUDA device: this session has only a CPU"
    arch_list = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        if not arch_supported(major, minor, arch_list):
            return (f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}), which torch {torch.__version__} "
                    f"built for {', '.join(arch_list)} cannot use")
    return None


def check_gpu(config: dict) -> None:
    """Stop at once without a usable GPU: a CPU would spend the whole session on a fraction of the work."""
    if config.get("allow_cpu"):
        return
    emulated = os.environ.get("KAGGLE_RUNNER_EMULATED_GPU")
    if emulated:
        log(f"GPU: {emulated}, emulated on the CPU (KAGGLE_RUNNER_EMULATED_GPU, set by the local emulator)")
        return
    problem = gpu_problem()
    if problem:
        raise KernelStop("no_gpu", f"{problem}. This kernel asked for a GPU; set allow_cpu = true to train on "
                         "whatever device the session has.")


def installed_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def image_facts() -> dict:
    """The image this session runs on: Kaggle updates its images every few weeks, and a chain whose later
    segment lands on another one should be told. BUILD_DATE and GIT_COMMIT are what Kaggle's docker-python
    images set; the versions are what training depends on."""
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": installed_version("transformers"), "build_date": os.environ.get("BUILD_DATE"),
            "git_commit": os.environ.get("GIT_COMMIT")}


def announce_session() -> None:
    """Who and what this session is: the launcher reads the session id (for cancel) from the container name."""
    cuda = torch.cuda.is_available()
    emit("session", container=os.environ.get("KAGGLE_CONTAINER_NAME"), **image_facts(),
         datasets=installed_version("datasets"), gpu=torch.cuda.get_device_name(0) if cuda else None,
         gpu_count=torch.cuda.device_count() if cuda else 0, emulated_gpu=os.environ.get("KAGGLE_RUNNER_EMULATED_GPU"))


# ---------------------------------------------------------------------------------------------------
# Processes: one per GPU (Kaggle's NvidiaTeslaT4 shape has two) with DistributedDataParallel.
# Rank 0 alone logs and writes files; every rank trains on its share of each optimizer step.
# ---------------------------------------------------------------------------------------------------
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_primary() -> bool:
    return rank() == 0


def is_worker() -> bool:
    """A process run_workers started (the parent already announced the session and checked the GPU)."""
    return "KAGGLE_RUNNER_WORKER" in os.environ


def started_by_launcher() -> bool:
    """A rank that torchrun (or another launcher setting RANK/WORLD_SIZE) started: the processes exist already,
    and the process group comes from the environment (MASTER_ADDR/MASTER_PORT, any number of nodes)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_worker()


def wanted_processes(config: dict) -> int:
    if "WORLD_SIZE" in os.environ:  # torchrun's processes, or run_workers' (config world_size is ignored)
        return world_size()
    return int(config.get("world_size") or max(1, torch.cuda.device_count()))


def can_start_workers() -> bool:
    """Workers re-run this script, as torchrun would; a notebook has no script to re-state."""
    script = sys.argv[0] if sys.argv else ""
    return script.endswith(".py") and os.path.isfile(script) and "RANK" not in os.environ


def run_workers(count: int) -> int:
    """Start one process per rank, pass SIGTERM/SIGINT on to them, and return the first failure's code."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers = [subprocess.Popen([sys.executable, os.path.abspath(sys.argv[0])],
                                env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(count),
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                     "KAGGLE_RUNNER_WORKER": "1"})
               for r in range(count)]

    def forward(signum, _frame):
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    failed_at = None
    while any(w.poll() is None for w in workers):
        if failed_at is None and any(w.poll() not in (None, 0) for w in workers):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > 10:
            for worker in workers:  # the survivors would wait forever in a collective
                if worker.poll() is None:
                    worker.kill()
        time.sleep(0.2)
    codes = [w.returncode for w in workers]
    return next((code for code in codes if code != 0), 0)


# Decisions taken every step (whether to stop) travel over a gloo group of their own: over NCCL each would
# need a CUDA tensor and a host sync (.item()) per step, stalling the GPU's queue.
CONTROL_GROUP: dict = {"group": None}


def init_distributed(device: torch.device) -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank(), world_size=world_size())
        CONTROL_GROUP["group"] = dist.new_group(backend="gloo")


def agree(value: int) -> int:
    """The largest `value` any rank holds: every rank takes the same decision."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    flag = torch.tensor([value])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=CONTROL_GROUP["group"])
    return int(flag.item())


def share_tokenizer(tokenizer_json: str | None) -> str:
    """Rank 0's tokenizer for every rank (a trained BPE must be the same everywhere)."""
    import torch.distributed as dist

    box = [tokenizer_json]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------
# Signals and test switches: SIGTERM/SIGINT ask for a clean stop at the next step boundary
# ---------------------------------------------------------------------------------------------------
STOP_REQUEST: dict = {"signal": None}


def install_signal_handlers() -> None:
    def request_stop(signum, _frame):
        STOP_REQUEST["signal"] = signal.Signals(signum).name
        log(f"Received {STOP_REQUEST['signal']}: saving an emergency checkpoint at the end of this step")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)


class SimulatedFaults(torch.nn.Module):
    """Test switches, around the step's model so that optimizer_step carries none (training mode only):
    KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP=N raises out-of-memory once at step N ('N+': at every try from N on);
    KAGGLE_RUNNER_SIMULATE_NAN_AT_STEP=N makes the loss NaN from step N on."""

    def __init__(self, model: torch.nn.Module, step: Callable[[], int], oom: str, nan: str):
        super().__init__()
        self.inner, self.step = model, step
        self.oom_step, self.oom_always = (int(oom.rstrip("+")), oom.endswith("+")) if oom else (None, False)
        self.nan_step = int(nan) if nan else None
        self.oom_fired = False

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        step = self.step()
        if self.training and self.oom_step is not None and (
                step >= self.oom_step if self.oom_always else step == self.oom_step and not self.oom_fired):
            self.oom_fired = True
            raise torch.OutOfMemoryError("simulated CUDA out of memory (KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP)")
        loss = self.inner(batch)
        if self.training and self.nan_step is not None and step >= self.nan_step:
            loss = loss * float("nan")
        return loss


def with_simulated_faults(model: torch.nn.Module, state: TrainingState) -> torch.nn.Module:
    oom = os.environ.get("KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP", "")
    nan = os.environ.get("KAGGLE_RUNNER_SIMULATE_NAN_AT_STEP", "")
    if not oom and not nan:
        return model
    return SimulatedFaults(model, lambda: state.global_step + 1, oom, nan)


# ---------------------------------------------------------------------------------------------------
# Files: atomic writes, checksums, the manifest, run_state.json
# ---------------------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write through a temp file, fsync, rename: a kill mid-write never leaves a torn `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide outputs from other users of the folder
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda h: h.write(json.dumps(data, indent=2, default=float).encode()))


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("kaggle_runner_manifest") == MANIFEST_FORMAT and isinstance(manifest.get("files"), dict):
                return manifest
        except (OSError, ValueError):
            pass
    return {"kaggle_runner_manifest": MANIFEST_FORMAT, "files": {}}


def record_in_manifest(root: Path, relpath: str, **info) -> None:
    manifest = read_manifest(root)
    file = root / relpath
    manifest["files"][relpath] = {"sha256": sha256_of(file), "size": file.stat().st_size, **info}
    write_json(root / MANIFEST_NAME, manifest)


def drop_from_manifest(root: Path, relpaths) -> None:
    manifest = read_manifest(root)
    for relpath in relpaths:
        manifest["files"].pop(relpath, None)
    write_json(root / MANIFEST_NAME, manifest)


def write_run_state(status: str, reason: str, state: TrainingState | None, message: str) -> None:
    if not is_primary():
        return
    write_json(working_dir() / RUN_STATE_NAME, {
        "status": status,
        "reason": reason,
        "message": message,
        "global_step": state.global_step if state else 0,
        "total_steps": state.total_steps if state else None,
        "epoch": state.epoch if state else 1,
        "newest_checkpoint": state.newest_checkpoint if state else None,
        "best_val_loss": state.best_val_loss if state else None,
        "resumed_from": state.resumed_from if state else None,
        "image": image_facts(),
        "updated_at": time.time(),
    })


# ---------------------------------------------------------------------------------------------------
# CPU speedups: dropout and attention kernels for eager training on a CPU
# ---------------------------------------------------------------------------------------------------
# On CPU, torch draws dropout masks with bernoulli_, one draw per element, and its fused attention kernel
# has no dropout, so attention with attn_pdrop > 0 falls back to SDPA's math path. Measured on the tiny
# preset (2 cores), bernoulli_ took a fifth of the step; one 64-bit draw split into four 16-bit numbers is
# about 3x faster forward and backward. CUDA keeps PyTorch's fused dropout and attention, and inductor
# (compile) generates its own.
CPU_ATTENTION = "kaggle_runner_cpu"
DROPOUT_RESOLUTION = 65536  # p is rounded to a multiple of 1/65536: 0.1 becomes 0.100006
_causal_masks: dict = {}


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    dropped = round(p * DROPOUT_RESOLUTION)
    n = x.numel()
    draws = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = draws.view(torch.int16)[:n].view(x.shape) >= dropped - DROPOUT_RESOLUTION // 2
    return x * (keep * (DROPOUT_RESOLUTION / (DROPOUT_RESOLUTION - dropped)))


class CpuDropout(torch.nn.Module):
    """nn.Dropout drawing its mask with cpu_dropout; keeps .p, which GPT-2's attention reads."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_dropout(x, self.p) if self.training and self.p > 0 else x


def cpu_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Causal attention with dropout: SDPA's math path, with cpu_dropout and a cached causal mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[-2]
    if dropout == 0.0 or attention_mask is not None or key.shape[-2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    mask_key = (length, query.dtype, query.device)
    if mask_key not in _causal_masks:
        _causal_masks[mask_key] = torch.full((length, length), float("-inf"), dtype=query.dtype,
                                             device=query.device).triu(1)
    batch, heads, _, head_dim = query.shape
    scale = scaling if scaling is not None else head_dim ** -0.5
    scores = torch.baddbmm(_causal_masks[mask_key], query.reshape(batch * heads, length, head_dim),
                           key.reshape(batch * heads, length, head_dim).transpose(1, 2), alpha=scale)
    weights = cpu_dropout(torch.softmax(scores, dim=-1), dropout)
    output = torch.bmm(weights, value.reshape(batch * heads, length, head_dim))
    return output.view(batch, heads, length, head_dim).transpose(1, 2), None


def use_cpu_dropout_kernels(model) -> None:
    try:  # transformers' attention registry; an image without it keeps SDPA and only swaps nn.Dropout
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(CPU_ATTENTION, cpu_attention)
        AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)  # masks prepared exactly as for SDPA
        model.set_attn_implementation(CPU_ATTENTION)
    except (ImportError, AttributeError, ValueError) as exc:
        log(f"CPU attention kernel unavailable ({type(exc).__name__}: {exc}); attention stays on SDPA")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Dropout):
                setattr(parent, name, CpuDropout(child.p))


# ===================================================================================================
# main: one session. Check the platform, set up (resume, data, model), train, and end in one place.
# ===================================================================================================
def setup_run(config: dict, started: float, resume: ResumePoint | None) -> TrainingState:
    checkpoint = load_checkpoint(resume, config) if resume else None  # before any data work
    device, dtype = pick_device_and_dtype(precision=config.get("precision", "auto"))
    init_distributed(device)
    saved_tokenizer = checkpoint["tokenizer_json"] if checkpoint else None
    data = None
    if world_size() > 1 and saved_tokenizer is None:  # rank 0 trains the tokenizer, then shares it
        if is_primary():
            data = prepare_data(config)
        saved_tokenizer = share_tokenizer(data["tokenizer_json"] if data else None)
    if data is None:
        data = prepare_data(config, saved_tokenizer)
    vocab_size = data["tokenizer"].get_vocab_size()
    raw_model = prepare_model(config, vocab_size, device, data.get("eos_id"))
    counts = count_parameters(raw_model)
    log(f"Model: {model_family(config)} ({type(raw_model).__name__}), {counts['total'] / 1e6:.2f}M parameters "
        f"({counts['without_embeddings'] / 1e6:.2f}M without embeddings), vocabulary {vocab_size:,}"
        f"{' padded to' if not config.get('init_from') else ', model'} {raw_model.config.vocab_size:,}"
        + (", gradient checkpointing" if config.get("gradient_checkpointing") else ""))
    log(f"Device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"precision {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")

    steps_per_epoch = data["train_windows"] // windows_per_step(config)
    if steps_per_epoch < 1:
        raise KernelStop("data_error", f"the training split has {data['train_windows']} windows, fewer than one "
                         f"optimizer step of batch_size x gradient_accumulation_steps = {windows_per_step(config)}")
    total_steps = steps_per_epoch * config["epochs"]
    if config.get("max_steps"):
        total_steps = min(total_steps, config["max_steps"])

    state = build_training(config, data, raw_model, device, dtype, total_steps)
    state.deadline = started + config["session_timeout_seconds"] - config["safety_margin_seconds"]
    state.vocab_size = vocab_size  # the tokenizer's, not the padded embedding's
    if checkpoint is not None:
        restore_checkpoint(state, checkpoint)
        state.order = epoch_order(config["seed"], state.epoch, data["train_windows"])
        # Training time continues from the last entry's (the gap between sessions is not counted).
        state.wall_time_before = next((h["wall_time"] for h in reversed(state.history) if "wall_time" in h), 0.0)
        state.segment += 1
        state.resumed_from = {"file": resume.path.name, "sha256": resume.sha256, "global_step": state.global_step}
        restore_best_model(resume)
        if state.history:
            write_history(state)
    plan_outputs(state, config)
    state.first_step = state.global_step
    if not is_primary():  # different dropout masks on each rank's share of the batch
        torch.manual_seed(config["seed"] + 7919 * rank() + state.global_step)
    if world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        state.ddp = DistributedDataParallel(state.eager_model, device_ids=device_ids)
        state.eager_model = state.ddp
    compiled = maybe_compile(state.eager_model, config, device)
    state.model, state.compiled = with_simulated_faults(compiled, state), compiled is not state.eager_model
    raw_model.train()
    emit("start", total_steps=total_steps, global_step=state.global_step, epoch=state.epoch,
         parameters=counts["total"], parameters_without_embeddings=counts["without_embeddings"],
         device=str(device), dtype=str(dtype), resumed_from=state.resumed_from, steps_per_epoch=steps_per_epoch,
         world_size=world_size())
    return state


def main(config: dict) -> int:
    started = time.time()
    if is_primary() and not is_worker():
        announce_session()
    log(f"kaggle-runner kernel: {config['title']} | python {sys.version.split()[0]} | "
        f"inputs {input_root()} | outputs {working_dir()}")
    state: TrainingState | None = None
    try:
        if not is_worker():
            check_gpu(config)
        processes = wanted_processes(config)
        if started_by_launcher():
            log(f"Rank {rank()} of {processes} started by torchrun (local rank {os.environ.get('LOCAL_RANK', '0')})")
            if config.get("world_size") and config["world_size"] != processes:
                log(f"world_size = {config['world_size']} in the config is ignored: torchrun started {processes}")
        if windows_per_step(config) % processes:
            raise KernelStop("config_error", f"batch_size x gradient_accumulation_steps = {windows_per_step(config)} "
                             f"windows per step cannot be shared evenly by {processes} processes; make it a multiple")
        resume = find_resume_point(config)  # before data and model: a missing checkpoint stops in seconds
        if processes > 1 and can_start_workers():
            log(f"Starting {processes} training processes (DistributedDataParallel)")
            return run_workers(processes)  # rank 0 ends the session: run_state.json, the end event
        if processes > 1 and "RANK" not in os.environ:
            log(f"{processes} devices, but a notebook cannot start worker processes: training on one")
        install_signal_handlers()
        state = setup_run(config, started, resume)
        reason = train(state, config)
        if reason == "complete":
            finish(state, config)
        message, exit_code = "", 0
    except KernelStop as stop:
        reason, message, exit_code = stop.reason, str(stop), stop.exit_code
        log(f"ERROR ({reason}): {message}")
    except Exception as exc:
        traceback.print_exc()
        reason, message, exit_code = "error", f"{type(exc).__name__}: {exc}", 1

    return end_session(state, config, reason, message, exit_code)


def end_session(state: TrainingState | None, config: dict, reason: str, message: str, exit_code: int) -> int:
    """The one ending of every session: a checkpoint of the last finite step unless it is saved already (not after
    an unexpected error, whose state may be half-updated, nor after divergence), then run_state.json and the end
    event. Returns the session's exit code."""
    if state is not None and reason not in ("error", "diverged") and state.last_saved_step != state.global_step \
            and state.global_step > 0:
        in_a_row, longest = state.nonfinite.tolist()
        if longest >= DIVERGENCE_STEPS:
            reason, exit_code = "diverged", 1
            message = f"the training loss was not finite for {longest} optimizer steps in a row"
        if in_a_row > 0:
            log(f"Not saving a checkpoint at step {state.global_step}: its loss is not finite")
        else:
            try:
                save_checkpoint(state, config)
            except Exception as exc:
                traceback.print_exc()
                if exit_code == 0:
                    reason, message, exit_code = "error", f"saving the last checkpoint failed: {exc}", 1
    status = "complete" if reason == "complete" else "incomplete"
    step = state.global_step if state else 0
    if status == "complete":
        log(f"Training complete at step {step}.")
    elif exit_code == 0:
        message = f"stopped by {reason} at step {step}"
        log(f"Stopped ({reason}) at step {step} of {state.total_steps if state else '?'}; "
            f"resume from {state.newest_checkpoint if state else None}.")
    write_run_state(status, reason, state, message)
    emit("end", status=status, reason=reason, global_step=step, epoch=state.epoch if state else 1)
    return exit_code
