"""Your own training script, chained ([job], docs/script.md): the job kernel run for real (render, then a
subprocess, as Kaggle runs it) and whole chains through the emulator and the official client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.config import ConfigError, load_config
from kaggle_runner.job_files import HELPER_NAME, MAX_SHIPPED_BYTES, JobFilesError, collect
from kaggle_runner.render import render_kernel
from kaggle_runner.run_views import run_status
from tests.emulator_helpers import USER

JOBS = Path(__file__).parent / "data" / "jobs"
# The example `init --preset script` writes: a plain PyTorch loop that keeps the contract, deterministic on a CPU.
EXAMPLE = Path(__file__).parent.parent / "kaggle_runner" / "presets" / "script_example.py"
TEMPLATE = Path(__file__).parent.parent / "kernel_template"
CHAIN = """
[kaggle]
slug = "my-job"
title = "My Job"
enable_internet = false
session_timeout_seconds = {timeout}
safety_margin_seconds = {margin}

[chain]
max_segments = 8
min_quota_hours = 0.0
dataset_settle_seconds = 3
outputs_settle_seconds = 3
resume_via = "{route}"
"""


def write_job(folder: Path, script: str, args: list[str], route: str = "dataset", timeout: int = 600,
              margin: int = 60, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE if script == "train.py" else JOBS / script, folder / script)
    config = folder / "job.toml"
    config.write_text(f'[job]\nscript = "{script}"\nargs = {json.dumps(args)}\n{extra}\n'
                      + CHAIN.format(route=route, timeout=timeout, margin=margin))
    return config


def run_job_kernel(config_path: Path, work: Path, chain_checkpoint: dict | None = None, segment: int = 1,
                   input_dir: Path | None = None, **popen) -> subprocess.Popen:
    """Render the job kernel and start it as Kaggle would: its folder's working directory as cwd."""
    config = load_config(config_path)
    rendered = render_kernel(config, work / "kernel", USER, job_files=collect(config, config_path.parent),
                             chain_checkpoint=chain_checkpoint, segment=segment)
    (work / "working").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KAGGLE_RUNNER_EMULATED_GPU": "NvidiaTeslaT4", "KAGGLE_RUNNER_SCRATCH_DIR": str(work / "tmp"),
           "KAGGLE_RUNNER_INPUT_DIR": str(input_dir or work / "input")}
    return subprocess.Popen([sys.executable, str(rendered.code_file)], cwd=work / "working", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def uninterrupted(tmp_path: Path, script: str, args: list[str]) -> Path:
    """The script run once, start to end, on this machine: what the chain must reproduce."""
    folder = tmp_path / "straight"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(TEMPLATE), "KAGGLE_RUNNER_CHECKPOINT_DIR": str(folder / "ckpt")}
    source = EXAMPLE if script == "train.py" else JOBS / script
    done = subprocess.run([sys.executable, str(source), *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


# -- the contract, without a chain ---------------------------------------------------------------------
def test_the_files_travel_byte_for_byte_and_nothing_else_does(tmp_path):
    project = tmp_path / "project"
    config_path = write_job(project, "train.py", ["--steps", "1"], extra='files = ["*.py", "assets/*"]')
    (project / "assets").mkdir()
    every_byte = bytes(range(256)) * 3
    (project / "assets" / "blob.bin").write_bytes(every_byte)
    (project / "helper.py").write_text("VALUE = 'shipped'\n")
    (project / "notes.txt").write_text("not matched by any glob")
    files = collect(load_config(config_path), project)
    assert set(files) == {"train.py", "helper.py", "assets/blob.bin", HELPER_NAME}
    config = load_config(config_path)
    script = render_kernel(config, tmp_path / "k", USER, job_files=files).code_file.read_text()
    namespace: dict = {}
    exec(script.split("\nimport base64", 1)[0], namespace)  # only the CONFIG and FILES blocks: data
    import base64

    assert base64.b64decode(namespace["FILES"]["assets/blob.bin"]) == every_byte
    assert "KAGGLE_KEY" not in script and os.environ.get("HOME", "~~") not in script


@pytest.mark.parametrize("problem, expected", [
    ("credentials", "looks like credentials"),
    ("credentials_any_case", "looks like credentials"),
    ("hugging_face_token", "looks like credentials"),
    ("link_to_credentials", "looks like credentials"),
    ("link_outside", "must be a path inside"),
    ("too_big", f"over the {MAX_SHIPPED_BYTES // 2**20} MiB"),
    ("helper", "kaggle-runner's helper"),
    ("outside", "must stay inside"),
])
def test_files_are_checked_before_anything_is_pushed(tmp_path, problem, expected):
    project = tmp_path / "project"
    extra = {"credentials": 'files = ["*.py", "kaggle.json"]', "too_big": 'files = ["*.py", "big.bin"]',
             "credentials_any_case": 'files = ["*.py", "Kaggle.JSON"]', "hugging_face_token": 'files = ["hf/*"]',
             "link_to_credentials": 'files = ["*.py", "settings.txt"]', "link_outside": "",
             "helper": "", "outside": 'files = ["../*.py"]'}[problem]
    config_path = write_job(project, "train.py", ["--steps", "1"], extra=extra)
    (project / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    (project / "Kaggle.JSON").write_text('{"username": "u", "key": "k"}')
    (project / "hf").mkdir()
    (project / "hf" / "token").write_text("hf_secret")
    (project / "settings.txt").symlink_to(project / "kaggle.json")
    if problem == "link_outside":  # any .py file is matched by the other cases' globs
        (tmp_path / "elsewhere.py").write_text("")
        (project / "elsewhere.py").symlink_to(tmp_path / "elsewhere.py")
    (project / "big.bin").write_bytes(b"x" * (MAX_SHIPPED_BYTES + 1))
    if problem == "helper":
        (project / HELPER_NAME).write_text("")
    with pytest.raises(JobFilesError, match=expected):
        collect(load_config(config_path), project)


def test_a_linked_script_ships_under_the_name_it_is_run_by(tmp_path):
    project = tmp_path / "project"
    config_path = write_job(project, "train.py", ["--steps", "1"])
    (project / "src").mkdir()
    (project / "train.py").rename(project / "src" / "train.py")
    (project / "train.py").symlink_to(project / "src" / "train.py")
    files = collect(load_config(config_path), project)
    assert files["train.py"] == EXAMPLE.read_bytes() and "src/train.py" not in files


@pytest.mark.parametrize("extra, overrides, refused", [
    ("[model]\nn_layer = 2\n", [], r"so \[model\] keys do not apply: remove n_layer"),
    ("epochs = 3\n", [], r"so \[training\] keys do not apply: remove epochs"),  # under [job]: keys go anywhere
    ("", ["save_steps=10", "dataset=wikitext-2"], r"so \[checkpoints\], \[data\] keys do not apply"),
])
def test_a_job_refuses_the_training_kernels_keys_wherever_they_are_written(tmp_path, extra, overrides, refused):
    config_path = write_job(tmp_path, "train.py", [], extra=extra)
    with pytest.raises(ConfigError, match=r"a \[job\] runs your own script, " + refused):
        load_config(config_path, overrides)


def test_a_training_config_turned_into_a_job_by_set_is_refused_and_a_job_keeps_its_output_budget(tmp_path):
    (tmp_path / "run.toml").write_text("[model]\nn_layer = 2\n[kaggle]\nslug = 'x'\n")
    with pytest.raises(ConfigError, match="remove n_layer"):
        load_config(tmp_path / "run.toml", ["script=train.py"])
    config = load_config(write_job(tmp_path / "job", "train.py", [], extra="[checkpoints]\noutput_budget_gb = 5\n"))
    assert config.job_config()["output_budget_gb"] == 5


def test_sigterm_reaches_the_script_and_the_deadline_stops_it(tmp_path):
    waits = tmp_path / "project" / "waits.py"
    waits.parent.mkdir(parents=True)
    waits.write_text(
        "import os, pathlib, signal, sys, time\n"
        "def saved(*_):\n"
        "    pathlib.Path(os.environ['KAGGLE_RUNNER_CHECKPOINT_DIR'], 'state').write_text('saved')\n"
        "    sys.exit(int(sys.argv[1]))\n"
        "signal.signal(signal.SIGTERM, saved)\n"
        "print('waiting', flush=True)\n"
        "time.sleep(120)\n")
    config = tmp_path / "project" / "job.toml"
    config.write_text('[job]\nscript = "waits.py"\nargs = ["75"]\n' + CHAIN.format(route="dataset", timeout=600,
                                                                                  margin=60))
    process = run_job_kernel(config, tmp_path / "term")
    for line in process.stdout:
        if line.startswith("waiting"):
            break
    process.send_signal(signal.SIGTERM)  # as Kaggle does before it stops a session
    out, _ = process.communicate(timeout=60)
    state = json.loads((tmp_path / "term/working/run_state.json").read_text())
    assert state["reason"] == "job_resume" and state["global_step"] == 1, out
    import platform

    import torch  # the image's versions, for the launcher's "another image" note, as the built-in kernel gives them
    assert state["image"]["python"] == platform.python_version() and state["image"]["torch"] == torch.__version__
    with tarfile.open(tmp_path / "term/working/checkpoints/job_checkpoint_seg1.ckpt") as packed:
        assert packed.extractfile("state").read() == b"saved"
    config.write_text('[job]\nscript = "waits.py"\nargs = ["1"]\n' + CHAIN.format(route="dataset", timeout=4,
                                                                                 margin=2))
    process = run_job_kernel(config, tmp_path / "deadline")
    out, _ = process.communicate(timeout=60)
    state = json.loads((tmp_path / "deadline/working/run_state.json").read_text())
    assert state["reason"] == "time_budget" and "the deadline has come" in out, out  # not its 120 s of sleep


def test_a_checkpoint_that_would_pass_the_output_budget_fails_in_one_line_and_hidden_outputs_are_listed(tmp_path):
    writes = tmp_path / "project" / "writes.py"
    writes.parent.mkdir(parents=True)
    writes.write_text("import os, pathlib\n"
                      "pathlib.Path('.settings').write_text('an output too')\n"
                      "pathlib.Path(os.environ['KAGGLE_RUNNER_CHECKPOINT_DIR'], 'state').write_bytes(b'x' * 300_000)\n"
                      "raise SystemExit(75)\n")
    config = tmp_path / "project" / "job.toml"
    for budget, work in ((0.001, "fits"), (0.0002, "over")):  # 1 MiB, then about 210 KiB
        config.write_text(f'[job]\nscript = "writes.py"\noutput_budget_gb = {budget}\n'
                          + CHAIN.format(route="dataset", timeout=600, margin=60))
        out, _ = run_job_kernel(config, tmp_path / work).communicate(timeout=60)
        state = json.loads((tmp_path / work / "working/run_state.json").read_text())
        manifest = json.loads((tmp_path / work / "working/manifest.json").read_text())["files"]
        assert ".settings" in manifest, out
        if work == "fits":
            assert state["reason"] == "job_resume" and state["newest_checkpoint"], out
    assert state["reason"] == "output_budget" and state["status"] == "failed" and not state["newest_checkpoint"]
    assert "would pass output_budget_gb = 0.0002" in state["message"] and not any(
        rel.endswith(".ckpt") for rel in manifest), out


@pytest.mark.slow
def test_a_trainer_stopped_by_sigterm_saves_a_whole_checkpoint_and_asks_to_be_resumed(tmp_path):
    # What Kaggle sends before it ends a session, and the job kernel at the deadline: Python's default would
    # kill the Trainer mid-save; the callback saves at the end of the step instead.
    project = tmp_path / "project"
    config = write_job(project, "trainer_job.py", ["--steps", "100000", "--steps-per-session", "0"])
    process = run_job_kernel(config, tmp_path / "work")
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "'loss'" in line:  # a step has ended: the Trainer is training
            break
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    state = json.loads((tmp_path / "work/working/run_state.json").read_text())
    assert state["reason"] == "job_resume" and state["global_step"] == 1, "".join(lines) + out
    with tarfile.open(tmp_path / "work/working/checkpoints/job_checkpoint_seg1.ckpt") as packed:
        saved = {Path(name).parts[0] for name in packed.getnames() if name.endswith("trainer_state.json")}
    assert len(saved) == 1 and saved.pop().startswith("checkpoint-"), out


# -- chains through the emulator -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("route", ["dataset", "outputs"])
def test_a_plain_pytorch_loop_chained_over_three_segments_is_bitwise_the_uninterrupted_run(project, cli_runner,
                                                                                         tmp_path, route):
    import torch

    config = write_job(project, "train.py", ["--steps", "15", "--steps-per-session", "5"], route=route)
    if route == "dataset":  # launch follows the chain to its end
        result = cli_runner.invoke(cli, ["launch", "-c", str(config), "--name", "loop"])
        assert result.exit_code == 0, result.output
    else:  # launch --detach, then passes of `watch --once`, as from cron
        assert cli_runner.invoke(cli, ["launch", "-c", str(config), "--name", "loop", "--detach"]).exit_code == 0
        for _ in range(300):
            passed = cli_runner.invoke(cli, ["watch", "--all", "--once"])
            assert passed.exit_code in (0, 6), passed.output
            if passed.exit_code == 0:
                break
            time.sleep(0.5)
    status = run_status(".kaggle-runner", "loop")
    assert status["state"] == "complete" and len(status["segments"]) == 3, status
    assert [s["global_step"] for s in status["segments"]] == [1, 2, 2]  # checkpoints carried: 1, 2, then none
    straight = uninterrupted(tmp_path, "train.py", ["--steps", "15"])
    chained = torch.load(project / "outputs/loop/model.pt", weights_only=True)
    expected = torch.load(straight / "model.pt", weights_only=True)
    assert chained.keys() == expected.keys() and all(torch.equal(chained[k], expected[k]) for k in expected)
    logs = cli_runner.invoke(cli, ["logs", "loop", "--segment", "3"]).output
    assert "resumed at step 10" in logs and "done at step 15" in logs, logs


@pytest.mark.slow
def test_a_trainer_script_with_the_callback_continues_its_global_step(project, cli_runner):
    config = write_job(project, "trainer_job.py", ["--steps", "8", "--steps-per-session", "3"], route="outputs")
    result = cli_runner.invoke(cli, ["launch", "-c", str(config), "--name", "tuned"])
    assert result.exit_code == 0, result.output
    status = run_status(".kaggle-runner", "tuned")
    assert status["state"] == "complete" and len(status["segments"]) == 3, status
    second = cli_runner.invoke(cli, ["logs", "tuned", "--segment", "2"]).output
    assert "resumes from" in second and "checkpoint-3" in second and "global_step 6" in second, second
    third = cli_runner.invoke(cli, ["logs", "tuned", "--segment", "3"]).output
    assert "checkpoint-6" in third and "global_step 8" in third, third
    assert (project / "outputs/tuned/trainer_out/config.json").is_file()  # its own output_dir, not the carried one


@pytest.mark.slow
def test_cancel_stops_a_detached_job(project, cli_runner, emulator):
    (project / "waits.py").write_text("import time\nprint('training', flush=True)\ntime.sleep(600)\n")
    config = project / "job.toml"
    config.write_text('[job]\nscript = "waits.py"\n' + CHAIN.format(route="dataset", timeout=600, margin=60))
    assert cli_runner.invoke(cli, ["launch", "-c", str(config), "--name", "stopped", "--detach"]).exit_code == 0
    cancelled = cli_runner.invoke(cli, ["cancel", "stopped"])  # the session id comes from the job kernel's log
    assert cancelled.exit_code == 0 and "Cancelled run stopped and its kernel version 1" in cancelled.output, \
        cancelled.output
    version = emulator.backend.get_kernel(USER, "my-job").versions[0]
    deadline = time.time() + 60
    while version.status != "CANCEL_ACKNOWLEDGED" and time.time() < deadline:
        time.sleep(0.2)
    assert version.status == "CANCEL_ACKNOWLEDGED" and run_status(".kaggle-runner", "stopped")["state"] == "cancelled"


@pytest.mark.slow
def test_a_job_that_carries_nothing_new_counts_as_stalled(project, cli_runner):
    # Saves once, then asks for a new session every time without saving anything new.
    (project / "idle.py").write_text(
        "import os, pathlib, sys\n"
        "if os.environ.get('KAGGLE_RUNNER_RESUME_DIR') is None:\n"
        "    pathlib.Path(os.environ['KAGGLE_RUNNER_CHECKPOINT_DIR'], 'state').write_text('step 1')\n"
        "sys.exit(75)\n")
    config = project / "job.toml"
    config.write_text('[job]\nscript = "idle.py"\n' + CHAIN.format(route="outputs", timeout=600, margin=60)
                      .replace("min_quota_hours", "max_stalled_segments = 2\nmin_quota_hours"))
    result = cli_runner.invoke(cli, ["launch", "-c", str(config), "--name", "idle"])
    assert result.exit_code == 4, result.output  # stopped, not failed, not resumed forever
    status = run_status(".kaggle-runner", "idle")
    assert "without progress" in status["reason"] and [s["global_step"] for s in status["segments"]] == [1, 1, 1]
