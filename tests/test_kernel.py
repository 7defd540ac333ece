"""The rendered kernel, run for real as a subprocess on the CPU with a tiny model."""

from __future__ import annotations

import ast
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from kaggle_runner.config import load_preset
from kaggle_runner.render import render_kernel, render_script, script_to_notebook
from tests.kernel_helpers import FAST, render, run_kernel

pytestmark = pytest.mark.slow

PAYLOAD = 'Hi """ \'\'\' {{ 7*7 }} {% raw %}\n__import__("os").system("touch PWNED") # \\" \\\\'


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One complete run, shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("complete")
    config = load_preset("tiny", [*FAST])
    config = config.model_copy(update={"sample_prompt": PAYLOAD})
    script = render_kernel(config, tmp / "kernel", "alice").code_file
    run = run_kernel(script, tmp / "working")
    assert run.returncode == 0, run.stdout[-3000:]
    return run


def test_rotation_keeps_newest_checkpoints_plus_best_model(finished):
    checkpoints = sorted(p.name for p in (finished.working / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint_epoch1_step20.pt", "checkpoint_epoch1_step24.pt"]
    assert (finished.working / "best_model.pt").exists()
    listed = finished.manifest()["files"]
    assert {rel for rel, info in listed.items() if info["kind"] != "token_cache"} == {
        "best_model.pt", "checkpoints/checkpoint_epoch1_step20.pt", "checkpoints/checkpoint_epoch1_step24.pt"}
    saved = [e["global_step"] for e in finished.events("checkpoint")]
    assert saved == [4, 8, 12, 16, 20, 24]  # every save_steps, older ones rotated away


def test_complete_run_writes_state_history_and_loadable_final_model(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = finished.run_state()
    assert state["status"] == "complete" and state["global_step"] == 24
    history = json.loads((finished.working / "training_history.json").read_text())
    assert [h["step"] for h in history] == [8, 16, 24]
    assert {"step", "epoch", "train_loss", "val_loss", "perplexity", "lr", "tokens_per_second",
            "wall_time"} <= set(history[0])
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    model = AutoModelForCausalLM.from_pretrained(finished.working / "final_model")
    tokenizer = AutoTokenizer.from_pretrained(finished.working / "final_model")
    ids = tokenizer("Return the value", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] >= tokenizer.vocab_size
    best = torch.load(finished.working / "best_model.pt", weights_only=False)
    assert best["val_loss"] == min(h["val_loss"] for h in history)


def test_progress_lines_are_json_the_launcher_can_parse(finished):
    progress = finished.events("progress")
    assert [p["global_step"] for p in progress] == [4, 8, 12, 16, 20, 24]
    assert all(p["tokens_per_second"] > 0 and p["total_steps"] == 24 for p in progress)
    start = finished.events("start")[0]
    assert start["parameters"] > start["parameters_without_embeddings"] > 0


def test_payload_in_sample_prompt_stays_text(finished):
    samples = finished.events("sample")
    assert samples and samples[-1]["text"].startswith(PAYLOAD[:5])
    assert not (finished.working / "PWNED").exists()
    script = render_script(load_preset("tiny", [*FAST]).model_copy(update={"sample_prompt": PAYLOAD,
                                                                          "title": 'Tiny "x" {{ y }}'}))
    assert "{{" not in script.split("CONFIG = json.loads")[0]
    tree = ast.parse(script)
    config_node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "CONFIG")
    assert json.loads(config_node.value.args[0].value)["sample_prompt"] == PAYLOAD


def test_rendered_script_is_clean_and_imports_only_kaggle_image_packages(tmp_path):
    script = render(tmp_path).read_text()
    assert "{%" not in script and "{{ " not in script
    imported = set()
    for node in ast.walk(ast.parse(script)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    allowed = {"torch", "transformers", "tokenizers", "datasets", "numpy"} | set(sys.stdlib_module_names)
    assert imported <= allowed, imported - allowed
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "E,F,W,B",
                           "--line-length", "120", str(tmp_path / "kernel" / "train.py")],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_notebook_has_the_same_code_as_cells(tmp_path):
    config = load_preset("tiny", [*FAST, 'kernel_type="notebook"'])
    rendered = render_kernel(config, tmp_path / "nb", "alice")
    notebook = json.loads(rendered.code_file.read_text())
    assert rendered.metadata["code_file"] == "train.ipynb" and len(notebook["cells"]) > 5
    code = "\n".join(c["source"] for c in notebook["cells"])
    ast.parse(code)
    assert "def main(config" in code and script_to_notebook(render_script(config))["cells"] == notebook["cells"]


def test_simulated_oom_halves_micro_batch_and_keeps_effective_batch(tmp_path):
    run = run_kernel(render(tmp_path, ["max_steps=8", "eval_steps=4"]), tmp_path / "w",
                     env={"KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP": "3"})
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.events("oom") == [{"event": "oom", "global_step": 3, "micro_batch_size": 4, "accumulation": 4}]
    assert run.run_state()["status"] == "complete" and run.run_state()["global_step"] == 8
    checkpoint = torch.load(run.working / "checkpoints/checkpoint_epoch1_step8.pt", weights_only=False)
    assert checkpoint["micro_batch_size"] * checkpoint["accumulation"] == 8 * 2


def test_oom_at_micro_batch_one_stops_with_message_and_checkpoint(tmp_path):
    run = run_kernel(render(tmp_path, ["max_steps=8", "batch_size=2", "save_steps=100"]), tmp_path / "w",
                     env={"KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP": "3+"})
    assert run.returncode == 1
    state = run.run_state()
    assert state["status"] == "incomplete" and state["reason"] == "out_of_memory"
    assert "micro-batch 1" in state["message"] and "Traceback" not in run.stdout
    assert state["global_step"] == 2 and (run.working / state["newest_checkpoint"]).exists()


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    script = render(tmp_path, ["max_steps=100000", "save_steps=100000", "eval_steps=100000"])
    working = tmp_path / "w"
    working.mkdir()
    env = {"KAGGLE_RUNNER_INPUT_DIR": str(tmp_path / "none"), "PYTHONUNBUFFERED": "1"}
    import os

    process = subprocess.Popen([sys.executable, str(script)], cwd=working, env={**os.environ, **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith('{"event": "progress"'):
            break
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, "".join(lines) + out
    state = json.loads((working / "run_state.json").read_text())
    assert state["status"] == "incomplete" and state["reason"] == "interrupted"
    checkpoint = torch.load(working / state["newest_checkpoint"], weights_only=False)
    assert checkpoint["global_step"] == state["global_step"] >= 4


def _resume_input(source_working, input_dir):
    """Lay out a stopped run's outputs the way the launcher attaches them: one flat dataset folder."""
    target = input_dir / "datasets" / "alice" / "kaggle-runner-tiny-ckpt"
    target.mkdir(parents=True)
    manifest = json.loads((source_working / "manifest.json").read_text())
    files = {}
    for rel, info in manifest["files"].items():
        shutil.copyfile(source_working / rel, target / rel.split("/")[-1])
        files[rel.split("/")[-1]] = info
    (target / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    return target


def test_stop_by_budget_then_resume_equals_uninterrupted_run(tmp_path):
    script = render(tmp_path)
    straight = run_kernel(script, tmp_path / "straight")
    first = run_kernel(script, tmp_path / "first", env={"KAGGLE_RUNNER_TIME_BUDGET_AT_STEP": "10"})
    assert straight.returncode == 0 and first.returncode == 0, first.stdout[-2000:]
    assert first.run_state()["reason"] == "time_budget" and first.run_state()["global_step"] == 10
    inputs = tmp_path / "input"
    _resume_input(first.working, inputs)
    second = run_kernel(script, tmp_path / "second", input_dir=inputs)
    assert second.returncode == 0, second.stdout[-2000:]
    assert second.events("start")[0]["global_step"] == 10
    assert "Data: reusing tokens" in second.stdout  # the first run's token arrays: no re-tokenizing
    assert second.run_state()["status"] == "complete"

    def losses(run):
        return [(h["step"], h["train_loss"], h["val_loss"])
                for h in json.loads((run.working / "training_history.json").read_text())]

    assert losses(second) == losses(straight)
    a = torch.load(straight.working / "checkpoints/checkpoint_epoch1_step24.pt", weights_only=False)
    b = torch.load(second.working / "checkpoints/checkpoint_epoch1_step24.pt", weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert (second.working / "best_model.pt").exists()


def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    script = render(tmp_path)
    first = run_kernel(script, tmp_path / "first", env={"KAGGLE_RUNNER_TIME_BUDGET_AT_STEP": "12"})
    assert first.run_state()["global_step"] == 12
    dataset = _resume_input(first.working, tmp_path / "input")
    newest = dataset / "checkpoint_epoch1_step12.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    second = run_kernel(script, tmp_path / "second", input_dir=tmp_path / "input")
    assert second.returncode == 0, second.stdout[-2000:]
    assert "Skipping checkpoint" in second.stdout and "step 12" in second.stdout
    assert second.events("start")[0]["global_step"] == 8
    assert second.run_state()["status"] == "complete"


def test_missing_text_files_fail_fast_with_a_fix(tmp_path):
    run = run_kernel(render(tmp_path, ['dataset="text-files"', 'text_files_path="my-corpus/*.txt"']),
                     tmp_path / "w")
    assert run.returncode == 1
    state = run.run_state()
    assert state["reason"] == "data_error" and "Attach the dataset" in state["message"]
    assert "Traceback" not in run.stdout and "Model:" not in run.stdout  # no model built, no GPU time spent
