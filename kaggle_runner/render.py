"""Render a run configuration into a Kaggle kernel folder: the code file plus kernel-metadata.json."""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2

from kaggle_runner import __version__
from kaggle_runner.config import RunConfig
from kaggle_runner.errors import KaggleRunnerError

TEMPLATE_PACKAGE = "kaggle_runner.kernel_template"
SCRIPT_NAME = "train.py"
NOTEBOOK_NAME = "train.ipynb"
METADATA_NAME = "kernel-metadata.json"
SECTION_RULE_CHARS = ("=", "-")


class RenderError(KaggleRunnerError):
    """The kernel could not be rendered (a bug, or a value the config block cannot carry)."""


@dataclass(frozen=True)
class RenderedKernel:
    folder: Path
    code_file: Path
    metadata_file: Path
    metadata: dict[str, Any]


def _environment() -> jinja2.Environment:
    # Autoescape is off because the output is Python; values never reach the template as code anyway:
    # the config travels as one JSON document checked after rendering.
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: resources.files(TEMPLATE_PACKAGE).joinpath(name)
                                     .read_text(encoding="utf-8")),
        autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
    )


def kernel_source() -> str:
    # Tests of the chain's logic render a stub kernel with the same file contract (tests/stub_kernel.py):
    # launcher behaviour does not need real training, and the stub runs in a fraction of a second.
    stub = os.environ.get("KAGGLE_RUNNER_TEST_KERNEL_SOURCE")
    if stub:
        return Path(stub).read_text(encoding="utf-8")
    return resources.files(TEMPLATE_PACKAGE).joinpath("kernel.py").read_text(encoding="utf-8")


CHAIN_CHECKPOINT_KEYS = {"file": str, "sha256": str, "global_step": int, "best_sha256": (str, type(None))}
# Where the checkpoint is attached: exactly one of these, an owner/slug.
CHAIN_CHECKPOINT_SOURCES = ("dataset", "kernel")


def chain_checkpoint_value(chain_checkpoint: dict[str, Any] | None) -> dict[str, Any] | None:
    """The chain's checkpoint as the kernel's CONFIG["chain_checkpoint"]: the only checkpoint it will resume from.

    {"file": ..., "sha256": hex, "global_step": 40, "best_sha256": hex or None, and one of
    "dataset": "owner/slug-ckpt" (the checkpoint dataset; file is a plain name there) or
    "kernel": "owner/slug" (that kernel's newest outputs, attached as a kernel source; file is its relative
    path there, e.g. "checkpoints/checkpoint_epoch1_step40.pt")}; checked here so a bad value fails at render
    time, not on Kaggle.
    """
    if chain_checkpoint is None:
        return None
    value = {"best_sha256": None, **chain_checkpoint}
    sources = [key for key in CHAIN_CHECKPOINT_SOURCES if key in value]
    if len(sources) != 1 or set(value) != set(CHAIN_CHECKPOINT_KEYS) | set(sources):
        raise RenderError(f"chain_checkpoint needs exactly the keys {sorted(CHAIN_CHECKPOINT_KEYS)} and one of "
                          f"{list(CHAIN_CHECKPOINT_SOURCES)}, got {sorted(value)}")
    for key, kind in {**CHAIN_CHECKPOINT_KEYS, sources[0]: str}.items():
        if not isinstance(value[key], kind) or isinstance(value[key], bool):
            raise RenderError(f"chain_checkpoint[{key!r}] has the wrong type: {value[key]!r}")
    name = value["file"]
    parts = PurePosixPath(name).parts
    plain = bool(name) and "/" not in name
    relative = bool(parts) and not PurePosixPath(name).is_absolute() and all(p not in ("", ".", "..") for p in parts)
    if "\\" in name or not (plain if sources[0] == "dataset" else relative) or name in (".", ".."):
        raise RenderError(f"chain_checkpoint file {name!r} must be a plain file name" +
                          (" (or, from a kernel's outputs, a relative path)" if sources[0] == "kernel" else ""))
    for key in ("sha256", "best_sha256"):
        if value[key] is not None and not re.fullmatch(r"[0-9a-f]{64}", value[key]):
            raise RenderError(f"chain_checkpoint[{key!r}] is not a sha256 hex digest: {value[key]!r}")
    owner, _, slug = value[sources[0]].partition("/")
    if not owner or not slug or "/" in slug:
        raise RenderError(f"chain_checkpoint {sources[0]} {value[sources[0]]!r} is not owner/slug")
    return value


def job_source() -> str:
    return resources.files(TEMPLATE_PACKAGE).joinpath("job.py").read_text(encoding="utf-8")


def render_job_script(config: RunConfig, files: dict[str, bytes], chain_checkpoint: dict[str, Any] | None = None,
                      segment: int = 1) -> str:
    """The job kernel: its CONFIG, the shipped files as a JSON block of base64 text (so any byte survives), and
    the job kernel's code; both blocks are read back from the result to prove they are data."""
    from kaggle_runner.job_files import encoded

    values = {**config.job_config(), "segment": segment, "chain_checkpoint": chain_checkpoint_value(chain_checkpoint)}
    shipped = encoded(files)
    script = _environment().get_template("job.py.j2").render(
        config_json=json.dumps(values, indent=2, ensure_ascii=True), files_json=json.dumps(shipped, indent=0),
        job_source=job_source().rstrip() + "\n", kaggle_runner_version=__version__)
    if _config_block_value(script) != values or _config_block_value(script, "FILES") != shipped:
        raise RenderError("the rendered CONFIG or FILES block does not round-trip")
    return script


def render_script(config: RunConfig, chain_checkpoint: dict[str, Any] | None = None) -> str:
    values = {**config.kernel_config(), "chain_checkpoint": chain_checkpoint_value(chain_checkpoint)}
    config_json = json.dumps(values, indent=2, ensure_ascii=True)
    script = _environment().get_template("train.py.j2").render(
        config_json=config_json, kernel_source=kernel_source().rstrip() + "\n",
        kaggle_runner_version=__version__,
    )
    if _config_block_value(script) != values:
        raise RenderError("the rendered CONFIG block does not round-trip to the configuration")
    return script


def _config_block_value(script: str, name: str = "CONFIG") -> Any:
    """Read a block (CONFIG) back from the rendered code, the way Python will, to prove it is pure data."""
    try:
        tree = ast.parse(script)
    except SyntaxError as exc:
        raise RenderError(f"the rendered kernel is not valid Python: {exc}") from None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]
                and isinstance(node.value, ast.Call) and len(node.value.args) == 1
                and isinstance(node.value.args[0], ast.Constant)):
            return json.loads(node.value.args[0].value)
    raise RenderError(f"the rendered kernel has no {name} = json.loads(...) block")


def _is_rule(line: str) -> bool:
    text = line.rstrip()
    return text.startswith("# ") and len(text) > 40 and set(text[2:]) <= set(SECTION_RULE_CHARS) \
        and len(set(text[2:])) == 1


def script_to_notebook(script: str) -> dict[str, Any]:
    """The same code as cells, one per section; the last cell runs main() without sys.exit."""
    body = script.replace('if __name__ == "__main__":\n    sys.exit(main(CONFIG))\n',
                          "exit_code = main(CONFIG)\nif exit_code:\n    raise SystemExit(exit_code)\n")
    lines = body.splitlines(keepends=True)
    cells, current = [], []
    for index, line in enumerate(lines):
        # A section header is rule / title / rule; each one starts a cell.
        if _is_rule(line) and index + 2 < len(lines) and not _is_rule(lines[index + 1]) \
                and _is_rule(lines[index + 2]) and any(c.strip() for c in current):
            cells.append(current)
            current = []
        current.append(line)
    cells.append(current)
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                   "source": "".join(c).strip("\n") + "\n"} for c in cells if "".join(c).strip()],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


def kernel_metadata(config: RunConfig, username: str, code_file: str, dataset_sources: list[str] | None = None,
                    kernel_sources: list[str] | None = None, alternate: bool = False) -> dict[str, Any]:
    """kernel-metadata.json; `alternate`: the outputs route's second kernel (<slug>-b), which takes turns with
    the first."""
    return {
        "id": f"{username}/{config.alternate_slug if alternate else config.slug}",
        "title": config.alternate_title if alternate else config.title,
        "code_file": code_file,
        "language": "python",
        "kernel_type": config.kernel_type,
        "is_private": config.is_private,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": config.enable_internet,
        "machine_shape": config.machine_shape,
        "docker_image_pinning_type": config.docker_image_pinning_type,
        "dataset_sources": list(dataset_sources or []),
        "competition_sources": [],
        "kernel_sources": list(kernel_sources or []),
        "model_sources": [],
        "keywords": [],
    }


def render_kernel(config: RunConfig, out_dir: str | Path, username: str,
                  extra_dataset_sources: list[str] | None = None,
                  chain_checkpoint: dict[str, Any] | None = None, kernel_sources: list[str] | None = None,
                  alternate: bool = False, job_files: dict[str, bytes] | None = None,
                  segment: int = 1) -> RenderedKernel:
    """The kernel folder; the config's dataset_sources are attached, plus any extra (the chain's datasets), and
    `kernel_sources` (kernels whose newest outputs the version reads: the outputs route).

    chain_checkpoint names the one checkpoint the kernel may resume from (see chain_checkpoint_value). A [job]
    renders the job kernel instead, carrying `job_files` (job_files.collect) for segment `segment`.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if config.is_job:
        if job_files is None:
            raise RenderError("a [job] kernel needs its files (job_files.collect)")
        script = render_job_script(config, job_files, chain_checkpoint, segment)
    else:
        script = render_script(config, chain_checkpoint)
    if config.kernel_type == "notebook":
        code_file = folder / NOTEBOOK_NAME
        code_file.write_text(json.dumps(script_to_notebook(script), indent=1) + "\n", encoding="utf-8")
    else:
        code_file = folder / SCRIPT_NAME
        code_file.write_text(script, encoding="utf-8")
    sources = list(dict.fromkeys([*config.dataset_sources, *(extra_dataset_sources or [])]))
    metadata = kernel_metadata(config, username, code_file.name, sources, kernel_sources, alternate)
    metadata_file = folder / METADATA_NAME
    metadata_file.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return RenderedKernel(folder, code_file, metadata_file, metadata)
