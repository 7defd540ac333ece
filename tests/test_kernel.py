"""The rendered kernel, run for real as a subprocess on the CPU with a tiny model."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kaggle_runner.config import load_preset
from kaggle_runner.render import RenderError, kernel_source, render_kernel, render_script, script_to_notebook
from tests.kernel_helpers import FAST, attach_checkpoint, attach_outputs, flat_dataset, mount, render, run_kernel

pytestmark = pytest.mark.slow

PAYLOAD = 'Hi """ \'\'\' {{ 7*7 }} {% raw %}\n__import__("os").system("touch PWNED") # \\" \\\\'


def load(path):
    return torch.load(path, weights_only=True)  # what the kernel does: no pickled code runs


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


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """A first segment ended by segment_steps=10: checkpoints at steps 8 and 10, token arrays, best_model.pt."""
    tmp = tmp_path_factory.mktemp("segment")
    run = run_kernel(render(tmp, ["segment_steps=10"]), tmp / "working")
    assert run.returncode == 0, run.stdout[-3000:]
    return run


def test_rotation_keeps_newest_checkpoints_plus_best_model(finished):
    checkpoints = sorted(p.name for p in (finished.working / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint_epoch1_step20.pt", "checkpoint_epoch1_step24.pt"]
    assert (finished.working / "best_model.pt").exists()
    listed = finished.manifest()["files"]
    assert {rel for rel, info in listed.items() if info["kind"] in ("checkpoint", "best")} == {
        "best_model.pt", "checkpoints/checkpoint_epoch1_step20.pt", "checkpoints/checkpoint_epoch1_step24.pt"}
    saved = [e["global_step"] for e in finished.events("checkpoint")]
    assert saved == [4, 8, 12, 16, 20, 24]  # every save_steps, older ones rotated away


def test_complete_run_writes_state_history_and_loadable_final_model(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = finished.run_state()
    assert state["status"] == "complete" and state["global_step"] == 24 and state["resumed_from"] is None
    entries = json.loads((finished.working / "training_history.json").read_text())
    history = [h for h in entries if h["kind"] == "eval"]
    assert [h["step"] for h in history] == [8, 16, 24]
    assert set(history[0]) == {"kind", "step", "epoch", "train_loss", "val_loss", "perplexity", "lr",
                               "tokens_per_second", "wall_time", "segment"}
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    train = [h for h in entries if h["kind"] == "train"]
    assert [h["step"] for h in train] == [4, 8, 12, 16, 20, 24]  # every log step
    assert set(train[0]) == {"kind", "step", "epoch", "train_loss", "lr", "tokens_per_second", "wall_time",
                             "segment"}
    assert all(h["segment"] == 1 for h in train + history)
    assert [h["wall_time"] for h in train] == sorted(h["wall_time"] for h in train)
    (sample,) = [h for h in entries if h["kind"] == "sample"]  # the one at the end
    assert set(sample) == {"kind", "step", "epoch", "text"} and sample["step"] == 24
    model = AutoModelForCausalLM.from_pretrained(finished.working / "final_model")
    tokenizer = AutoTokenizer.from_pretrained(finished.working / "final_model")
    ids = tokenizer("Return the value", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] >= tokenizer.vocab_size
    best = load(finished.working / "best_model.pt")
    assert best["val_loss"] == min(h["val_loss"] for h in history)
    checkpoint = load(finished.working / state["newest_checkpoint"])  # RNG states too: tensors and plain types
    assert set(checkpoint["rng"]) == {"torch", "cuda", "numpy", "python"}


def test_progress_lines_are_json_the_launcher_can_parse(finished):
    progress = finished.events("progress")
    assert [p["global_step"] for p in progress] == [4, 8, 12, 16, 20, 24]
    assert all(p["tokens_per_second"] > 0 and p["total_steps"] == 24 for p in progress)
    start = finished.events("start")[0]
    assert start["parameters"] > start["parameters_without_embeddings"] > 0 and start["resumed_from"] is None
    (session,) = finished.events("session")
    assert finished.stdout.startswith('{"event": "session"')  # the first line: the launcher can cancel at once
    assert session["torch"] == torch.__version__ and session["python"] == ".".join(map(str, sys.version_info[:3]))
    assert session["gpu"] is None and session["gpu_count"] == 0 and session["emulated_gpu"] == "NvidiaTeslaT4"
    assert finished.events("end") == [{"event": "end", "status": "complete", "reason": "complete",
                                       "global_step": 24, "epoch": 1}]


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


def _config_block(script: str) -> dict:
    tree = ast.parse(script)
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "CONFIG")
    return json.loads(node.value.args[0].value)


def test_chain_checkpoint_enters_the_config_block_as_data_and_bad_values_are_refused():
    config = load_preset("tiny", [*FAST])
    assert _config_block(render_script(config))["chain_checkpoint"] is None
    chain = {"file": "checkpoint_epoch1_step40.pt", "sha256": "a" * 64, "global_step": 40,
             "dataset": "alice/kaggle-runner-tiny-ckpt", "best_sha256": None}
    assert _config_block(render_script(config, chain))["chain_checkpoint"] == chain
    for bad in ({**chain, "file": "../../etc/passwd"}, {**chain, "sha256": 'x"""; import os'},
                {**chain, "dataset": "no-owner"}, {**chain, "global_step": "40"}, {**chain, "extra": 1},
                {k: v for k, v in chain.items() if k != "sha256"}):
        with pytest.raises(RenderError):
            render_script(config, bad)


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


def test_kernel_reads_in_order_and_the_notebook_has_one_cell_per_section(tmp_path):
    rule = r"# [=-]{99}\n"
    titles = re.findall(rf"{rule}# (.+)\n(?:# .+\n)*{rule}", kernel_source())
    majors = [t.split(":")[0] for t in titles]
    order = ["Imports and the outside world", "Model", "Data", "The training state", "The step and the loop",
             "Checkpoints and resume", "Platform survival", "main"]
    assert [m for m in majors if m in order] == order, majors
    config = load_preset("tiny", [*FAST, 'kernel_type="notebook"'])
    rendered = render_kernel(config, tmp_path / "nb", "alice")
    notebook = json.loads(rendered.code_file.read_text())
    assert rendered.metadata["code_file"] == "train.ipynb"
    assert len(notebook["cells"]) == len(titles) + 2  # plus the configuration and the run cells
    code = "\n".join(c["source"] for c in notebook["cells"])
    ast.parse(code)
    assert "def main(config" in code and script_to_notebook(render_script(config))["cells"] == notebook["cells"]


def test_simulated_oom_halves_micro_batch_and_keeps_effective_batch(tmp_path):
    run = run_kernel(render(tmp_path, ["max_steps=8", "eval_steps=4"]), tmp_path / "w",
                     env={"KAGGLE_RUNNER_SIMULATE_OOM_AT_STEP": "3"})
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.events("oom") == [{"event": "oom", "global_step": 3, "micro_batch_size": 4, "accumulation": 4}]
    assert run.run_state()["status"] == "complete" and run.run_state()["global_step"] == 8
    checkpoint = load(run.working / "checkpoints/checkpoint_epoch1_step8.pt")
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
    env = {"KAGGLE_RUNNER_INPUT_DIR": str(tmp_path / "none"), "PYTHONUNBUFFERED": "1",
           "KAGGLE_RUNNER_EMULATED_GPU": "NvidiaTeslaT4"}
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
    checkpoint = load(working / state["newest_checkpoint"])
    assert checkpoint["global_step"] == state["global_step"] >= 4


def _losses(run):
    """The deterministic part of the history: what an exact resume must repeat."""
    return [(h["kind"], h["step"], h["train_loss"], h.get("val_loss"), h["lr"])
            for h in json.loads((run.working / "training_history.json").read_text()) if h["kind"] != "sample"]


def test_segments_of_n_steps_resume_exactly_where_an_uninterrupted_run_would_be(tmp_path, segment):
    first = segment
    assert first.run_state()["reason"] == "step_budget" and first.run_state()["global_step"] == 10
    import platform

    import torch
    image = first.run_state()["image"]  # what the launcher compares across segments: an image update shows
    assert image["python"] == platform.python_version() and image["torch"] == str(torch.__version__)
    assert first.events("end")[0]["reason"] == "step_budget"
    straight = run_kernel(render(tmp_path / "straight"), tmp_path / "straight")
    assert straight.returncode == 0, straight.stdout[-2000:]
    chain = attach_checkpoint(first.working, tmp_path / "input", layout="datasets")
    second = run_kernel(render(tmp_path / "second", ["segment_steps=10"], chain), tmp_path / "second",
                        input_dir=tmp_path / "input")
    assert second.returncode == 0, second.stdout[-2000:]
    resumed = {"file": "checkpoint_epoch1_step10.pt", "sha256": chain["sha256"], "global_step": 10}
    assert second.events("start")[0]["resumed_from"] == resumed and second.events("start")[0]["global_step"] == 10
    state = second.run_state()
    assert state["resumed_from"] == resumed
    assert state["reason"] == "step_budget" and state["global_step"] == 20  # N more steps of this session
    assert "Data: reusing tokens" in second.stdout  # the chain's token dataset: no re-tokenizing
    assert not (second.working / "token_cache").exists()
    assert _losses(second) == [e for e in _losses(straight) if e[1] <= 20]  # the history to step 20
    entries = json.loads((second.working / "training_history.json").read_text())
    assert [h["segment"] for h in entries] == [1, 1, 1, 2, 2, 2, 2]  # train 4, 8, eval 8 | 12, 16, eval 16, 20
    first_history = json.loads((first.working / "training_history.json").read_text())
    assert entries[:3] == first_history and entries[3]["wall_time"] >= first_history[-1]["wall_time"]
    a = load(straight.working / "checkpoints/checkpoint_epoch1_step20.pt")
    b = load(second.working / "checkpoints/checkpoint_epoch1_step20.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    assert (second.working / "best_model.pt").exists() and "Not restoring" not in second.stdout


@pytest.mark.parametrize("layout", ["notebooks", "slug"])
def test_a_segment_resumes_from_the_previous_versions_outputs_and_carries_the_chain_on(tmp_path, segment, layout):
    """The outputs route: the previous version's outputs attached whole as a kernel source, under either layout.
    The kernel finds the checkpoint by its path there and sha256, resumes bitwise, reuses the token arrays without
    tokenizing, and carries best_model.pt and the token arrays into its own outputs for the next segment."""
    straight = run_kernel(render(tmp_path / "straight"), tmp_path / "straight")
    chain = attach_outputs(segment.working, tmp_path / "input", "alice/kaggle-runner-tiny", layout)
    assert chain["file"] == "checkpoints/checkpoint_epoch1_step10.pt"
    second = run_kernel(render(tmp_path / "second", ["segment_steps=10"], chain), tmp_path / "second",
                        input_dir=tmp_path / "input")
    assert second.returncode == 0, second.stdout[-2000:]
    assert second.run_state()["resumed_from"]["global_step"] == 10 and second.run_state()["global_step"] == 20
    assert "Data: reusing tokens" in second.stdout and "Not restoring" not in second.stdout
    carried = second.manifest()["files"]
    assert {rel for rel, info in carried.items() if info["kind"] == "token_cache"} == \
        {rel for rel, info in segment.manifest()["files"].items() if info["kind"] == "token_cache"}
    assert carried["best_model.pt"]["kind"] == "best"
    a = load(straight.working / "checkpoints/checkpoint_epoch1_step20.pt")
    b = load(second.working / "checkpoints/checkpoint_epoch1_step20.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_the_outputs_stay_within_their_budget_by_keeping_fewer_checkpoints(tmp_path):
    budget = ["output_budget_gb=0.012", "max_checkpoints=4", "save_steps=2", "max_steps=10"]  # 12.3 MiB
    run = run_kernel(render(tmp_path / "k", budget), tmp_path / "k")
    assert run.returncode == 0, run.stdout[-2000:]
    checkpoints = [rel for rel, info in run.manifest()["files"].items() if info["kind"] == "checkpoint"]
    keeping = next(line for line in run.stdout.splitlines() if line.startswith("Outputs:"))
    assert "more would not fit" in keeping and 1 <= len(checkpoints) < 4, keeping
    total = sum(p.stat().st_size for p in run.working.rglob("*") if p.is_file())
    assert total <= 0.012 * 2**30
    refused = run_kernel(render(tmp_path / "r", ["output_budget_gb=0.001"]), tmp_path / "r")
    assert refused.returncode == 1 and refused.run_state()["reason"] == "config_error"
    assert "cannot hold one checkpoint" in refused.run_state()["message"]


def _assert_stopped_before_any_work(run, reason):
    assert run.returncode != 0 and run.run_state()["reason"] == reason, run.stdout[-2000:]
    assert run.run_state()["resumed_from"] is None and run.run_state()["newest_checkpoint"] is None
    assert "Data:" not in run.stdout and "Model:" not in run.stdout and "Traceback" not in run.stdout
    assert sorted(p.name for p in run.working.iterdir()) == ["run_state.json"]  # no checkpoints, tokens, history


def test_chain_checkpoint_missing_or_altered_stops_at_once_as_resume_missing(tmp_path, segment):
    # Kaggle pinned the dataset's previous version: only the step-8 checkpoint is there.
    inputs = tmp_path / "input"
    flat_dataset(segment.working, mount(inputs, "alice/kaggle-runner-tiny-ckpt", "datasets"),
                 ["checkpoints/checkpoint_epoch1_step8.pt"])
    newest = segment.working / "checkpoints/checkpoint_epoch1_step10.pt"
    chain = {"file": newest.name, "sha256": hashlib.sha256(newest.read_bytes()).hexdigest(), "global_step": 10,
             "dataset": "alice/kaggle-runner-tiny-ckpt", "best_sha256": None}
    missing = run_kernel(render(tmp_path / "a", [], chain), tmp_path / "missing", input_dir=inputs)
    _assert_stopped_before_any_work(missing, "resume_missing")
    message = missing.run_state()["message"]
    assert "checkpoint_epoch1_step10.pt (step 10" in message and "checkpoint_epoch1_step8.pt" in message
    # The right name, somewhere else under the input root, with other bytes: never loaded.
    other = mount(inputs, "mallory/lookalike", "legacy")
    other.mkdir(parents=True)
    (other / newest.name).write_bytes(newest.read_bytes()[:-1] + b"x")
    altered = run_kernel(render(tmp_path / "a", [], chain), tmp_path / "altered", input_dir=inputs)
    _assert_stopped_before_any_work(altered, "resume_missing")
    assert "another sha256" in altered.run_state()["message"]


def test_checkpoint_of_another_shape_is_refused_before_data(tmp_path, segment):
    chain = attach_checkpoint(segment.working, tmp_path / "input", layout="legacy")
    run = run_kernel(render(tmp_path, ["n_embd=32"], chain), tmp_path / "w", input_dir=tmp_path / "input")
    _assert_stopped_before_any_work(run, "resume_error")
    assert "n_embd 64 (config: 32)" in run.run_state()["message"]


def _hostile_dataset(folder: Path, marker: Path) -> None:
    """A dataset claiming a checkpoint far ahead, whose pickle runs code when loaded with weights_only=False."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder.mkdir(parents=True)
    torch.save({"global_step": 999999, "epoch": 1, "payload": Payload()}, folder / "checkpoint_epoch1_step999999.pt")
    data = (folder / "checkpoint_epoch1_step999999.pt").read_bytes()
    (folder / "manifest.json").write_text(json.dumps({"kaggle_runner_manifest": 1, "files": {
        "checkpoint_epoch1_step999999.pt": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                            "kind": "checkpoint", "global_step": 999999, "epoch": 1}}}))


def test_attached_datasets_are_data_never_code(tmp_path):
    """Other datasets' manifests and checkpoints are never read; text files are found in either mount layout;
    allow_cpu trains on a CPU session without an emulated GPU."""
    inputs, marker = tmp_path / "input", tmp_path / "PWNED"
    _hostile_dataset(inputs / "datasets" / "mallory" / "kaggle-runner-tiny-ckpt", marker)
    _hostile_dataset(inputs / "evil", marker)
    corpus = inputs / "datasets" / "bob" / "corpus"
    corpus.mkdir(parents=True)
    for name in ("argparse", "inspect", "typing"):
        source = Path(sys.modules["os"].__file__).parent / f"{name}.py"
        (corpus / f"{name}.txt").write_text(source.read_text())
    script = render(tmp_path, ['dataset="text-files"', 'text_files_path="*.txt"', "allow_cpu=true",
                               "max_steps=8", "eval_steps=4"])
    run = run_kernel(script, tmp_path / "w", input_dir=inputs, env={"KAGGLE_RUNNER_EMULATED_GPU": None})
    assert run.returncode == 0, run.stdout[-3000:]
    assert not marker.exists()
    start = run.events("start")[0]
    assert start["global_step"] == 0 and start["resumed_from"] is None
    assert f"Data: 3 text file(s) from {corpus}" in run.stdout
    assert run.run_state()["status"] == "complete" and run.run_state()["global_step"] == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_stops_at_once_with_what_was_found(tmp_path):
    run = run_kernel(render(tmp_path), tmp_path / "w",
                     env={"KAGGLE_RUNNER_EMULATED_GPU": None, "KAGGLE_CONTAINER_NAME": "kernel-12345678-abc"})
    _assert_stopped_before_any_work(run, "no_gpu")
    assert run.run_state()["message"].startswith("no CUDA device: this session has only a CPU")
    (session,) = run.events("session")
    assert session["container"] == "kernel-12345678-abc" and session["emulated_gpu"] is None
    assert {"python", "torch", "transformers", "datasets", "gpu", "gpu_count"} <= set(session)


def test_loss_that_stays_nan_stops_as_diverged_keeping_the_last_finite_checkpoint(tmp_path):
    run = run_kernel(render(tmp_path, ["eval_steps=4"]), tmp_path / "w",
                     env={"KAGGLE_RUNNER_SIMULATE_NAN_AT_STEP": "7"})
    state = run.run_state()
    assert run.returncode == 1 and state["reason"] == "diverged", run.stdout[-3000:]
    assert state["global_step"] == 12 and "not finite for 6 optimizer steps in a row" in state["message"]
    assert "Not saving a checkpoint at step 8" in run.stdout
    listed = [rel for rel, info in run.manifest()["files"].items() if info["kind"] == "checkpoint"]
    assert listed == ["checkpoints/checkpoint_epoch1_step4.pt"] == [state["newest_checkpoint"]]
    for path in (run.working / listed[0], run.working / "best_model.pt"):
        assert all(torch.isfinite(t).all() for t in load(path)["model"].values())
    assert math.isfinite(load(run.working / "best_model.pt")["val_loss"])
    history = [h for h in json.loads((run.working / "training_history.json").read_text()) if h["kind"] == "eval"]
    assert [h["step"] for h in history] == [4, 8] and math.isnan(history[1]["val_loss"])


def test_missing_text_files_fail_fast_with_a_fix(tmp_path):
    run = run_kernel(render(tmp_path, ['dataset="text-files"', 'text_files_path="my-corpus/*.txt"']),
                     tmp_path / "w")
    assert run.returncode == 1
    state = run.run_state()
    assert state["reason"] == "data_error" and "Attach the dataset" in state["message"]
    assert "Traceback" not in run.stdout and "Model:" not in run.stdout  # no model built, no GPU time spent
