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
from kaggle_runner.launcher import run_status
from kaggle_runner.render import render_kernel
from tests.chain_helpers import sets
from tests.emulator_helpers import KEY, USER, admin
from tests.kernel_helpers import run_kernel

# The tiny model in segments of 20 steps: every segment ends by its step count, never by the clock.
CHAIN = ["max_steps=40", "segment_steps=20", "eval_steps=10", "save_steps=10", "log_steps=10", "sample_tokens=5",
         "session_timeout_seconds=600", "safety_margin_seconds=30", "segment_grace_seconds=60",
         "max_segments=6", "min_quota_hours=0", "dataset_settle_seconds=3"]


@pytest.fixture
def project(tmp_path, monkeypatch, emulator, cli_runner):
    """A project folder with a tiny config and credentials for the emulator in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    monkeypatch.setenv("KAGGLE_RUNNER_API_ENDPOINT", emulator.url)
    assert cli_runner.invoke(cli, ["init", "--preset", "tiny"]).exit_code == 0
    return tmp_path


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
    """No settle time: the first resume is pushed inside the emulator's pin window, its kernel does not find the
    checkpoint it was told to resume from, and the chain pushes it again; meanwhile calls fail and a download
    drops."""
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
                                                "GetDatasetStatus": [500]}, "drop_downloads": 1})
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


@pytest.mark.slow
def test_local_launch_is_the_readme_demo(tmp_path, monkeypatch, cli_runner):
    monkeypatch.chdir(tmp_path)
    cli_runner.invoke(cli, ["init", "--preset", "tiny"])
    try:
        result = cli_runner.invoke(cli, ["launch", "--local", "--name", "local-demo", "--set", "max_steps=50"])
        assert result.exit_code == 0, result.output
        assert "on the local emulator" in result.output and "Resuming" in result.output
        status = run_status(".kaggle-runner", "local-demo")
        assert status["state"] == "complete" and len(status["segments"]) >= 2
        assert (tmp_path / "outputs/local-demo/final_model/config.json").exists()
        key = json.loads(Path(".kaggle-runner/emulator/local-credentials.json").read_text())["key"]
        assert os.stat(".kaggle-runner/emulator/local-credentials.json").st_mode & 0o077 == 0
        assert "GPU quota" in cli_runner.invoke(cli, ["quota", "--local"]).output
        for path in Path("outputs").rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes()
    finally:
        stopped = cli_runner.invoke(cli, ["emulator", "stop"])
    assert "Stopped the local emulator" in stopped.output


def test_not_enough_quota_refuses_before_pushing(project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "greedy", *sets([*CHAIN, "min_quota_hours=31"])])
    assert result.exit_code == 1 and "quota" in result.output
    assert not emulator.backend.kernels
    assert run_status(".kaggle-runner") == []
    assert "30.00 h" in cli_runner.invoke(cli, ["quota"]).output


@pytest.mark.parametrize("override", ["n_head=7", "batch_size=0", "max_checkpoints=0", 'slug="Bad Slug"',
                                      'machine_shape="TPU9000"', "no_such_key=1", 'title="Other Title"',
                                      "learning_rate=inf", "seed=-1"])
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


def _write_corpus(folder: Path, files: int = 30) -> None:
    """Text of made-up sentences, deterministic: enough for a few training windows of the tiny model."""
    import random

    words = ["the", "river", "model", "train", "token", "checkpoint", "kaggle", "session", "resume", "window",
             "gradient", "batch", "loss", "night", "morning", "quiet", "runner", "laptop", "data", "text"]
    rng = random.Random(7)
    (folder / "notes").mkdir(parents=True)
    for index in range(files):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(60)]
        where = folder / ("notes" if index % 3 == 0 else ".") / f"part-{index:02d}.txt"
        where.write_text("\n".join(sentences) + "\n")


@pytest.mark.slow
def test_a_local_folder_of_text_goes_up_once_and_the_kernel_trains_on_it(project, cli_runner, emulator,
                                                                         monkeypatch):
    _write_corpus(project / "corpus")
    own_text = ["data_dir=\"corpus\"", "tokenizer=\"bpe\"", "bpe_vocab_size=512", "max_steps=2", "segment_steps=2",
                "eval_steps=2", "sample_tokens=0"]
    result = cli_runner.invoke(cli, ["launch", "--name", "mine", *sets([*CHAIN, *own_text])])
    assert result.exit_code == 0, result.output
    assert "Uploading 30 text file(s)" in result.output
    dataset = emulator.backend.get_dataset(USER, "kaggle-runner-tiny-corpus")
    assert len(dataset.versions) == 1 and "notes__part-00.txt" in dataset.versions[0].files  # sub-paths folded
    version = emulator.backend.get_kernel(USER, "kaggle-runner-tiny").versions[0]
    log = "".join(e["data"] for e in emulator.backend.read_log_events(USER, "kaggle-runner-tiny", version))
    assert "Data: 30 text file(s)" in log
    # Unchanged text is not uploaded again; changed text is a new version. (The stub kernel: data is not the point.)
    monkeypatch.setenv("KAGGLE_RUNNER_TEST_KERNEL_SOURCE", str(Path(__file__).with_name("stub_kernel.py")))
    again = cli_runner.invoke(cli, ["launch", "--name", "again", *sets([*CHAIN, *own_text])])
    assert again.exit_code == 0 and "is up to date" in again.output, again.output
    assert len(emulator.backend.get_dataset(USER, "kaggle-runner-tiny-corpus").versions) == 1
    (project / "corpus/part-01.txt").write_text("Something new entirely.\n" * 50)
    changed = cli_runner.invoke(cli, ["launch", "--name", "changed", *sets([*CHAIN, *own_text])])
    assert changed.exit_code == 0 and "Uploading 30 text file(s)" in changed.output, changed.output
    assert len(emulator.backend.get_dataset(USER, "kaggle-runner-tiny-corpus").versions) == 2
