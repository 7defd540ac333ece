"""The outputs route with the stub kernel: each segment reads the previous version's outputs on Kaggle, two kernels
take turns, and nothing but the small files a decision needs comes down to this machine; cron-style passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.run_views import run_status
from tests.chain_helpers import SLUG, STUB_CHAIN, final_stub_weight, launcher, sets, start_launcher, stub_weight
from tests.emulator_helpers import USER, admin

pytestmark = pytest.mark.slow

OUTPUTS = [*STUB_CHAIN, "resume_via=outputs", "max_steps=30"]
A, B = f"{USER}/{SLUG}", f"{USER}/{SLUG}-b"
SMALL = {"manifest.json", "run_state.json", "training_history.json"}


def _reasons(name: str, segments: list[dict]) -> list[str]:
    return [json.loads(Path(f".kaggle-runner/runs/{name}/segment-{s['index']}/run_state.json").read_text())["reason"]
            for s in segments]


def _came_down(name: str, segments: list[dict]) -> set[str]:
    """Every file a segment's phases downloaded (fetch's outputs go elsewhere: outputs/RUN), but the log the
    official client writes from each listing."""
    return {p.name for s in segments for p in Path(f".kaggle-runner/runs/{name}/segment-{s['index']}").rglob("*")
            if p.is_file() and p.suffix != ".log"}


def test_a_chain_through_outputs_moves_no_checkpoint_through_this_machine(stub_project, emulator, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "outs", *sets(OUTPUTS)])
    assert result.exit_code == 0, result.output
    assert "Resumes go through Kaggle, each version reading the last one's outputs" in result.output
    status = run_status(".kaggle-runner", "outs")
    segments = status["segments"]
    assert [s["kernel"] for s in segments] == [A, B, A] and status["resume_via"] == "outputs"
    assert [s["resume_via"] for s in segments] == [None, "outputs", "outputs"]
    assert all(s["bytes_uploaded"] == 0 for s in segments)
    assert _came_down("outs", segments) == SMALL  # never a checkpoint, nor best_model.pt
    assert not emulator.backend.datasets  # no checkpoint dataset, no token dataset
    first_b = emulator.backend.get_version(USER, f"{SLUG}-b", "v1")[1]
    second_a = emulator.backend.get_version(USER, SLUG, "v2")[1]
    assert first_b.kernel_source_versions == {A: 1} and second_a.kernel_source_versions == {B: 1}
    assert final_stub_weight(stub_project / "outputs/outs", 30) == stub_weight(30)


def test_a_push_before_the_outputs_are_attachable_is_pushed_again_on_the_same_kernel(stub_project, emulator,
                                                                                     cli_runner):
    admin(emulator.url, "faults", {"stale_mounts": 1})  # the first resume's push attaches no version yet
    result = cli_runner.invoke(cli, ["launch", "--name", "early", *sets(OUTPUTS)])
    assert result.exit_code == 0, result.output
    assert "did not find its checkpoint" in result.output
    segments = run_status(".kaggle-runner", "early")["segments"]
    assert [s["kernel"] for s in segments] == [A, B, B, A]  # the retry stays on B: A's newest stays the source
    assert _reasons("early", segments) == ["step_budget", "resume_missing", "step_budget", "complete"]
    assert not emulator.backend.datasets
    assert final_stub_weight(stub_project / "outputs/early", 30) == stub_weight(30)


def test_when_outputs_fail_twice_that_resume_goes_through_the_checkpoint_dataset(stub_project, emulator, cli_runner):
    admin(emulator.url, "faults", {"stale_mounts": 2})
    result = cli_runner.invoke(cli, ["launch", "--name", "fallback", *sets(OUTPUTS)])
    assert result.exit_code == 0, result.output
    assert result.output.count("this resume goes through the checkpoint dataset") == 1, result.output
    segments = run_status(".kaggle-runner", "fallback")["segments"]
    assert _reasons("fallback", segments) == ["step_budget", "resume_missing", "resume_missing", "step_budget",
                                              "complete"]
    assert [s["resume_via"] for s in segments] == [None, "outputs", "outputs", "dataset", "outputs"]
    assert len(emulator.backend.get_dataset(USER, f"{SLUG}-ckpt").versions) == 1  # that one resume, once
    assert segments[2]["bytes_uploaded"] > 0 and all(s["bytes_uploaded"] == 0 for s in segments[3:])
    assert final_stub_weight(stub_project / "outputs/fallback", 30) == stub_weight(30)


def test_passes_from_cron_drive_a_detached_chain_to_its_end(stub_project, emulator):
    result = launcher("launch", "--detach", "--name", "cron", *sets(OUTPUTS))
    assert result.returncode == 0, result.stdout + result.stderr
    codes = []
    for _ in range(200):  # a pass every few seconds; each one moves what can move and exits
        if len(codes) == 3:  # two passes overlapping: the lease lets one drive, the other leaves it
            both = [start_launcher("watch", "--all", "--once") for _ in range(2)]
            outputs = [p.communicate(timeout=120)[0] for p in both]
            codes += [p.returncode for p in both]
            assert all(p.returncode in (0, 6) for p in both), outputs
            continue
        result = launcher("watch", "--all", "--once")
        codes.append(result.returncode)
        assert result.returncode in (0, 6), result.stdout + result.stderr
        if result.returncode == 0:
            break
    assert codes[-1] == 0 and set(codes[:-1]) <= {6, 0}
    status = run_status(".kaggle-runner", "cron")
    assert status["state"] == "complete"
    assert status["train_loss"] == 1 / 30  # no pass followed a log: the last loss is read from it at the end
    versions = [len(emulator.backend.get_kernel(USER, slug).versions) for slug in (SLUG, f"{SLUG}-b")]
    assert versions == [2, 1]  # not one push too many, however the passes overlapped
    assert final_stub_weight(stub_project / "outputs/cron", 30) == stub_weight(30)
    assert launcher("watch", "--all", "--once").returncode == 0  # nothing in flight: a quiet pass


def test_resume_by_hand_continues_through_the_outputs(stub_project, emulator, cli_runner):
    stopped = cli_runner.invoke(cli, ["launch", "--name", "byhand", *sets([*OUTPUTS, "max_segments=1"])])
    assert stopped.exit_code == 4 and "max_segments" in stopped.output, stopped.output
    result = cli_runner.invoke(cli, ["resume", "byhand", "--max-segments", "4"])
    assert result.exit_code == 0, result.output
    segments = run_status(".kaggle-runner", "byhand")["segments"]
    assert [s["kernel"] for s in segments] == [A, B, A] and not emulator.backend.datasets
    assert final_stub_weight(stub_project / "outputs/byhand", 30) == stub_weight(30)
