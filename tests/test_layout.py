"""The code's layout, as a newcomer relies on it: small modules, one name per class, commands that use the
controller through its public functions only."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "kaggle_runner"
LONGEST = 520  # lines: "about 500", the kernel excepted (one file a person reads top to bottom)


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "kernel_template" not in p.parts)


def test_no_two_classes_in_the_package_share_a_name():
    places = defaultdict(list)
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                places[node.name].append(str(path.relative_to(PACKAGE)))
    assert not {name: where for name, where in places.items() if len(where) > 1}


def test_no_module_is_longer_than_about_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > LONGEST}
    assert not long, f"split these into modules whose names say what they hold: {long}"


def test_the_commands_use_the_controller_only_through_its_public_names():
    from kaggle_runner import controller

    for name in ("launcher.py", "cli.py", "doctor.py", "report.py", "generate.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kaggle_runner.controller"):
                assert node.module == "kaggle_runner.controller", f"{name} reaches into {node.module}"
                assert {a.name for a in node.names} <= set(controller.__all__), f"{name}: {node.names}"
