"""The kernel <-> launcher contract, read from the kernels' own source: their file names, events and stop reasons.

Each kernel declares them as literals at its top (kernel_template/kernel.py, and job.py for a [job]: "The
contract with the launcher"); this module parses those files with `ast` and evaluates only those literals, so
the launcher never imports torch and the sides cannot drift apart. The names both kernels declare must agree;
chain.py classifies every stop reason either declares, artifacts.py reads outputs by these names, and the
stub kernel the chain tests push imports them too.
"""

from __future__ import annotations

import ast
from functools import cache
from importlib import resources

NAMES = ("MANIFEST_NAME", "RUN_STATE_NAME", "HISTORY_NAME", "BEST_MODEL_NAME", "CHECKPOINT_DIR", "FINAL_MODEL_DIR",
         "TOKEN_CACHE_DIR", "MANIFEST_FORMAT", "FILE_KINDS", "EVENTS", "STOP_REASONS")


JOB_NAMES = ("MANIFEST_NAME", "RUN_STATE_NAME", "CHECKPOINT_DIR", "MANIFEST_FORMAT", "FILE_KINDS", "EVENTS",
             "STOP_REASONS")


@cache
def declared(kernel: str = "kernel.py", names: tuple[str, ...] = NAMES) -> dict[str, object]:
    """The contract's literals, by name, as a kernel file declares them."""
    source = resources.files("kaggle_runner.kernel_template").joinpath(kernel).read_text(encoding="utf-8")
    found: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in NAMES:
            if node.targets[0].id in found:
                raise RuntimeError(f"{kernel} assigns {node.targets[0].id} twice: the contract's names are unique")
            found[node.targets[0].id] = ast.literal_eval(node.value)
    found = {name: value for name, value in found.items() if name in names}
    missing = sorted(set(names) - set(found))
    if missing:
        raise RuntimeError(f"{kernel} does not declare {', '.join(missing)} (the launcher's contract with it)")
    return found


_CONTRACT = declared()
_JOB = declared("job.py", JOB_NAMES)
for _name in ("MANIFEST_NAME", "RUN_STATE_NAME", "CHECKPOINT_DIR", "MANIFEST_FORMAT"):
    if _JOB[_name] != _CONTRACT[_name]:
        raise RuntimeError(f"job.py declares {_name} = {_JOB[_name]!r}, kernel.py {_CONTRACT[_name]!r}: they must "
                           "agree")
MANIFEST: str = _CONTRACT["MANIFEST_NAME"]  # type: ignore[assignment]
RUN_STATE: str = _CONTRACT["RUN_STATE_NAME"]  # type: ignore[assignment]
HISTORY: str = _CONTRACT["HISTORY_NAME"]  # type: ignore[assignment]
BEST_MODEL: str = _CONTRACT["BEST_MODEL_NAME"]  # type: ignore[assignment]
CHECKPOINT_DIR: str = _CONTRACT["CHECKPOINT_DIR"]  # type: ignore[assignment]
FINAL_MODEL_DIR: str = _CONTRACT["FINAL_MODEL_DIR"]  # type: ignore[assignment]
TOKEN_CACHE_DIR: str = _CONTRACT["TOKEN_CACHE_DIR"]  # type: ignore[assignment]
MANIFEST_FORMAT: int = _CONTRACT["MANIFEST_FORMAT"]  # type: ignore[assignment]
FILE_KINDS: tuple[str, ...] = tuple(dict.fromkeys([*_CONTRACT["FILE_KINDS"], *_JOB["FILE_KINDS"]]))  # type: ignore[misc]
EVENTS: tuple[str, ...] = _CONTRACT["EVENTS"]  # type: ignore[assignment]
# Why a session ended, either kernel's: a job's reasons that kernel.py also declares mean the same there.
STOP_REASONS: dict[str, str] = {**_JOB["STOP_REASONS"], **_CONTRACT["STOP_REASONS"]}  # type: ignore[dict-item]
JOB_STOP_REASONS: dict[str, str] = _JOB["STOP_REASONS"]  # type: ignore[assignment]
# The small files the launcher reads after each session to decide what comes next.
SMALL_FILES = (MANIFEST, RUN_STATE, HISTORY)
