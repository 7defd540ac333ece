"""--local, the README's first command, and your own text through it: the background emulator, real kernels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.run_views import run_status
from tests.chain_helpers import REAL_CHAIN as CHAIN
from tests.chain_helpers import sets
from tests.emulator_helpers import USER


@pytest.mark.slow
def test_local_launch_is_the_readme_demo(tmp_path, monkeypatch, cli_runner):
    monkeypatch.chdir(tmp_path)
    cli_runner.invoke(cli, ["init", "--preset", "tiny"])
    try:
        result = cli_runner.invoke(cli, ["launch", "--local", "--name", "local-demo",
                                         *sets(["max_steps=50", "n_embd=64", "n_layer=2"])])
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
        kernels = Path(".kaggle-runner/emulator/data/kernels/local")
        assert (kernels / "kaggle-runner-tiny").is_dir()
        assert not list(kernels.glob("*/v*/input"))  # a session's inputs end with it
        cleaned = cli_runner.invoke(cli, ["clean", "local-demo"])
        assert cleaned.exit_code == 0 and "deleted the emulator's kernel local/kaggle-runner-tiny" in cleaned.output
        assert not (kernels / "kaggle-runner-tiny").exists() and Path("outputs/local-demo/final_model").is_dir()
    finally:
        stopped = cli_runner.invoke(cli, ["emulator", "stop"])
    assert "Stopped the local emulator" in stopped.output


@pytest.mark.slow
def test_the_finetune_preset_under_local_is_told_the_emulator_has_no_internet(tmp_path, monkeypatch, cli_runner):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # nothing of the hub's on this machine
    cli_runner.invoke(cli, ["init", "--preset", "finetune"])
    try:
        result = cli_runner.invoke(cli, ["launch", "--local", "--name", "tuned", *sets(["max_steps=2"])])
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert ("warning: the local emulator gives kernels no internet, and init_from 'HuggingFaceTB/SmolLM2-135M' "
                "is a Hugging Face hub id") in result.output
        assert "dataset 'wikitext-2' comes from the hub" in result.output
        # the kernel says the same, once: no retries of what cannot succeed, no advice to turn on what is on
        assert "This session has no internet (the local Kaggle emulator gives its kernels no internet)" \
            in result.output
        assert "Turn internet on" not in result.output
        logs = cli_runner.invoke(cli, ["logs", "tuned"]).output
        assert "could not download wikitext-2" in logs and "retry 1/" not in logs, logs
    finally:
        cli_runner.invoke(cli, ["emulator", "stop"])


def test_what_the_hub_cache_already_holds_is_no_warning(tmp_path, monkeypatch):
    from kaggle_runner.config import load_preset
    from kaggle_runner.local import hub_downloads_offline

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    finetune = load_preset("finetune")
    assert len(hub_downloads_offline(finetune, tmp_path)) == 2  # the model and WikiText-2
    (tmp_path / "hub/models--HuggingFaceTB--SmolLM2-135M").mkdir(parents=True)
    (tmp_path / "hub/datasets--Salesforce--wikitext").mkdir(parents=True)
    assert hub_downloads_offline(finetune, tmp_path) == []
    assert hub_downloads_offline(load_preset("tiny"), tmp_path) == []  # the README's demo needs nothing


@pytest.mark.slow  # a real emulator process and a kernel, and seconds of idling on purpose
def test_the_emulator_exits_when_idle_but_never_while_a_version_runs(tmp_path, monkeypatch):
    import subprocess
    import sys

    from tests.emulator_helpers import KEY, eventually, official_client, wait_for, write_kernel

    ready = tmp_path / "ready.json"
    server = subprocess.Popen([sys.executable, "-m", "kaggle_runner.cli", "emulator", "serve", "--port", "0",
                               "--data-dir", str(tmp_path / "data"), "--username", USER, "--key", KEY,
                               "--idle-exit", "1", "--ready-file", str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = eventually(lambda: ready.exists() and json.loads(ready.read_text())["url"], what="the emulator")
        api = official_client(url, monkeypatch)
        go = tmp_path / "go"
        code = f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists():\n    time.sleep(0.1)\n"
        api.kernels_push(str(write_kernel(tmp_path / "k", code, enable_gpu=False)))
        with pytest.raises(subprocess.TimeoutExpired):
            server.wait(timeout=4)  # no requests for 4 s, but a version runs: it stays
        go.touch()
        assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"
        out, _ = server.communicate(timeout=30)  # then, a second without requests, it goes
        assert server.returncode == 0 and "idle for 1 s with nothing running; exiting" in out, out
    finally:
        server.kill()


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


def _segment_log(emulator, index: int) -> str:
    version = emulator.backend.get_kernel(USER, "kaggle-runner-tiny").versions[index]
    return "".join(e["data"] for e in emulator.backend.read_log_events(USER, "kaggle-runner-tiny", version))


@pytest.mark.slow
def test_a_local_folder_of_text_goes_up_once_and_the_kernel_trains_on_it(project, cli_runner, emulator,
                                                                         monkeypatch):
    """Two chains of two segments, the second on changed text: each uploads its corpus version and its own
    token arrays (the first chain's are of another corpus), and each second segment reuses its chain's."""
    _write_corpus(project / "corpus", files=51)  # past Kaggle's 50 top-level files: one zip, extracted on mount
    own_text = ["data_dir=\"corpus\"", "tokenizer=\"bpe\"", "bpe_vocab_size=512", "max_steps=4", "segment_steps=2",
                "eval_steps=2", "sample_tokens=0"]
    result = cli_runner.invoke(cli, ["launch", "--name", "mine", *sets([*CHAIN, *own_text])])
    assert result.exit_code == 0, result.output
    assert "Uploading 51 text file(s)" in result.output
    dataset = emulator.backend.get_dataset(USER, "kaggle-runner-tiny-corpus")
    assert len(dataset.versions) == 1 and "corpus.zip" in dataset.versions[0].files
    assert "Data: 51 text file(s)" in _segment_log(emulator, 0)
    assert "Data: reusing tokens" in _segment_log(emulator, 1)
    (project / "corpus/part-01.txt").write_text("Something new entirely.\n" * 50)
    changed = cli_runner.invoke(cli, ["launch", "--name", "changed", *sets([*CHAIN, *own_text])])
    assert changed.exit_code == 0 and "Uploading 51 text file(s)" in changed.output, changed.output
    assert "as a new version (it holds other arrays)" in changed.output
    assert len(emulator.backend.get_dataset(USER, "kaggle-runner-tiny-corpus").versions) == 2
    assert len(emulator.backend.get_dataset(USER, "kaggle-runner-tiny-data").versions) == 2
    assert "Data: reusing tokens" not in _segment_log(emulator, 2)
    assert "Data: reusing tokens" in _segment_log(emulator, 3)
    # Unchanged text is not uploaded again. (The stub kernel: data is not the point.)
    monkeypatch.setenv("KAGGLE_RUNNER_TEST_KERNEL_SOURCE", str(Path(__file__).with_name("stub_kernel.py")))
    again = cli_runner.invoke(cli, ["launch", "--name", "again", *sets([*CHAIN, *own_text])])
    assert again.exit_code == 0 and "is up to date" in again.output, again.output
    assert len(emulator.backend.get_dataset(USER, "kaggle-runner-tiny-corpus").versions) == 2
