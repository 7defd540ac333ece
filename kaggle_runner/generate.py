"""Sampling from a trained run on this machine: the final model, or the best weights as a Hugging Face folder.

The kernel saves final_model/ with save_pretrained when training completes, and best_model.pt (a torch
payload: the GPT's state dict, the kernel's config, the tokenizer) whenever validation improves.
best_model_folder() turns the latter into outputs/RUN/best_model/, a folder that from_pretrained loads like
final_model/. torch and transformers come with the `local` extra and are imported only here, on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kaggle_runner.artifacts import sha256_of
from kaggle_runner.errors import KaggleRunnerError

LOCAL_EXTRA = "pip install 'kaggle-runner[local]'"
BEST_PAYLOAD = "best_model.pt"
BEST_FOLDER = "best_model"
FINAL_FOLDER = "final_model"
STAMP = "kaggle_runner_best.json"  # in best_model/: which best_model.pt it was built from
EOS_TOKEN = "<|endoftext|>"  # the kernel's only special token


@dataclass
class Generation:
    text: str  # the prompt as the model saw it, then what it wrote
    prompt_tokens: int
    new_tokens: int
    notes: list[str] = field(default_factory=list)


def _require_local() -> None:
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        missing = exc.name or "torch or transformers"
        raise KaggleRunnerError(f"sampling runs the model on this machine and needs {missing}: "
                                f"{LOCAL_EXTRA}") from None


def run_outputs(name: str, outputs: str | Path | None = None) -> Path:
    return Path(outputs) if outputs else Path("outputs") / name


# -- what may be loaded ---------------------------------------------------------------------------------------
# Weights load only from safetensors: a pickle (.bin, .pt) can run code when it is read.
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MIN_TORCH_FOR_PAYLOADS = (2, 6)  # weights_only=True loads are bypassable before 2.6 (CVE-2025-32434)


def check_model_folder(folder: Path) -> None:
    """A model folder from a kernel's outputs is untrusted: no code in it, no remote code asked for, no pickled
    weights, and a model type transformers itself ships. Refused in one line, never prompted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    code = sorted(p.name for p in folder.rglob("*") if p.is_file() and p.suffix == ".py")
    if code:
        raise KaggleRunnerError(f"{folder} holds Python code ({', '.join(code[:3])}): kaggle-runner never runs code "
                                "from a kernel's outputs")
    pickled = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLES)
    if pickled:
        raise KaggleRunnerError(f"{folder} holds pickled weights ({', '.join(pickled[:3])}), which can run code when "
                                "loaded; kaggle-runner loads only safetensors (what the kernel writes)")
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            settings = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            raise KaggleRunnerError(f"{path} is not a JSON object; fetch the run again") from None
        if not isinstance(settings, dict):
            raise KaggleRunnerError(f"{path} is not a JSON object; fetch the run again")
        if "auto_map" in settings:
            raise KaggleRunnerError(f"{path} asks for the model's own code (auto_map): kaggle-runner never runs code "
                                    "from a kernel's outputs")
        if name == "config.json" and settings.get("model_type") not in CONFIG_MAPPING_NAMES:
            raise KaggleRunnerError(f"{path} names model type {str(settings.get('model_type'))[:40]!r}, which "
                                    "transformers does not ship: kaggle-runner loads only built-in model types")


def _check_torch_for_payloads() -> None:
    import torch

    numbers = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2] if part.isdigit())
    if numbers < MIN_TORCH_FOR_PAYLOADS:
        raise KaggleRunnerError(f"torch {torch.__version__} cannot load best_model.pt safely (its weights_only loads "
                                "are bypassable before 2.6, CVE-2025-32434): pip install 'torch>=2.6'")


# -- best_model.pt as a Hugging Face folder ---------------------------------------------------------------
def _config_from_payload(payload: dict):
    """The kernel's GPT2Config, rebuilt from the payload when final_model/ is not there yet (a run in progress)."""
    from transformers import GPT2Config

    state, config = payload["model"], payload.get("config") or {}
    wte = state["transformer.wte.weight"]
    layers = {key.split(".")[2] for key in state if key.startswith("transformer.h.")}
    eos = int(payload.get("vocab_size") or wte.shape[0]) - 1
    return GPT2Config(vocab_size=wte.shape[0], n_positions=state["transformer.wpe.weight"].shape[0],
                      n_embd=wte.shape[1], n_layer=len(layers), n_head=int(config.get("n_head", 1)),
                      bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True,
                      activation_function="gelu_pytorch_tanh")


def _tokenizer_from_payload(payload: dict, max_length: int):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not payload.get("tokenizer_json"):
        raise KaggleRunnerError("best_model.pt carries no tokenizer and there is no final_model/ to take one from")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(payload["tokenizer_json"]),
                                   eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
                                   model_max_length=max_length)


def best_model_folder(outputs: str | Path) -> Path:
    """outputs/best_model/: best_model.pt's weights in Hugging Face format, written on first use.

    The architecture and tokenizer come from outputs/final_model/ (or, before training completed, from the
    payload itself); the weights from best_model.pt's "model" state dict, loaded with weights_only=True.
    Rebuilt whenever best_model.pt changes (a later fetch). Afterwards
    `AutoModelForCausalLM.from_pretrained("outputs/RUN/best_model")` loads it, and AutoTokenizer likewise.
    """
    _require_local()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    outputs = Path(outputs)
    source, target, final = outputs / BEST_PAYLOAD, outputs / BEST_FOLDER, outputs / FINAL_FOLDER
    if not source.is_file():
        raise KaggleRunnerError(f"{source} is missing: the run has not saved best weights yet "
                                "(the kernel writes them at its first evaluation)")
    digest = sha256_of(source)
    try:
        if json.loads((target / STAMP).read_text())["source_sha256"] == digest:
            return target
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass
    _check_torch_for_payloads()
    if final.is_dir():
        check_model_folder(final)
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn file, or not a torch payload at all
        raise KaggleRunnerError(f"cannot read {source} ({type(exc).__name__}: {str(exc)[:200]}); "
                                f"fetch the run again") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise KaggleRunnerError(f"{source} is not the kernel's best-model payload (no 'model' state dict)")
    if (final / "config.json").is_file():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(final, trust_remote_code=False),
                                                 trust_remote_code=False)
    else:
        model = AutoModelForCausalLM.from_config(_config_from_payload(payload), trust_remote_code=False)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise KaggleRunnerError(f"best_model.pt does not fit the model in {final}/config.json: "
                                f"{str(exc).splitlines()[0]}") from None
    if (final / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=False)
    else:
        tokenizer = _tokenizer_from_payload(payload, int(model.config.n_positions))
    staging = Path(tempfile.mkdtemp(prefix=f".{BEST_FOLDER}.", dir=outputs))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        stamp = {"source_sha256": digest, "global_step": payload.get("global_step"), "epoch": payload.get("epoch"),
                 "val_loss": payload.get("val_loss")}
        (staging / STAMP).write_text(json.dumps(stamp, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# -- sampling -------------------------------------------------------------------------------------------------
def context_length(model, tokenizer) -> int:
    """The most tokens the model attends to: its position table, or the tokenizer's limit if smaller."""
    config = model.config
    limits = [getattr(config, key, None) for key in ("n_positions", "max_position_embeddings")]
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**9:  # transformers' "no limit" is a huge sentinel
        limits.append(limit)
    limits = [int(x) for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else 1024


def sample(folder: str | Path, prompt: str, tokens: int = 100, temperature: float = 0.8, top_k: int = 40,
           seed: int | None = None) -> Generation:
    """Continue `prompt` with the model in `folder`, on the CPU, inside the model's context length."""
    _require_local()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(Path(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, use_safetensors=True)
        model = model.float().eval()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise KaggleRunnerError(f"cannot load the model in {folder}: {(str(exc).splitlines() or [''])[0]}") from None
    notes = []
    context = context_length(model, tokenizer)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    if not ids:
        start = eos if eos is not None else tokenizer.bos_token_id
        ids = [start if start is not None else 0]
    # Prompt and new tokens share the context: a long prompt keeps at least half of it, new tokens the rest.
    keep = max(1, min(len(ids), max(context // 2, context - tokens), context - 1))
    new = min(tokens, context - keep)
    if new < tokens:
        notes.append(f"note: {tokens} new tokens do not fit the model's context of {context} after the prompt; "
                     f"writing {new}")
    if len(ids) > keep:
        notes.append(f"note: the prompt is {len(ids)} tokens; the model sees its last {keep} "
                     f"(context {context}, {new} new tokens)")
        ids = ids[-keep:]
    # The embedding may be padded past the tokenizer's vocabulary: those ids decode to nothing, never sample them.
    padding = list(range(len(tokenizer), model.config.vocab_size))
    options = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_k": None}
    inputs = torch.tensor([ids])
    with torch.random.fork_rng(devices=[]), torch.inference_mode():  # the seed leaves the caller's RNG alone
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new,
                             min_new_tokens=0, pad_token_id=eos, eos_token_id=eos, top_p=None,
                             suppress_tokens=padding or None, **options)
    written = out[0, len(ids):].tolist()
    text = tokenizer.decode(ids + written, skip_special_tokens=True)
    return Generation(text=text, prompt_tokens=len(ids), new_tokens=len(written), notes=notes)


def _quiet_transformers() -> None:
    """No loading bars or long-sequence warnings between the command and its text."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def generate(workspace: str | Path, name: str, prompt: str, tokens: int = 100, temperature: float = 0.8,
             top_k: int = 40, seed: int | None = None, best: bool = False,
             outputs: str | Path | None = None, endpoint: str | None = None) -> Generation:
    """Sample from run `name`'s final model (or best weights), fetching its outputs first if they are not here."""
    _require_local()
    if tokens < 1:
        raise KaggleRunnerError("--tokens must be at least 1")
    folder = run_outputs(name, outputs)
    needed = folder / (BEST_PAYLOAD if best else f"{FINAL_FOLDER}/config.json")
    if not needed.is_file():
        from kaggle_runner.launcher import fetch_run

        fetch_run(workspace, name, str(folder), endpoint=endpoint)
        if not needed.is_file():
            raise KaggleRunnerError(
                f"run {name} has no best weights yet (best_model.pt is written at the first evaluation)" if best
                else f"run {name} has no final model yet (final_model/ is written when training completes); "
                     f"`kaggle-runner generate {name} PROMPT --best` samples from the best weights so far")
    _quiet_transformers()
    model_folder = best_model_folder(folder) if best else folder / FINAL_FOLDER
    return sample(model_folder, prompt, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed)
