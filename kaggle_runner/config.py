"""The run configuration: one flat set of keys, loaded from TOML sections, presets and --set overrides.

Keys keep the seed notebook's names (``n_embd``, ``batch_size``, ``save_steps`` ...). TOML sections
exist only for readability: every key is unique across them, so ``--set epochs=5`` needs no section.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from slugify import slugify

from kaggle_runner.errors import KaggleRunnerError

PRESETS = ("tiny", "seed", "finetune", "script")

# Shapes the official client knows; retired ones still push but run on a replacement (kaggle 2.2.5).
MACHINE_SHAPES = {"NvidiaTeslaT4"}
RETIRED_MACHINE_SHAPES = {"NvidiaTeslaP100": "Kaggle runs it on NvidiaTeslaT4 instead."}


DATASETS = ("wikitext-103", "wikitext-2", "stdlib-docs", "text-files")


class ConfigError(KaggleRunnerError):
    """A configuration problem, phrased for the user: which key, what value, which rule."""


class RunConfig(BaseModel):
    """Every setting of a run. Defaults are the seed notebook's CONFIG."""

    # Non-finite numbers (inf, nan) are refused everywhere: a learning rate of inf trains nothing but NaNs.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    _unknown_sections: list[str] = PrivateAttr(default_factory=list)  # load_config's: warnings() says them

    # [model]
    n_embd: int = Field(256, gt=0)
    n_layer: int = Field(8, gt=0)
    n_head: int = Field(8, gt=0)
    max_length: int = Field(512, gt=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # Fine-tune this model (a Hugging Face hub id, or a local folder holding an AutoModelForCausalLM and its
    # tokenizer) with its own tokenizer, instead of training model_type from scratch.
    init_from: str | None = None
    model_type: Literal["gpt2", "llama"] = "gpt2"
    gradient_checkpointing: bool = False

    # [training]
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(8, gt=0)
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(200, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: int = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)
    # End each session after this many optimizer steps (saved and resumable, as at the time budget):
    # short segments on purpose, and the tiny preset's way to chain the same on any machine.
    segment_steps: int | None = Field(None, gt=0)
    eval_steps: int = Field(500, gt=0)
    eval_batches: int = Field(20, gt=0)
    log_steps: int = Field(50, gt=0)
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's seed range
    compile: Literal["auto", "on", "off"] = "auto"
    # The dtype the step autocasts to. auto: bf16 on Ampere and newer, fp16 with a GradScaler on a T4, fp32 on a
    # CPU. fp32 trades speed for range (a model that diverges in fp16); fp16/bf16 on a CPU run slowly.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    world_size: int | None = Field(None, ge=1)

    # [checkpoints]
    save_steps: int = Field(1000, gt=0)
    max_checkpoints: int = Field(4, ge=1)
    resume_from_checkpoint: str | None = None
    # Kaggle saves at most 20 GiB of /kaggle/working: the kernel keeps its outputs (checkpoints, best, final
    # model, tokens) under this many GiB, keeping fewer checkpoints than max_checkpoints when they would not fit.
    output_budget_gb: float = Field(19.0, gt=0, le=20)

    # [data]
    # wikitext-103 | wikitext-2 | stdlib-docs | text-files | hf:<hub id or local save_to_disk folder>
    dataset: str = "wikitext-103"
    dataset_config: str | None = None
    text_column: str = Field("text", min_length=1)
    train_split: str = Field("train", min_length=1)
    validation_split: str = Field("validation", min_length=1)
    text_files_path: str | None = None
    # A local folder of .txt/.md/.jsonl files: the launcher uploads it as the private dataset
    # <user>/<slug>-corpus (a new version only when its content changes) and trains on it.
    data_dir: str | None = None
    dataset_sources: list[str] = Field(default_factory=list)
    tokenizer: Literal["gpt2", "bpe"] = "gpt2"
    bpe_vocab_size: int = Field(8192, ge=256)
    cache_tokens: bool = True
    sample_prompt: str = "The history of"
    sample_tokens: int = Field(60, ge=0)

    # [kaggle]
    slug: str = "kaggle-runner-gpt"
    title: str = "Kaggle Runner GPT"
    machine_shape: str = "NvidiaTeslaT4"
    enable_internet: bool = True
    is_private: bool = True
    kernel_type: Literal["script", "notebook"] = "script"
    session_timeout_seconds: int = Field(12 * 3600, gt=0, le=12 * 3600)
    safety_margin_seconds: int = Field(900, ge=0)
    # A session without a usable GPU (Kaggle sometimes gives a CPU, or a GPU torch cannot use) ends at once
    # with reason no_gpu, unless a CPU is acceptable.
    allow_cpu: bool = False
    # Kaggle updates its images every few weeks. "original": each kernel keeps the image its first version ran on,
    # so a chain's segments train on the same torch; "latest": every version takes the newest image.
    docker_image_pinning_type: Literal["original", "latest"] = "original"

    # [job]: your own training script, chained (docs/script.md). With `script` set, the [model], [training],
    # [data] and [checkpoints] keys do not apply.
    script: str | None = None  # the entry point, relative to the config's folder
    files: list[str] | None = None  # globs of other files shipped beside it (default: the .py files next to it)
    requirements: str | None = None  # a requirements file installed at start when internet is on
    args: list[str] = Field(default_factory=list)  # the script's command-line arguments

    # [chain]
    max_segments: int = Field(6, ge=1)
    max_stalled_segments: int = Field(2, ge=1)
    min_quota_hours: float = Field(1.0, ge=0)
    segment_grace_seconds: int = Field(600, ge=0)
    # After a checkpoint upload is reported ready, wait this long before pushing: Kaggle pins the dataset
    # version at push time, and a version can be "ready" minutes before a new session can mount it.
    dataset_settle_seconds: int = Field(180, ge=0)
    # How often a segment that did not find its checkpoint (reason resume_missing) is pushed again.
    max_resume_retries: int = Field(3, ge=0)
    # How a checkpoint reaches the next segment. "outputs": the next version reads this one's outputs on Kaggle
    # (kernel_sources; two kernels, <slug> and <slug>-b, take turns): nothing moves through this machine.
    # "dataset": this machine downloads the checkpoint and uploads it as the private dataset <slug>-ckpt.
    # "auto": outputs where `kaggle-runner doctor` confirmed them on this account (and --local), else dataset.
    resume_via: Literal["auto", "outputs", "dataset"] = "auto"
    # After a version ends, wait at least this long before pushing the next one that attaches its outputs
    # (Kaggle attaches a version's outputs some time after it ends; doctor measures how long on your account).
    outputs_settle_seconds: int = Field(180, ge=0)
    # POST here when a segment starts and when the chain completes, stops or fails (never blocks the chain);
    # "text" sends one plain line, as ntfy-style services expect.
    notify_url: str | None = None
    notify_format: Literal["json", "text"] = "json"

    @field_validator("slug")
    @classmethod
    def _slug_rules(cls, value: str) -> str:
        if slugify(value) != value:
            raise ValueError(f"must be lower-case letters, digits and hyphens (e.g. {slugify(value)!r})")
        # The checkpoint dataset is '<slug>-ckpt', and Kaggle wants dataset slugs of 6-50 characters.
        if not 5 <= len(value) <= 45:
            raise ValueError("must be 5-45 characters, so that the dataset '<slug>-ckpt' fits Kaggle's 6-50")
        return value

    @field_validator("dataset_sources")
    @classmethod
    def _dataset_refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            parts = ref.split("/")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{ref!r} is not a Kaggle dataset reference (owner/dataset-slug)")
        return value

    @field_validator("dataset")
    @classmethod
    def _dataset_source(cls, value: str) -> str:
        if value in DATASETS:
            return value
        if value.startswith("hf:"):
            if not value[3:].strip() or value[3:] != value[3:].strip():
                raise ValueError("hf: needs a Hugging Face dataset id or a local folder, "
                                 "e.g. 'hf:roneneldan/TinyStories'")
            return value
        raise ValueError(f"use one of {', '.join(DATASETS)}, or hf:<dataset id or folder>")

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value != value.strip()):
            raise ValueError("must be a Hugging Face model id (e.g. 'HuggingFaceTB/SmolLM2-135M') or a local folder")
        return value

    @field_validator("notify_url")
    @classmethod
    def _notify_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL, e.g. https://ntfy.sh/my-topic")
        return value

    @field_validator("machine_shape")
    @classmethod
    def _known_shape(cls, value: str) -> str:
        if value not in MACHINE_SHAPES and value not in RETIRED_MACHINE_SHAPES:
            known = ", ".join(sorted(MACHINE_SHAPES))
            raise ValueError(f"unknown machine shape; use one of: {known}")
        return value

    @model_validator(mode="after")
    def _cross_key_rules(self) -> RunConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if slugify(self.title) != self.slug:
            raise ValueError(
                f"title {self.title!r} slugifies to {slugify(self.title)!r}, not to slug {self.slug!r}; "
                "Kaggle derives the kernel's address from its title"
            )
        if not 5 <= len(self.title) <= 50:
            raise ValueError(f"title {self.title!r} must be 5-50 characters")
        if self.dataset == "text-files" and not self.text_files_path:
            raise ValueError("dataset 'text-files' needs text_files_path (a file, folder or glob)")
        if self.init_from and self.model_type != "gpt2":
            raise ValueError(f"model_type {self.model_type!r} is for models trained from scratch; init_from "
                             f"{self.init_from!r} brings its own architecture (remove one of the two)")
        if self.resume_via != "dataset" and len(self.alternate_title) > 50:
            raise ValueError(f"title {self.title!r} must be at most 48 characters with resume_via = "
                             f"{self.resume_via!r}: the outputs route's second kernel is {self.alternate_title!r}")
        if self.script is not None and (not self.script.strip() or not self.script.endswith(".py")):
            raise ValueError(f"script {self.script!r} must name a Python file (train.py), relative to the config")
        if self.script is not None and self.kernel_type != "script":
            raise ValueError("a [job] is pushed as a script: remove kernel_type = \"notebook\"")
        if self.safety_margin_seconds >= self.session_timeout_seconds:
            raise ValueError(
                f"safety_margin_seconds ({self.safety_margin_seconds}) must be below "
                f"session_timeout_seconds ({self.session_timeout_seconds})"
            )
        return self

    # The chain's own datasets, each named for what it holds.
    @property
    def checkpoint_dataset_slug(self) -> str:
        """The checkpoint dataset: each resume's checkpoint and best_model.pt (the dataset route)."""
        return f"{self.slug}-ckpt"

    @property
    def token_dataset_slug(self) -> str:
        """The token dataset: the packed token arrays, so later segments skip tokenizing (the dataset route)."""
        return f"{self.slug}-data"

    @property
    def corpus_dataset_slug(self) -> str:
        """The corpus dataset: the text of data_dir, uploaded by launch."""
        return f"{self.slug}-corpus"

    # The outputs route's second kernel: segments alternate between <slug> and <slug>-b, each attaching the
    # other's newest outputs (Kaggle derives a kernel's slug from its title).
    @property
    def alternate_slug(self) -> str:
        return f"{self.slug}-b"

    @property
    def alternate_title(self) -> str:
        return f"{self.title} B"

    def parameters_from_scratch(self) -> int | None:
        """The model's parameter count when trained from scratch (as the kernel builds it); None for init_from,
        whose size only the kernel learns."""
        if self.init_from:
            return None
        vocab = ((50257 if self.tokenizer == "gpt2" else self.bpe_vocab_size) + 63) // 64 * 64
        d, layers = self.n_embd, self.n_layer
        if self.model_type == "llama":
            ffn = (8 * d // 3 + 63) // 64 * 64
            return vocab * d + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d
        return vocab * d + self.max_length * d + layers * (12 * d * d + 13 * d) + 2 * d

    def outputs_fit(self) -> str | None:
        """Why one checkpoint (weights and AdamW's two moments, fp32) cannot fit output_budget_gb beside
        best_model.pt and the final model; None when it can, or when only the kernel can tell (init_from, a job)."""
        parameters = None if self.is_job else self.parameters_from_scratch()
        if parameters is None:
            return None
        weights = 4 * parameters
        needed = 3 * weights + 3 * weights  # one checkpoint; best (twice while rewritten) and the final model
        if needed <= self.output_budget_gb * 2**30:
            return None
        return (f"one checkpoint of this {parameters / 1e6:,.1f}M-parameter model (about {_size(3 * weights)}) "
                f"beside best_model.pt and the final model needs about {_size(needed)} of outputs, more than "
                f"output_budget_gb = {self.output_budget_gb} (Kaggle saves at most 20 GiB of /kaggle/working)")

    def warnings(self) -> list[str]:
        notes = [f"section [{name}] is not one of [{'], ['.join(SECTIONS)}] (a typo?); its keys were read all the "
                 "same, since keys are unique across sections" for name in self._unknown_sections]
        if self.machine_shape in RETIRED_MACHINE_SHAPES:
            notes.append(f"machine_shape {self.machine_shape!r} is retired: "
                         f"{RETIRED_MACHINE_SHAPES[self.machine_shape]}")
        if self.data_dir and "dataset" in self.model_fields_set and self.dataset != "text-files":
            notes.append(f"data_dir is set, so the run trains on {self.data_dir!r}, not on dataset "
                         f"{self.dataset!r} (remove one of the two to silence this)")
        return notes

    @property
    def is_job(self) -> bool:
        """A [job]: the user's own script, carried by the job kernel, rather than kaggle-runner's training kernel."""
        return self.script is not None

    def job_config(self) -> dict[str, Any]:
        """What the job kernel needs at run time (the script's files travel beside it, not here)."""
        keys = ("script", "args", "requirements", "session_timeout_seconds", "safety_margin_seconds", "allow_cpu",
                "enable_internet", "output_budget_gb")
        return {key: getattr(self, key) for key in keys}

    def kernel_config(self) -> dict[str, Any]:
        """What the kernel needs at run time: everything but the launcher-only keys."""
        if self.is_job:
            return self.job_config()
        launcher_only = {"machine_shape", "is_private", "kernel_type", "dataset_sources",
                         "max_segments", "max_stalled_segments", "min_quota_hours", "segment_grace_seconds",
                         "dataset_settle_seconds", "max_resume_retries", "notify_url", "notify_format",
                         "data_dir", "resume_via", "outputs_settle_seconds", "docker_image_pinning_type"}
        return {k: v for k, v in self.model_dump().items() if k not in launcher_only}


def _size(count: float) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _field_names() -> set[str]:
    return set(RunConfig.model_fields)


def preset_text(name: str) -> str:
    """The commented TOML that ``init --preset NAME`` writes."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return resources.files("kaggle_runner.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")


def _flatten(document: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    seen_in: dict[str, str] = {}
    for section, body in document.items():
        items = body.items() if isinstance(body, dict) else [(section, body)]
        where = section if isinstance(body, dict) else "top level"
        for key, value in items:
            if key in flat:
                raise ConfigError(f"{source}: key {key!r} appears in both [{seen_in[key]}] and [{where}]; "
                                  "keys are unique across sections")
            flat[key] = value
            seen_in[key] = where
    return flat


SECTIONS = ("model", "training", "checkpoints", "data", "kaggle", "job", "chain")
# The first key of each section, in RunConfig's declaration order: every key belongs to the section above it.
_SECTION_STARTS = {"n_embd": "model", "batch_size": "training", "save_steps": "checkpoints", "dataset": "data",
                   "slug": "kaggle", "script": "job", "max_segments": "chain"}


def _key_sections() -> dict[str, str]:
    sections, current = {}, "model"
    for key in RunConfig.model_fields:
        current = _SECTION_STARTS.get(key, current)
        sections[key] = current
    return sections


KEY_SECTIONS = _key_sections()
# What a [job] cannot set, wherever it is written (any section, or --set): these keys configure kaggle-runner's
# own training kernel. A job keeps the output budget (its outputs live under Kaggle's 20 GiB too) and the
# datasets to attach.
NOT_FOR_JOBS = frozenset(key for key, section in KEY_SECTIONS.items()
                         if section in ("model", "training", "checkpoints", "data")) - {"output_budget_gb",
                                                                                       "dataset_sources"}


def refuse_kernel_keys_for_jobs(values: dict[str, Any], source: str) -> None:
    if not values.get("script"):
        return
    present = [key for key in values if key in NOT_FOR_JOBS]
    if present:
        sections = sorted({KEY_SECTIONS[key] for key in present}, key=SECTIONS.index)
        raise ConfigError(f"{source}: a [job] runs your own script, so [{'], ['.join(sections)}] keys do not apply: "
                          f"remove {', '.join(present)} (datasets to attach go in [kaggle] as dataset_sources)")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    return _flatten(document, source)


def unknown_sections(text: str) -> list[str]:
    """Section names of a config that the reference does not have: their keys count all the same (sections are
    for reading), but a misspelled one ([trainning]) deserves a word."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []
    return [name for name, body in document.items() if isinstance(body, dict) and name not in SECTIONS]


def parse_override(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from --set; VALUE is read as a TOML value, or as a bare string if it is not one."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=5")
    if key not in _field_names():
        raise ConfigError(f"--set {key}: unknown key; see docs/config.md for the keys")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _describe(errors: ValidationError, source: str, values: dict[str, Any]) -> str:
    lines = []
    for err in errors.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {loc!r}; see docs/config.md for the keys")
        elif loc:
            lines.append(f"{source}: {loc} = {json.dumps(values.get(loc), default=str)}: {message}")
        else:
            lines.append(f"{source}: {message}")
    return "; ".join(lines)


def build_config(values: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                 source: str = "config") -> RunConfig:
    merged = dict(values)
    for item in overrides:
        key, value = parse_override(item)
        merged[key] = value
    refuse_kernel_keys_for_jobs(merged, source)
    try:
        return RunConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, merged)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; create one with `kaggle-runner init`") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    config = build_config(parse_toml(text, str(path)), overrides, source=str(path))
    config._unknown_sections = unknown_sections(text)
    return config


def load_preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    return build_config(parse_toml(preset_text(name), f"preset {name}"), overrides, source=f"preset {name}")
