# The training kernel's logic. kaggle-runner renders it, below a CONFIG block, into one standalone
# script that Kaggle runs (see train.py.j2); tests import it as kaggle_runner.kernel_template.kernel.
# It imports only what Kaggle's image has (torch, transformers, tokenizers, datasets, numpy).

# ---------------------------------------------------------------------------------------------------
# Imports and the outside world: where inputs are, where outputs go, how we report
# ---------------------------------------------------------------------------------------------------
import ast
import contextlib
import glob
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KERNEL_FORMAT = 1  # bumped when the checkpoint layout changes incompatibly
MANIFEST_NAME = "manifest.json"
RUN_STATE_NAME = "run_state.json"
HISTORY_NAME = "training_history.json"
EOS_TOKEN = "<|endoftext|>"


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


def wanted_processes(config: dict) -> int:
    return int(config.get("world_size") or max(1, torch.cuda.device_count()))


def can_start_workers() -> bool:
    """Workers re-run this script, as torchrun would; a notebook has no script to re-run."""
    script = sys.argv[0] if sys.argv else ""
    return script.endswith(".py") and os.path.isfile(script) and "RANK" not in os.environ


def run_workers(count: int) -> int:
    """Start one process per rank, pass SIGTERM/SIGINT on to them, and return the first failure's code."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers = [subprocess.Popen([sys.executable, os.path.abspath(sys.argv[0])],
                                env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(count),
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
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


class KernelStop(Exception):
    """Training cannot go on; carries the reason written to run_state.json and the exit code."""

    def __init__(self, reason: str, message: str, exit_code: int = 1):
        super().__init__(message)
        self.reason = reason
        self.exit_code = exit_code


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
            if manifest.get("kaggle_runner_manifest") == KERNEL_FORMAT:
                return manifest
        except (OSError, ValueError):
            pass
    return {"kaggle_runner_manifest": KERNEL_FORMAT, "files": {}}


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


def write_run_state(status: str, reason: str, state: dict | None = None, message: str = "") -> None:
    if not is_primary():
        return
    state = state or {}
    write_json(working_dir() / RUN_STATE_NAME, {
        "status": status,
        "reason": reason,
        "message": message,
        "global_step": state.get("global_step", 0),
        "total_steps": state.get("total_steps"),
        "epoch": state.get("epoch", 1),
        "newest_checkpoint": state.get("newest_checkpoint"),
        "best_val_loss": state.get("best_val_loss"),
        "updated_at": time.time(),
    })


# ---------------------------------------------------------------------------------------------------
# Data: documents per split, a tokenizer, and one packed token array per split
# ---------------------------------------------------------------------------------------------------
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


def offline_hint(config: dict) -> str:
    if not config.get("enable_internet", True):
        return ""
    return ("Turn internet on (enable_internet = true in kaggle-runner.toml), or attach the data as a Kaggle "
            "dataset and set dataset = \"text-files\" with text_files_path pointing into it.")


def stdlib_documents() -> dict[str, list[str]]:
    """Docstrings of the standard library, read with ast (importing modules has side effects)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
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


def wikitext_documents(config: dict) -> dict[str, list[str]]:
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise KernelStop("data_error", "the 'datasets' package is missing; pip install datasets") from exc

    def load():
        return load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")

    try:
        data = with_retries("Downloading WikiText-103", load)
    except Exception as exc:
        raise KernelStop("data_error", f"could not download WikiText-103 from the Hugging Face hub "
                         f"({type(exc).__name__}: {exc}). {offline_hint(config)}") from None
    splits = {}
    for split in ("train", "validation"):
        if split not in data:
            raise KernelStop("data_error", f"WikiText-103 has no '{split}' split")
        # Articles start with ' = Title = ' lines; joining lines keeps each article's text contiguous.
        splits[split] = ["".join(data[split]["text"])]
    return splits


def text_file_documents(config: dict) -> dict[str, list[str]]:
    pattern = config["text_files_path"]
    candidates = [pattern] if os.path.isabs(pattern) else [pattern, str(input_root() / pattern)]
    files: list[str] = []
    for candidate in candidates:
        if os.path.isdir(candidate):
            files = sorted(str(p) for p in Path(candidate).rglob("*") if p.is_file() and p.suffix in
                           {".txt", ".md", ".text", ".raw"})
        else:
            files = sorted(glob.glob(candidate, recursive=True))
        if files:
            break
    if not files:
        raise KernelStop("data_error", f"text_files_path {pattern!r} matches no text files (looked in "
                         f"{', '.join(candidates)}). Attach the dataset that holds them to the kernel.")
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    if len(texts) == 1:  # one file: its last 5% is the validation split
        cut = int(len(texts[0]) * 0.95)
        return {"train": [texts[0][:cut]], "validation": [texts[0][cut:]]}
    return {"train": [t for i, t in enumerate(texts) if i % 10 != 0 or len(texts) < 2],
            "validation": [t for i, t in enumerate(texts) if i % 10 == 0]}


def load_documents(config: dict) -> dict[str, list[str]]:
    source = config["dataset"]
    if source == "wikitext-103":
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
                            lambda: AutoTokenizer.from_pretrained("gpt2").backend_tokenizer)
    except Exception as exc:
        raise KernelStop("data_error", f"could not download the GPT-2 tokenizer ({type(exc).__name__}). "
                         f"{offline_hint(config)} Or set tokenizer = \"bpe\" to train one offline.") from None


def build_tokenizer(config: dict, documents: dict[str, list[str]], saved_json: str | None):
    """A resumed run reuses the checkpoint's tokenizer, so token ids mean the same in every segment."""
    from tokenizers import Tokenizer

    if saved_json:
        return Tokenizer.from_str(saved_json)
    if config["tokenizer"] == "gpt2":
        return gpt2_tokenizer(config)
    return train_bpe_tokenizer(documents["train"], config["bpe_vocab_size"])


def tokenize_split(tokenizer, documents: list[str], cache_key: str) -> np.ndarray:
    """All documents as one packed id array (EOS between documents), memory-mapped from scratch space."""
    path = scratch_dir() / f"tokens-{cache_key}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    eos = tokenizer.token_to_id(EOS_TOKEN)
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
            for encoding in tokenizer.encode_batch(chunks[i:i + 256]):
                pieces.append(np.asarray(encoding.ids, dtype=dtype))
        pieces.append(np.asarray([eos], dtype=dtype))
    tokens = np.concatenate(pieces)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def data_fingerprint(tokenizer_json: str, config: dict) -> str:
    """Names token arrays: the same tokenizer on the same corpus gives the same ids."""
    source = tokenizer_json + config["dataset"] + str(config.get("text_files_path"))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def token_file_name(split: str, fingerprint: str) -> str:
    return f"tokens-{split}-{fingerprint}.npy"


def find_cached_tokens(name: str) -> Path | None:
    """Token arrays an earlier segment left, attached as a dataset, verified when a manifest lists them."""
    root = input_root()
    for path in sorted(root.rglob(name)) if root.is_dir() else []:
        info = read_manifest(path.parent)["files"].get(name)
        if info is None or (path.stat().st_size == info["size"] and sha256_of(path) == info["sha256"]):
            return path
        log(f"Skipping cached tokens {path}: checksum does not match the manifest")
    return None


def keep_tokens_for_later(splits: dict, fingerprint: str) -> None:
    """Token arrays as outputs, so the launcher can attach them to later segments: tokenize once per chain."""
    if not is_primary():
        return
    for split, tokens in splits.items():
        name = token_file_name(split, fingerprint)
        target = working_dir() / "token_cache" / name
        if not target.exists():
            atomic_write(target, lambda handle, tokens=tokens: np.save(handle, np.asarray(tokens)))
            record_in_manifest(working_dir(), f"token_cache/{name}", kind="token_cache")


def prepare_data(config: dict, saved_tokenizer_json: str | None = None) -> dict:
    started = time.time()
    splits, tokenizer = None, None
    if saved_tokenizer_json and config.get("cache_tokens", True):
        fingerprint = data_fingerprint(saved_tokenizer_json, config)
        cached = {split: find_cached_tokens(token_file_name(split, fingerprint)) for split in ("train", "validation")}
        if all(cached.values()):  # no documents to load, nothing to tokenize
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(saved_tokenizer_json)
            splits = {split: np.load(path, mmap_mode="r") for split, path in cached.items()}
            log(f"Data: reusing tokens from {cached['train'].parent}")
    if splits is None:
        documents = load_documents(config)
        tokenizer = build_tokenizer(config, documents, saved_tokenizer_json)
        fingerprint = data_fingerprint(tokenizer.to_str(), config)
        splits = {split: tokenize_split(tokenizer, documents[split], f"{split}-{fingerprint}")
                  for split in ("train", "validation")}
        if config.get("cache_tokens", True):
            keep_tokens_for_later(splits, fingerprint)
    windows = {split: (len(tokens) - 1) // config["max_length"] for split, tokens in splits.items()}
    for split, count in windows.items():
        if count < 1:
            raise KernelStop("data_error", f"the {split} split has {len(splits[split])} tokens, fewer than one "
                             f"window of max_length={config['max_length']}")
    log(f"Data: {config['dataset']}, {len(splits['train']):,} train / {len(splits['validation']):,} validation "
        f"tokens, vocabulary {tokenizer.get_vocab_size():,} ({time.time() - started:.1f}s)")
    return {"tokenizer": tokenizer, "tokenizer_json": tokenizer.to_str(), "train": splits["train"],
            "validation": splits["validation"], "train_windows": windows["train"],
            "validation_windows": windows["validation"]}


def epoch_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    """The order of training windows in an epoch: fixed by (seed, epoch), so a resumed run repeats it."""
    return np.random.default_rng(seed * 1000 + epoch).permutation(n_windows)


def gather_windows(tokens: np.ndarray, window_ids, length: int) -> torch.Tensor:
    """Contiguous windows of length+1 tokens (input and its one-token shift): no padding anywhere."""
    rows = np.stack([np.asarray(tokens[i * length:i * length + length + 1], dtype=np.int64) for i in window_ids])
    return torch.from_numpy(rows)


# ---------------------------------------------------------------------------------------------------
# Model and precision
# ---------------------------------------------------------------------------------------------------
def pick_device_and_dtype(prefer: str = "auto") -> tuple[torch.device, torch.dtype]:
    if prefer != "cpu" and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        # sm_75 (T4) reports bf16 as supported but emulates it slowly: decide by compute capability.
        major, _ = torch.cuda.get_device_capability()
        return torch.device("cuda", local_rank), torch.bfloat16 if major >= 8 else torch.float16
    return torch.device("cpu"), torch.float32


def build_model(config: dict, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    padded_vocab = (vocab_size + 63) // 64 * 64  # multiples of 64 keep the LM head's matmul on fast paths
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


def prepare_model(config: dict, vocab_size: int, device: torch.device):
    """The model on its device, with CPU dropout kernels where eager CPU training uses dropout."""
    model = build_model(config, vocab_size).to(device)
    if device.type == "cpu" and config["dropout"] > 0 and not compile_wanted(config, device):
        use_cpu_dropout_kernels(model)
    return model


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


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())  # tied LM head counted once
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"total": total, "without_embeddings": total - embeddings}


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token loss; labels are the inputs shifted once, here and nowhere else."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
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


def build_optimizer(model, config: dict, device: torch.device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
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


# ---------------------------------------------------------------------------------------------------
# Checkpoints: save with rotation, find the newest valid one, load
# ---------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, ValueError):  # a different GPU count: keep fresh CUDA RNGs
            torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(path: Path, payload: dict) -> None:
    atomic_write(path, lambda handle: torch.save(payload, handle))


def save_checkpoint(run: dict, config: dict) -> str:
    root = working_dir()
    name = f"checkpoints/checkpoint_epoch{run['epoch']}_step{run['global_step']}.pt"
    run["newest_checkpoint"] = name
    run["last_saved_step"] = run["global_step"]
    if not is_primary():
        return name
    save_torch(root / name, {
        "kernel_format": KERNEL_FORMAT,
        "model": run["raw_model"].state_dict(),
        "optimizer": run["optimizer"].state_dict(),
        "scheduler": run["scheduler"].state_dict(),
        "scaler": run["scaler"].state_dict() if run["scaler"] is not None else None,
        "epoch": run["epoch"], "global_step": run["global_step"], "position": run["position"],
        "micro_batch_size": run["micro_batch_size"], "accumulation": run["accumulation"],
        "best_val_loss": run["best_val_loss"], "history": run["history"], "rng": rng_state(),
        "config": config, "tokenizer_json": run["tokenizer_json"], "vocab_size": run["vocab_size"],
        "total_steps": run["total_steps"], "world_size": world_size(),
    })
    record_in_manifest(root, name, kind="checkpoint", global_step=run["global_step"], epoch=run["epoch"])
    rotate_checkpoints(root, config["max_checkpoints"])
    emit("checkpoint", path=name, global_step=run["global_step"], epoch=run["epoch"])
    return name


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


def save_best_model(run: dict, config: dict, val_loss: float) -> None:
    if not is_primary():
        return
    save_torch(working_dir() / "best_model.pt", {
        "kernel_format": KERNEL_FORMAT, "model": run["raw_model"].state_dict(), "config": config,
        "global_step": run["global_step"], "epoch": run["epoch"], "val_loss": val_loss,
        "tokenizer_json": run["tokenizer_json"], "vocab_size": run["vocab_size"],
    })
    record_in_manifest(working_dir(), "best_model.pt", kind="best", global_step=run["global_step"],
                       epoch=run["epoch"], val_loss=val_loss)


def checkpoint_candidates(root: Path) -> list[tuple[int, Path, dict]]:
    """Checkpoints listed in any kaggle-runner manifest under `root`, newest first."""
    found = []
    for manifest_path in sorted(root.rglob(MANIFEST_NAME)) if root.is_dir() else []:
        manifest = read_manifest(manifest_path.parent)
        for rel, info in manifest["files"].items():
            if info.get("kind") == "checkpoint":
                found.append((info.get("global_step", -1), manifest_path.parent / rel, info))
    return sorted(found, key=lambda item: item[0], reverse=True)


def find_resume_checkpoint(config: dict) -> Path | None:
    explicit = config.get("resume_from_checkpoint")
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise KernelStop("config_error", f"resume_from_checkpoint {explicit!r} does not exist; attach the "
                             "dataset that holds it, or remove the key to resume automatically")
        return path
    for step, path, info in checkpoint_candidates(input_root()):
        if path.exists() and path.stat().st_size == info.get("size") and sha256_of(path) == info["sha256"]:
            return path
        log(f"Skipping checkpoint {path} (step {step}): missing or its checksum does not match the manifest")
    return None


def restore_best_model(source_checkpoint: Path) -> None:
    """Carry best_model.pt from the attached dataset into this version's output, if it verifies."""
    manifest = read_manifest(source_checkpoint.parent)
    info = manifest["files"].get("best_model.pt")
    source = source_checkpoint.parent / "best_model.pt"
    target = working_dir() / "best_model.pt"
    if is_primary() and info and source.exists() and not target.exists() and sha256_of(source) == info["sha256"]:
        shutil.copyfile(source, target)
        record_in_manifest(working_dir(), "best_model.pt", **{k: v for k, v in info.items()
                                                              if k not in ("sha256", "size")})


# ---------------------------------------------------------------------------------------------------
# Evaluation and samples
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(run: dict, config: dict) -> float:
    """Mean loss over a fixed subset of the validation split (the same windows every time)."""
    model, device = run["model"], run["device"]
    model.eval()
    length, batch = config["max_length"], run["micro_batch_size"]
    n_windows = min(run["data"]["validation_windows"], config["eval_batches"] * config["batch_size"])
    losses, weights = [], []
    for start in range(0, n_windows, batch):
        ids = range(start, min(start + batch, n_windows))
        windows = gather_windows(run["data"]["validation"], ids, length).to(device, non_blocking=True)
        with run["autocast"]():
            losses.append(model(windows).float().item())
        weights.append(len(ids))
    model.train()
    return float(np.average(losses, weights=weights))


@torch.no_grad()
def sample_text(run: dict, config: dict) -> str:
    """Continue sample_prompt; runs on its own RNG so training draws the same numbers with or without it."""
    tokenizer, model, device = run["data"]["tokenizer"], run["raw_model"], run["device"]
    ids = tokenizer.encode(config["sample_prompt"]).ids or [tokenizer.token_to_id(EOS_TOKEN)]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config["seed"])
        model.eval()
        tokens = torch.tensor([ids], device=device)
        for _ in range(config["sample_tokens"]):
            logits = model(input_ids=tokens[:, -config["max_length"]:]).logits[0, -1, :run["vocab_size"]]
            top = torch.topk(logits.float(), k=min(40, logits.numel()))
            choice = top.indices[torch.multinomial(F.softmax(top.values / 0.8, dim=-1), 1)]
            tokens = torch.cat([tokens, choice.view(1, 1)], dim=1)
        model.train()
    return tokenizer.decode(tokens[0].tolist())


# ---------------------------------------------------------------------------------------------------
# Interruption: SIGTERM/SIGINT ask for a clean stop at the next step boundary
# ---------------------------------------------------------------------------------------------------
STOP_REQUEST = {"signal": None}


def install_signal_handlers() -> None:
    def request_stop(signum, _frame):
        STOP_REQUEST["signal"] = signal.Signals(signum).name
        log(f"Received {STOP_REQUEST['signal']}: saving an emergency checkpoint at the end of this step")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)


def simulated_oom(global_step: int) -> bool:
    """Test switch: KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP=N raises OOM once at step N; 'N+' at every try from N."""
    spec = os.environ.get("KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP", "")
    if not spec:
        return False
    always = spec.endswith("+")
    step = int(spec.rstrip("+"))
    if always:
        return global_step >= step
    if global_step == step and not STOP_REQUEST.get("oom_simulated"):
        STOP_REQUEST["oom_simulated"] = True
        return True
    return False


# ---------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------
def optimizer_step(run: dict, config: dict) -> float:
    """One optimizer step over batch_size * gradient_accumulation_steps windows.

    On out-of-memory the step starts over with half the micro-batch and twice the accumulation, so the
    effective batch, and the windows it covers, stay the same.
    """
    data, device, length = run["data"], run["device"], config["max_length"]
    windows_per_step = config["batch_size"] * config["gradient_accumulation_steps"]
    order = run["order"][run["position"]:run["position"] + windows_per_step]
    share = windows_per_step // world_size()
    mine = order[rank() * share:(rank() + 1) * share]
    while True:
        micro = run["micro_batch_size"]
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
        run["accumulation"] = len(chunks)
        try:
            run["optimizer"].zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for i, ids in enumerate(chunks):
                if simulated_oom(run["global_step"] + 1) and i == 0:
                    raise torch.OutOfMemoryError("simulated CUDA out of memory (KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP)")
                if run.get("ddp") is not None:  # gradients cross processes once per optimizer step
                    run["ddp"].require_backward_grad_sync = i == len(chunks) - 1
                batch = gather_windows(data["train"], ids, length)
                if device.type == "cuda":
                    batch = batch.pin_memory()
                batch = batch.to(device, non_blocking=True)
                with run["autocast"]():
                    loss = run["model"](batch) / (len(mine) / len(ids))
                if run["scaler"] is not None:
                    run["scaler"].scale(loss).backward()
                else:
                    loss.backward()
                total += loss.detach()
            break
        except torch.OutOfMemoryError as exc:
            run["optimizer"].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if run["micro_batch_size"] == 1:
                raise KernelStop("out_of_memory", f"out of memory at micro-batch 1 ({exc}); reduce max_length, "
                                 "n_embd or n_layer") from None
            run["micro_batch_size"] //= 2
            run["accumulation"] = math.ceil(len(mine) / run["micro_batch_size"])
            log(f"Out of memory at step {run['global_step'] + 1}: micro-batch now {run['micro_batch_size']}, "
                f"accumulation {run['accumulation']} (effective batch unchanged); retrying the step")
            emit("oom", global_step=run["global_step"] + 1, micro_batch_size=run["micro_batch_size"],
                 accumulation=run["accumulation"])
    if run["scaler"] is not None:
        run["scaler"].unscale_(run["optimizer"])
    torch.nn.utils.clip_grad_norm_(run["raw_model"].parameters(), config["max_grad_norm"])
    if run["scaler"] is not None:
        run["scaler"].step(run["optimizer"])
        run["scaler"].update()
    else:
        run["optimizer"].step()
    run["scheduler"].step()
    run["position"] += windows_per_step
    run["global_step"] += 1
    return total  # a device tensor: read it only at log steps, to avoid a host sync every step


def record_evaluation(run: dict, config: dict, train_loss: float | None) -> None:
    val_loss = evaluate(run, config)
    elapsed = time.time() - run["segment_started"]
    entry = {"step": run["global_step"], "epoch": run["epoch"], "train_loss": train_loss, "val_loss": val_loss,
             "perplexity": math.exp(min(val_loss, 50)), "lr": run["scheduler"].get_last_lr()[0],
             "tokens_per_second": run["tokens_this_segment"] / max(elapsed, 1e-9),
             "wall_time": run["wall_time_before"] + elapsed}
    run["history"].append(entry)
    if is_primary():
        write_json(working_dir() / HISTORY_NAME, run["history"])
    log(f"  eval  step {entry['step']:>6}  val loss {val_loss:.4f}  perplexity {entry['perplexity']:.2f}")
    emit("eval", **entry)
    if run["best_val_loss"] is None or val_loss < run["best_val_loss"]:
        run["best_val_loss"] = val_loss
        save_best_model(run, config, val_loss)


def log_progress(run: dict, config: dict, loss: float) -> None:
    elapsed = time.time() - run["segment_started"]
    tokens_per_second = run["tokens_this_segment"] / max(elapsed, 1e-9)
    remaining = (run["total_steps"] - run["global_step"]) * run["tokens_per_step"] / max(tokens_per_second, 1e-9)
    memory = torch.cuda.max_memory_allocated() / 2**20 if run["device"].type == "cuda" else None
    log(f"step {run['global_step']:>6}/{run['total_steps']}  epoch {run['epoch']}  loss {loss:.4f}  "
        f"lr {run['scheduler'].get_last_lr()[0]:.2e}  {tokens_per_second:,.0f} tok/s"
        + (f"  gpu {memory:,.0f} MiB" if memory is not None else ""))
    emit("progress", global_step=run["global_step"], total_steps=run["total_steps"], epoch=run["epoch"],
         loss=loss, lr=run["scheduler"].get_last_lr()[0], tokens_per_second=tokens_per_second,
         eta_seconds=remaining, gpu_memory_mb=memory)


STOP_REASONS = (None, "time_budget", "interrupted")


def agreed_stop_reason(run: dict) -> str | None:
    """A stop every rank takes at the same step (the signal or deadline may reach them at different times)."""
    return STOP_REASONS[agree(STOP_REASONS.index(stop_reason(run)))]


def stop_reason(run: dict) -> str | None:
    if STOP_REQUEST["signal"]:
        return "interrupted"
    if time.time() >= run["deadline"]:
        return "time_budget"
    # Test switch: behave as if the time budget ran out right after step N (same path as the real one).
    budget_step = os.environ.get("KAGGLE_RUNNER_TIME_BUDGET_AT_STEP")
    if budget_step and run["global_step"] >= int(budget_step):
        return "time_budget"
    return None


def train(run: dict, config: dict) -> str:
    """Runs until training completes ('complete') or a stop is requested (the reason)."""
    windows_per_step = config["batch_size"] * config["gradient_accumulation_steps"]
    last_loss = None
    while run["global_step"] < run["total_steps"]:
        reason = agreed_stop_reason(run)
        if reason:
            return reason
        if run["position"] + windows_per_step > len(run["order"]):  # epoch end: leftover windows wait
            record_evaluation(run, config, last_loss)
            if config["sample_tokens"] and is_primary():
                text = sample_text(run, config)
                log(f"  sample after epoch {run['epoch']}: {text!r}")
                emit("sample", epoch=run["epoch"], text=text)
            run["epoch"] += 1
            run["position"] = 0
            run["order"] = epoch_order(config["seed"], run["epoch"], run["data"]["train_windows"])
            continue
        try:
            loss = optimizer_step(run, config)
        except (KernelStop, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            if run["model"] is run["eager_model"]:
                raise
            # torch.compile fails lazily, at the first step: fall back to eager and redo the step.
            log(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:300]}); training uncompiled")
            run["model"] = run["eager_model"]
            continue
        run["tokens_this_segment"] += run["tokens_per_step"]
        step = run["global_step"]
        if step % config["log_steps"] == 0 or step == run["total_steps"]:
            last_loss = float(loss)
            log_progress(run, config, last_loss)
        if step % config["eval_steps"] == 0 and step < run["total_steps"]:
            record_evaluation(run, config, float(loss))
        if step % config["save_steps"] == 0:
            save_checkpoint(run, config)
    record_evaluation(run, config, last_loss)
    return "complete"


def finish(run: dict, config: dict) -> None:
    """final_model/ in Hugging Face format: loads with AutoModelForCausalLM and AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    if not is_primary():
        return
    target = working_dir() / "final_model"
    run["raw_model"].save_pretrained(target)
    PreTrainedTokenizerFast(tokenizer_object=run["data"]["tokenizer"], eos_token=EOS_TOKEN,
                            bos_token=EOS_TOKEN, unk_token=EOS_TOKEN).save_pretrained(target)
    if config["sample_tokens"]:
        text = sample_text(run, config)
        log(f"  sample at the end: {text!r}")
        emit("sample", epoch=run["epoch"], text=text)


def build_training(config: dict, data: dict, raw_model, device: torch.device, dtype: torch.dtype,
                   total_steps: int) -> dict:
    """Optimizer, schedule, precision and the run's counters: what optimizer_step needs (bench uses it too)."""
    optimizer = build_optimizer(raw_model, config, device)
    loss_module = LossModule(raw_model)
    scheduler = build_scheduler(optimizer, config, total_steps)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=dtype)
    else:
        autocast = contextlib.nullcontext
    windows_per_step = config["batch_size"] * config["gradient_accumulation_steps"]
    return {"data": data, "device": device, "raw_model": raw_model, "optimizer": optimizer,
            "scheduler": scheduler, "scaler": scaler, "autocast": autocast, "total_steps": total_steps,
            "tokenizer_json": data.get("tokenizer_json"), "vocab_size": raw_model.config.vocab_size,
            "epoch": 1, "global_step": 0, "position": 0, "micro_batch_size": config["batch_size"],
            "accumulation": config["gradient_accumulation_steps"], "best_val_loss": None, "history": [],
            "newest_checkpoint": None, "last_saved_step": None, "tokens_this_segment": 0,
            "tokens_per_step": windows_per_step * config["max_length"], "wall_time_before": 0.0,
            "segment_started": time.time(), "deadline": float("inf"), "model": loss_module,
            "eager_model": loss_module, "ddp": None}


def setup_run(config: dict, started: float) -> dict:
    resume_path = find_resume_checkpoint(config)
    checkpoint = None
    if resume_path is not None:
        try:
            checkpoint = torch.load(resume_path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise KernelStop("resume_error", f"cannot read checkpoint {resume_path}: {exc}") from None
        log(f"Resuming from {resume_path} (step {checkpoint['global_step']}, epoch {checkpoint['epoch']})")

    device, dtype = pick_device_and_dtype()
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
    raw_model = prepare_model(config, vocab_size, device)
    counts = count_parameters(raw_model)
    log(f"Model: GPT-2, {counts['total'] / 1e6:.2f}M parameters ({counts['without_embeddings'] / 1e6:.2f}M "
        f"without embeddings), vocabulary {vocab_size:,} padded to {raw_model.config.vocab_size:,}")
    log(f"Device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"precision {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")

    windows_per_step = config["batch_size"] * config["gradient_accumulation_steps"]
    steps_per_epoch = data["train_windows"] // windows_per_step
    if steps_per_epoch < 1:
        raise KernelStop("data_error", f"the training split has {data['train_windows']} windows, fewer than one "
                         f"optimizer step of batch_size x gradient_accumulation_steps = {windows_per_step}")
    total_steps = steps_per_epoch * config["epochs"]
    if config.get("max_steps"):
        total_steps = min(total_steps, config["max_steps"])

    run = build_training(config, data, raw_model, device, dtype, total_steps)
    run["deadline"] = started + config["session_timeout_seconds"] - config["safety_margin_seconds"]
    optimizer, scheduler, scaler = run["optimizer"], run["scheduler"], run["scaler"]
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        for key in ("epoch", "global_step", "position", "best_val_loss", "history"):
            run[key] = checkpoint[key]
        # A micro-batch halved by an out-of-memory error stays halved: the same effective batch either way.
        run["micro_batch_size"] = checkpoint["micro_batch_size"]
        run["accumulation"] = checkpoint["accumulation"]
        run["wall_time_before"] = run["history"][-1]["wall_time"] if run["history"] else 0.0
        set_rng_state(checkpoint["rng"])
        restore_best_model(resume_path)
        if run["history"] and is_primary():
            write_json(working_dir() / HISTORY_NAME, run["history"])
    if not is_primary():  # different dropout masks on each rank's share of the batch
        torch.manual_seed(config["seed"] + 7919 * rank() + run["global_step"])
    run["vocab_size"] = vocab_size  # the tokenizer's, not the padded embedding's
    run["order"] = epoch_order(config["seed"], run["epoch"], data["train_windows"])
    if world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        run["ddp"] = DistributedDataParallel(run["eager_model"], device_ids=device_ids)
        run["eager_model"] = run["ddp"]
    run["model"] = maybe_compile(run["eager_model"], config, device)
    raw_model.train()
    emit("start", total_steps=total_steps, global_step=run["global_step"], epoch=run["epoch"],
         parameters=counts["total"], parameters_without_embeddings=counts["without_embeddings"],
         device=str(device), dtype=str(dtype), resumed_from=str(resume_path) if resume_path else None,
         steps_per_epoch=steps_per_epoch, world_size=world_size())
    return run


def main(config: dict) -> int:
    started = time.time()
    log(f"kaggle-runner kernel: {config['title']} | python {sys.version.split()[0]} | "
        f"inputs {input_root()} | outputs {working_dir()}")
    run: dict = {}
    try:
        processes = wanted_processes(config)
        windows_per_step = config["batch_size"] * config["gradient_accumulation_steps"]
        if windows_per_step % processes:
            raise KernelStop("config_error", f"batch_size x gradient_accumulation_steps = {windows_per_step} windows "
                             f"per step cannot be shared evenly by {processes} processes; make it a multiple")
        if processes > 1 and can_start_workers():
            log(f"Starting {processes} training processes (DistributedDataParallel)")
            return run_workers(processes)
        if processes > 1 and "RANK" not in os.environ:
            log(f"{processes} devices, but a notebook cannot start worker processes: training on one")
        install_signal_handlers()
        run = setup_run(config, started)
        outcome = train(run, config)
        if outcome == "complete":
            finish(run, config)
            if run["last_saved_step"] != run["global_step"]:
                save_checkpoint(run, config)
            write_run_state("complete", "complete", run)
            emit("end", status="complete", global_step=run["global_step"], epoch=run["epoch"])
            log(f"Training complete at step {run['global_step']}.")
            return 0
        if run["last_saved_step"] != run["global_step"]:
            save_checkpoint(run, config)
        write_run_state("incomplete", outcome, run, message=f"stopped by {outcome} at step {run['global_step']}")
        emit("end", status="incomplete", reason=outcome, global_step=run["global_step"], epoch=run["epoch"])
        log(f"Stopped ({outcome}) at step {run['global_step']} of {run['total_steps']}; "
            f"resume from {run['newest_checkpoint']}.")
        return 0
    except KernelStop as stop:
        log(f"ERROR ({stop.reason}): {stop}")
        if run.get("global_step") and run.get("last_saved_step") != run["global_step"]:
            with contextlib.suppress(Exception):
                save_checkpoint(run, config)
        write_run_state("incomplete", stop.reason, run, message=str(stop))
        emit("end", status="incomplete", reason=stop.reason, global_step=run.get("global_step", 0))
        return stop.exit_code
    except Exception as exc:
        traceback.print_exc()
        write_run_state("incomplete", "error", run, message=f"{type(exc).__name__}: {exc}")
        emit("end", status="incomplete", reason="error", global_step=run.get("global_step", 0))
        return 1
