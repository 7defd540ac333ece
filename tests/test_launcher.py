"""The launcher with the real kernel, end to end: the CLI, the official client, the emulator's unkind
defaults, real training. The chain's logic is tested faster with the stub kernel in test_chain_logic.py."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kaggle_runner.cli import cli
from kaggle_runner.config import load_preset
from kaggle_runner.emulator.server import EmulatorServer
from kaggle_runner.render import render_kernel
from kaggle_runner.run_views import run_status
from tests.chain_helpers import REAL_CHAIN as CHAIN
from tests.chain_helpers import sets
from tests.emulator_helpers import KEY, USER, admin
from tests.kernel_helpers import run_kernel


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The same training without interruption, to compare a chain's result against."""
    tmp = tmp_path_factory.mktemp("straight")
    config = load_preset("tiny", [*CHAIN, "segment_steps=1000"])
    run = run_kernel(render_kernel(config, tmp / "kernel", USER).code_file, tmp / "working")
    assert run.returncode == 0, run.stdout[-2000:]
    return run.working


def final_weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoints/checkpoint_epoch1_step40.pt", weights_only=True)["model"]


@dataclass
class Chained:
    """One chain through faults and a pinned resume, run once for the tests of its properties below."""

    folder: Path
    output: str
    exit_code: int
    status: dict
    emulator: EmulatorServer


@pytest.fixture(scope="module")
def faulty_chain(tmp_path_factory):
    """The first resume is pushed as if inside the emulator's pin window (the stale_mounts fault): its kernel does
    not find the checkpoint it was told to resume from, and the chain pushes it again; meanwhile calls fail and a
    download drops."""
    folder = tmp_path_factory.mktemp("faulty")
    with pytest.MonkeyPatch.context() as patch, EmulatorServer(folder / "emu", username=USER, key=KEY,
                                                               kill_grace_seconds=5) as emulator:
        patch.chdir(folder)
        patch.setenv("HOME", str(folder / "home"))
        for name, value in (("KAGGLE_USERNAME", USER), ("KAGGLE_KEY", KEY),
                            ("KAGGLE_RUNNER_API_ENDPOINT", emulator.url)):
            patch.setenv(name, value)
        runner = CliRunner()
        assert runner.invoke(cli, ["init", "--preset", "tiny"]).exit_code == 0
        admin(emulator.url, "faults", {"fail": {"GetKernelSessionStatus": [429, 500],
                                                "ListKernelSessionOutput": [503], "SaveKernel": [503],
                                                "GetDatasetStatus": [500]}, "drop_downloads": 1,
                                       "stale_mounts": 1})
        result = runner.invoke(cli, ["launch", "--name", "demo", *sets([*CHAIN, "dataset_settle_seconds=0"])])
        chained = Chained(folder, result.output, result.exit_code, run_status(".kaggle-runner", "demo"), emulator)
        chained.status["json"] = runner.invoke(cli, ["status", "demo", "--json"]).output
        chained.status["logs"] = runner.invoke(cli, ["logs", "demo"]).output
        yield chained


@pytest.mark.slow
def test_the_chain_completes_through_faults_with_one_line_notes(faulty_chain):
    assert faulty_chain.exit_code == 0, faulty_chain.output
    assert faulty_chain.status["state"] == "complete", faulty_chain.status
    assert "note:" in faulty_chain.output and "Traceback" not in faulty_chain.output


@pytest.mark.slow
def test_a_resume_pushed_inside_the_pin_window_is_pushed_again_with_consecutive_versions(faulty_chain):
    assert "did not find its checkpoint" in faulty_chain.output
    versions = [s["kernel_version"] for s in faulty_chain.status["segments"]]
    assert len(versions) >= 3 and versions == list(range(1, len(versions) + 1))


@pytest.mark.slow
def test_the_chained_model_is_bitwise_the_uninterrupted_one(faulty_chain, straight_run):
    chained_weights = final_weights(faulty_chain.folder / "outputs/demo")
    for name, tensor in final_weights(straight_run).items():
        assert torch.equal(tensor, chained_weights[name]), name
    straight = json.loads((straight_run / "training_history.json").read_text())
    chained = json.loads((faulty_chain.folder / "outputs/demo/training_history.json").read_text())
    evaluations = [(h["step"], h["val_loss"]) for h in straight if h.get("kind", "eval") == "eval"]
    assert [(h["step"], h["val_loss"]) for h in chained if h.get("kind", "eval") == "eval"] == evaluations


@pytest.mark.slow
def test_tokens_go_up_once_and_stay_out_of_the_fetched_outputs(faulty_chain):
    emulator = faulty_chain.emulator
    assert len(emulator.backend.get_dataset(USER, "kaggle-runner-tiny-data").versions) == 1
    last = emulator.backend.get_kernel(USER, "kaggle-runner-tiny").versions[-1]
    assert "Data: reusing tokens" in "".join(e["data"] for e in
                                             emulator.backend.read_log_events(USER, "kaggle-runner-tiny", last))
    assert not (faulty_chain.folder / "outputs/demo/token_cache").exists()


@pytest.mark.slow
def test_the_fetched_model_loads_and_knows_its_context(faulty_chain):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = faulty_chain.folder / "outputs/demo/final_model"
    assert AutoTokenizer.from_pretrained(final).model_max_length == 128
    assert AutoModelForCausalLM.from_pretrained(final).config.n_positions == 128


@pytest.mark.slow
def test_credentials_reach_no_file_written_or_pushed(faulty_chain):
    folder = faulty_chain.folder
    for path in [*(folder / ".kaggle-runner").rglob("*"), *(folder / "outputs").rglob("*"),
                 *(faulty_chain.emulator.backend.data_dir / "kernels").rglob("*")]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_status_json_and_logs_describe_the_run(faulty_chain):
    as_json = json.loads(faulty_chain.status["json"])
    assert {"name", "state", "reason", "segments", "next_action"} <= set(as_json)
    assert all(s["upload_seconds"] is not None for s in as_json["segments"] if s["bytes_uploaded"])
    assert "Training complete" in faulty_chain.status["logs"]


def test_not_enough_quota_refuses_before_pushing(project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "greedy", *sets([*CHAIN, "min_quota_hours=31"])])
    assert result.exit_code == 1 and "quota" in result.output
    assert not emulator.backend.kernels
    assert run_status(".kaggle-runner") == []
    assert "30.00 h" in cli_runner.invoke(cli, ["quota"]).output


@pytest.mark.parametrize("override", ["n_head=7", "batch_size=0", "max_checkpoints=0", 'slug="Bad Slug"',
                                      'machine_shape="TPU9000"', "no_such_key=1", 'title="Other Title"',
                                      "learning_rate=inf", "seed=-1", "output_budget_gb=0.0001"])
def test_bad_config_sends_nothing_and_records_nothing(project, cli_runner, emulator, override):
    result = cli_runner.invoke(cli, ["launch", "--set", override])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert emulator.app.request_count == 0
    assert not Path(".kaggle-runner/runs.sqlite").exists() or run_status(".kaggle-runner") == []


def test_broken_toml_is_refused_with_its_line(project, cli_runner, emulator):
    Path("kaggle-runner.toml").write_text(Path("kaggle-runner.toml").read_text() + "\nbroken = = 1\n")
    result = cli_runner.invoke(cli, ["launch"])
    assert result.exit_code == 1 and "line" in result.output and emulator.app.request_count == 0


def test_credentials_missing_or_world_readable_are_explained(tmp_path, monkeypatch, cli_runner):
    monkeypatch.chdir(tmp_path)
    cli_runner.invoke(cli, ["init", "--preset", "tiny"])
    result = cli_runner.invoke(cli, ["launch"])
    assert result.exit_code == 1 and "no Kaggle credentials found" in result.output and "--local" in result.output
    folder = Path.home() / ".kaggle"
    folder.mkdir()
    (folder / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
    os.chmod(folder / "kaggle.json", 0o644)
    result = cli_runner.invoke(cli, ["launch"])
    assert result.exit_code == 1 and "chmod 600" in result.output
    assert KEY not in result.output

