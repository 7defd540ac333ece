"""The real kernel through the outputs route, end to end: each segment reads the last one's outputs on Kaggle
(here, the emulator), and the chained model is bitwise the uninterrupted one, with no checkpoint through the
launcher's machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kaggle_runner.cli import cli
from kaggle_runner.config import load_preset
from kaggle_runner.render import render_kernel
from kaggle_runner.run_views import run_status
from tests.chain_helpers import REAL_CHAIN, sets
from tests.emulator_helpers import USER
from tests.kernel_helpers import run_kernel

pytestmark = pytest.mark.slow


def _weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoints/checkpoint_epoch1_step40.pt", weights_only=True)["model"]


def test_a_real_chain_through_outputs_is_bitwise_the_uninterrupted_run(project, emulator, cli_runner, tmp_path):
    straight = run_kernel(render_kernel(load_preset("tiny", [*REAL_CHAIN, "segment_steps=1000"]),
                                        tmp_path / "straight-kernel", USER).code_file, tmp_path / "straight")
    assert straight.returncode == 0, straight.stdout[-2000:]
    result = cli_runner.invoke(cli, ["launch", "--name", "via-outputs", *sets([*REAL_CHAIN, "resume_via=outputs"])])
    assert result.exit_code == 0, result.output
    status = run_status(".kaggle-runner", "via-outputs")
    assert [s["kernel"] for s in status["segments"]] == [f"{USER}/kaggle-runner-tiny", f"{USER}/kaggle-runner-tiny-b"]
    assert all(s["bytes_uploaded"] == 0 for s in status["segments"]) and not emulator.backend.datasets
    came_down = {p.name for p in Path(".kaggle-runner/runs/via-outputs").rglob("*") if p.is_file()}
    assert not {name for name in came_down if name.endswith(".pt") or name.endswith(".npy")}, came_down
    log = "".join(e["data"] for e in emulator.backend.read_log_events(
        USER, "kaggle-runner-tiny-b", emulator.backend.get_kernel(USER, "kaggle-runner-tiny-b").versions[-1]))
    assert "Data: reusing tokens" in log  # the first segment's token arrays, read from its outputs
    chained = _weights(Path("outputs/via-outputs"))
    for name, tensor in _weights(straight.working).items():
        assert torch.equal(tensor, chained[name]), name
