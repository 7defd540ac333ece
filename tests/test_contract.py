"""The kernel <-> launcher contract: the kernel declares its files, events and stop reasons; the launcher, the
stub kernel and chain.py use those declarations, and nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

from kaggle_runner import artifacts, chain, contract
from kaggle_runner.render import kernel_source

KERNEL = ast.parse(kernel_source())


def _first_literals(function: str) -> set[str]:
    """The string literal first arguments of every call to `function` in the kernel."""
    found = set()
    for node in ast.walk(KERNEL):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == function and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.add(node.args[0].value)
    return found


def test_chain_classifies_every_stop_reason_the_kernel_declares():
    assert set(contract.STOP_REASONS) == chain.CLASSIFIED, (
        f"declared but not classified: {set(contract.STOP_REASONS) - chain.CLASSIFIED}; "
        f"classified but never declared: {chain.CLASSIFIED - set(contract.STOP_REASONS)}")


def test_the_kernel_stops_and_reports_only_with_declared_names():
    stops = _first_literals("KernelStop")
    assert stops and stops <= set(contract.STOP_REASONS), stops - set(contract.STOP_REASONS)
    events = _first_literals("emit")
    assert events == set(contract.EVENTS), events ^ set(contract.EVENTS)
    # main's own reasons (the ones no KernelStop carries) are declared too
    assigned = {node.value.elts[0].value for node in ast.walk(KERNEL)
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple) and node.value.elts
                and isinstance(node.value.elts[0], ast.Constant) and isinstance(node.value.elts[0].value, str)
                and isinstance(node.targets[0], ast.Tuple)
                and getattr(node.targets[0].elts[0], "id", None) == "reason"}
    returned = {node.value.value for function in ast.walk(KERNEL) if isinstance(function, ast.FunctionDef)
                and function.name == "train" for node in ast.walk(function)
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant)}
    early = next(ast.literal_eval(node.value) for node in KERNEL.body if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", None) == "EARLY_STOPS")
    assert "error" in assigned and returned == {"complete"}
    assert assigned | returned | {e for e in early if e} <= set(contract.STOP_REASONS)
    kinds = {kw.value.value for node in ast.walk(KERNEL) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "record_in_manifest" for kw in node.keywords
             if kw.arg == "kind" and isinstance(kw.value, ast.Constant)}
    assert kinds <= set(contract.FILE_KINDS) and "checkpoint" in kinds


def test_the_stub_kernel_and_the_launcher_read_the_kernels_declarations():
    stub = ast.parse(Path(__file__).with_name("stub_kernel.py").read_text())
    imported = {alias.name for node in ast.walk(stub) if isinstance(node, ast.ImportFrom)
                and node.module == "kaggle_runner.contract" for alias in node.names}
    assert {"MANIFEST", "RUN_STATE", "STOP_REASONS", "CHECKPOINT_DIR"} <= imported
    assert artifacts.MANIFEST == contract.MANIFEST == "manifest.json"
    assert artifacts.RUN_STATE == contract.RUN_STATE and artifacts.BEST_MODEL == contract.BEST_MODEL
    assert contract.SMALL_FILES == (contract.MANIFEST, contract.RUN_STATE, contract.HISTORY)
