"""The launcher and its resume chain, end to end: the CLI, the real kaggle client, the emulator, real kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kaggle_runner.cli import cli
from kaggle_runner.config import load_preset
from kaggle_runner.emulator.server import EmulatorServer
from kaggle_runner.launcher import run_status
from kaggle_runner.render import render_kernel
from tests.emulator_helpers import KEY, USER, admin, official_client, write_kernel
from tests.kernel_helpers import run_kernel

pytestmark = pytest.mark.slow

# The tiny model with short sessions: each segment trains a few seconds after ~8 s of start-up, so a
# run of 100 steps needs several segments, stopped by the kernel's real time budget.
CHAIN = ["max_steps=100", "eval_steps=20", "save_steps=10", "log_steps=10", "sample_tokens=5",
         "session_timeout_seconds=20", "safety_margin_seconds=6", "segment_grace_seconds=20",
         "max_segments=12", "min_quota_hours=0"]


@pytest.fixture
def emulator(tmp_path):
    with EmulatorServer(tmp_path / "emu", username=USER, key=KEY, kill_grace_seconds=5) as server:
        yield server


@pytest.fixture
def project(tmp_path, monkeypatch, emulator, cli_runner):
    """A project folder with a tiny config and credentials for the emulator in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    monkeypatch.setenv("KAGGLE_RUNNER_API_ENDPOINT", emulator.url)
    assert cli_runner.invoke(cli, ["init", "--preset", "tiny"]).exit_code == 0
    return tmp_path


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The same training without interruption, to compare a chain's result against."""
    tmp = tmp_path_factory.mktemp("straight")
    config = load_preset("tiny", [*CHAIN, "session_timeout_seconds=3600"])
    run = run_kernel(render_kernel(config, tmp / "kernel", USER).code_file, tmp / "working")
    assert run.returncode == 0, run.stdout[-2000:]
    return run.working


def final_weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoints/checkpoint_epoch1_step100.pt", weights_only=False)["model"]


def test_chain_survives_faults_and_ends_with_the_uninterrupted_model(project, emulator, cli_runner, straight_run):
    admin(emulator.url, "faults", {"fail": {"GetKernelSessionStatus": [429, 500], "ListKernelSessionOutput": [503],
                                            "SaveKernel": [503], "GetDatasetStatus": [500]},
                                   "drop_downloads": 1})
    result = cli_runner.invoke(cli, ["launch", "--name", "demo", *sets(CHAIN)])
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "Traceback" not in result.output  # retries shown as one-liners
    status = run_status(".kaggle-runner", "demo")
    assert status["state"] == "complete", status
    versions = [s["kernel_version"] for s in status["segments"]]
    assert len(versions) >= 3 and versions == list(range(1, len(versions) + 1))
    chained_weights = final_weights(project / "outputs/demo")
    for name, tensor in final_weights(straight_run).items():
        assert torch.equal(tensor, chained_weights[name]), name
    straight = json.loads((straight_run / "training_history.json").read_text())
    chained = json.loads((project / "outputs/demo/training_history.json").read_text())
    assert [(h["step"], h["val_loss"]) for h in chained] == [(h["step"], h["val_loss"]) for h in straight]
    # Each resume moved one checkpoint plus best_model.pt, not every rotated checkpoint.
    for segment in status["segments"][:-1]:
        checkpoint = Path("outputs/demo") / "checkpoints"
        assert 0 < segment["bytes_uploaded"] < 3 * max(p.stat().st_size for p in checkpoint.iterdir())
    # Tokenized once: the token arrays went up once, and every later segment reused them.
    assert len(emulator.backend.get_dataset(USER, "kaggle-runner-tiny-data").versions) == 1
    for version in emulator.backend.get_kernel(USER, "kaggle-runner-tiny").versions[1:]:
        log = "".join(e["data"] for e in emulator.backend.read_log_events(USER, "kaggle-runner-tiny", version))
        assert "Data: reusing tokens" in log
    assert not Path("outputs/demo/token_cache").exists()  # fetch leaves the chain's cache out
    # Credentials reach no file the launcher wrote, nor anything pushed.
    for path in [*Path(".kaggle-runner").rglob("*"), *Path("outputs").rglob("*"),
                 *(emulator.backend.data_dir / "kernels").rglob("*")]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path

    as_json = json.loads(cli_runner.invoke(cli, ["status", "demo", "--json"]).output)
    assert {"name", "state", "reason", "segments"} <= set(as_json)
    assert {"index", "kernel_version", "kaggle_status", "global_step"} <= set(as_json["segments"][0])
    listing = json.loads(cli_runner.invoke(cli, ["status", "--json"]).output)
    assert [r["name"] for r in listing] == ["demo"]
    assert "Training complete" in cli_runner.invoke(cli, ["logs", "demo"]).output


def test_fetch_verifies_skips_and_repairs(project, emulator, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "short", *sets([*CHAIN, "max_steps=10",
                                                                          "session_timeout_seconds=300"])])
    assert result.exit_code == 0, result.output
    target = project / "fetched"
    assert cli_runner.invoke(cli, ["fetch", "short", "-o", str(target)]).exit_code == 0
    manifest = json.loads((target / "manifest.json").read_text())
    best = target / "best_model.pt"
    stamp = best.stat().st_mtime_ns
    assert cli_runner.invoke(cli, ["fetch", "short", "-o", str(target)]).exit_code == 0
    assert best.stat().st_mtime_ns == stamp  # verified and skipped, not downloaded again
    best.write_bytes(best.read_bytes()[: manifest["files"]["best_model.pt"]["size"] // 3])  # a partial file
    assert cli_runner.invoke(cli, ["fetch", "short", "-o", str(target)]).exit_code == 0
    from kaggle_runner.artifacts import verified

    outputs = {rel: info for rel, info in manifest["files"].items() if info["kind"] != "token_cache"}
    assert outputs and all(verified(target, rel, info) for rel, info in outputs.items())
    assert not (target / "token_cache").exists()  # the chain's cache, not a training output
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["best_model.pt", "checkpoints", "final_model", "manifest.json", "run_state.json",
         "training_history.json", "kaggle-runner-tiny.log"])


def _launcher(*args, env):
    return subprocess.run([sys.executable, "-m", "kaggle_runner.cli", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_launcher_killed_at_every_transition_resumes_without_duplicates(project, emulator, straight_run):
    points = ["after_push", "after_end", "mid_download", "before_upload", "after_upload"]
    env = {**os.environ, "KAGGLE_RUNNER_TEST_KILL_AT": ",".join(points)}
    result = _launcher("launch", "--name", "killed", *sets(CHAIN), env=env)
    kills = 0
    while result.returncode == -9:
        kills += 1
        assert kills <= len(points), result.stdout + result.stderr
        result = _launcher("watch", "killed", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert kills == len(points)
    assert sorted(Path(".kaggle-runner/kill-points-fired").read_text().split()) == sorted(points)
    status = run_status(".kaggle-runner", "killed")
    assert status["state"] == "complete"
    versions = [s["kernel_version"] for s in status["segments"]]
    kernel = emulator.backend.get_kernel(USER, "kaggle-runner-tiny")
    assert versions == list(range(1, len(kernel.versions) + 1))  # no version pushed twice
    dataset = emulator.backend.get_dataset(USER, "kaggle-runner-tiny-ckpt")
    assert len(dataset.versions) == len(versions) - 1  # no checkpoint uploaded twice
    killed_weights = final_weights(project / "outputs/killed")
    for name, tensor in final_weights(straight_run).items():
        assert torch.equal(tensor, killed_weights[name]), name


def test_no_progress_stops_the_chain(project, cli_runner):
    # The kernel's own budget (1 s) ends before training starts: every segment saves step 0 and stops.
    result = cli_runner.invoke(cli, ["launch", "--name", "stalled", *sets(
        [*CHAIN, "session_timeout_seconds=60", "safety_margin_seconds=59", "max_stalled_segments=2"])])
    assert result.exit_code == 0, result.output
    status = run_status(".kaggle-runner", "stalled")
    assert status["state"] == "stopped" and "without progress" in status["reason"]
    assert len(status["segments"]) == 3


def test_max_segments_then_resume_by_hand(project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "capped", *sets([*CHAIN, "max_segments=1"])])
    assert result.exit_code == 0, result.output
    status = run_status(".kaggle-runner", "capped")
    assert status["state"] == "stopped" and "max_segments" in status["reason"]
    assert len(status["segments"]) == 1
    resumed = cli_runner.invoke(cli, ["resume", "capped", "--max-segments", "2"])
    assert resumed.exit_code == 0, resumed.output
    status = run_status(".kaggle-runner", "capped")
    assert len(status["segments"]) == 2 and status["segments"][1]["global_step"] > status["segments"][0]["global_step"]


def test_failure_before_the_first_step_is_not_relaunched(project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "broken", *sets(
        [*CHAIN, 'dataset="text-files"', 'text_files_path="missing/*.txt"'])])
    assert result.exit_code == 0, result.output
    status = run_status(".kaggle-runner", "broken")
    assert status["state"] == "failed" and "could not load its data" in status["reason"]
    assert len(emulator.backend.get_kernel(USER, "kaggle-runner-tiny").versions) == 1


def test_not_enough_quota_refuses_before_pushing(project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "greedy", *sets([*CHAIN, "min_quota_hours=31"])])
    assert result.exit_code == 1 and "quota" in result.output
    assert not emulator.backend.kernels
    assert "30.00 h" in cli_runner.invoke(cli, ["quota"]).output


def test_cancel_stops_the_version_and_the_chain(project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "long", "--detach", *sets(
        [*CHAIN, "max_steps=100000", "session_timeout_seconds=600"])])
    assert result.exit_code == 0, result.output
    time.sleep(2)
    cancelled = cli_runner.invoke(cli, ["cancel", "long"])
    assert cancelled.exit_code == 0 and "Cancelled run long" in cancelled.output, cancelled.output
    for _ in range(100):
        if emulator.backend.get_kernel(USER, "kaggle-runner-tiny").versions[0].status == "CANCEL_ACKNOWLEDGED":
            break
        time.sleep(0.2)
    assert emulator.backend.get_kernel(USER, "kaggle-runner-tiny").versions[0].status == "CANCEL_ACKNOWLEDGED"
    assert run_status(".kaggle-runner", "long")["state"] == "cancelled"
    assert "is cancelled" in cli_runner.invoke(cli, ["watch", "long"]).output


@pytest.mark.parametrize("override", ["n_head=7", "batch_size=0", "max_checkpoints=0", 'slug="Bad Slug"',
                                      'machine_shape="TPU9000"', "no_such_key=1", 'title="Other Title"'])
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


def test_local_launch_uses_a_background_emulator_for_the_workspace(tmp_path, monkeypatch, cli_runner):
    monkeypatch.chdir(tmp_path)
    cli_runner.invoke(cli, ["init", "--preset", "tiny"])
    try:
        result = cli_runner.invoke(cli, ["launch", "--local", "--name", "local-demo", *sets(
            ["max_steps=6", "eval_steps=3", "session_timeout_seconds=300"])])
        assert result.exit_code == 0, result.output
        assert "on the local emulator" in result.output
        assert run_status(".kaggle-runner", "local-demo")["state"] == "complete"
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


def test_launcher_cancels_a_version_kaggle_reports_running_past_its_limit(project, cli_runner, emulator):
    admin(emulator.url, "faults", {"stuck_running": True})
    # The kernel stops itself 10 s into its 40 s session (room for a slow start-up to reach its first
    # checkpoint), but Kaggle keeps saying RUNNING; the launcher's own deadline (session timeout + 5 s of
    # grace) cancels the version and the chain goes on from its outputs.
    result = cli_runner.invoke(cli, ["launch", "--name", "overrun", *sets(
        [*CHAIN, "session_timeout_seconds=40", "safety_margin_seconds=30", "segment_grace_seconds=5",
         "max_segments=1"])])
    assert result.exit_code == 0, result.output
    assert "past its session limit; cancelling it" in result.output
    status = run_status(".kaggle-runner", "overrun")
    assert status["segments"][0]["kaggle_status"] == "CANCEL_ACKNOWLEDGED"
    assert status["state"] == "stopped" and "max_segments" in status["reason"]


def test_status_reads_while_another_process_follows(project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "followed", "--detach", *sets(
        [*CHAIN, "max_steps=8", "session_timeout_seconds=300"])])
    assert result.exit_code == 0, result.output
    follower = subprocess.Popen([sys.executable, "-m", "kaggle_runner.cli", "watch", "followed"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    while follower.poll() is None:
        status = cli_runner.invoke(cli, ["status", "followed", "--json"])
        assert status.exit_code == 0, status.output
        seen.add(json.loads(status.output)["state"])
        time.sleep(0.3)
    assert follower.returncode == 0, follower.stdout.read()
    assert "running" in seen and run_status(".kaggle-runner", "followed")["state"] == "complete"


def _launch_while_both_gpu_sessions_are_busy(emulator, monkeypatch, release: Path) -> subprocess.Popen:
    """The user's other notebooks hold both GPU sessions until `release` exists; launch reaches its refusal."""
    blocker = f"import pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists():\n    time.sleep(0.2)\n"
    api = official_client(emulator.url, monkeypatch)
    for name in ("one", "two"):
        assert not api.kernels_push(str(write_kernel(release.parent / name, blocker, slug=f"other-{name}",
                                                     title=f"Other {name}"))).error
    launcher = subprocess.Popen([sys.executable, "-m", "kaggle_runner.cli", "launch", "--name", "waits", *sets(
        [*CHAIN, "max_steps=8", "session_timeout_seconds=300"])], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in launcher.stdout:
        seen.append(line)
        if "Maximum batch GPU session count of 2 reached" in line:
            break
    assert "Waiting for one of your GPU sessions to end" in seen[-1], "".join(seen)
    assert launcher.poll() is None and run_status(".kaggle-runner", "waits")["state"] == "running"
    return launcher


def test_a_push_waits_while_both_gpu_sessions_are_busy(project, emulator, monkeypatch, tmp_path):
    launcher = _launch_while_both_gpu_sessions_are_busy(emulator, monkeypatch, tmp_path / "release")
    (tmp_path / "release").touch()
    rest, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, rest
    status = run_status(".kaggle-runner", "waits")
    assert status["state"] == "complete" and [s["kernel_version"] for s in status["segments"]] == [1]


def test_cancel_stops_a_launch_waiting_for_a_gpu_session(project, emulator, monkeypatch, tmp_path, cli_runner):
    launcher = _launch_while_both_gpu_sessions_are_busy(emulator, monkeypatch, tmp_path / "release")
    cancelled = cli_runner.invoke(cli, ["cancel", "waits"])
    assert cancelled.exit_code == 0 and "no kernel version was running" in cancelled.output, cancelled.output
    rest, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0 and "Run waits was cancelled." in rest, rest
    assert run_status(".kaggle-runner", "waits")["state"] == "cancelled"
    assert "kaggle-runner-tiny" not in {k.slug for k in emulator.backend.kernels.values()}  # nothing pushed
    (tmp_path / "release").touch()
