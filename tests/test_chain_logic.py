"""The resume chain's logic end to end with the stub kernel: the CLI, the official client, the emulator as
unkind as Kaggle (its defaults), and a kernel that honours the real kernel's file contract in a second."""

from __future__ import annotations

import json

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.run_views import run_status
from kaggle_runner.states import Phase
from tests.chain_helpers import SLUG, STUB_CHAIN, final_stub_weight, sets, stub_weight
from tests.emulator_helpers import USER, admin

pytestmark = pytest.mark.slow


def versions_of(emulator, slug: str = SLUG) -> list:
    return emulator.backend.get_kernel(USER, slug).versions


def test_chain_resumes_from_the_exact_checkpoint_it_named(stub_project, emulator, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "stub", *sets([*STUB_CHAIN, "max_steps=30"])])
    assert result.exit_code == 0, result.output
    status = run_status(".kaggle-runner", "stub")
    assert status["state"] == "complete", status
    assert [s["kernel_version"] for s in status["segments"]] == [1, 2, 3]
    assert final_stub_weight(stub_project / "outputs/stub", 30) == stub_weight(30)
    dataset = emulator.backend.get_dataset(USER, f"{SLUG}-ckpt")
    assert len(dataset.versions) == 2  # one upload per resume
    for segment in status["segments"][:-1]:
        assert segment["upload_seconds"] is not None and segment["bytes_uploaded"] > 0
    # Each later kernel was told the exact file and checksum to resume from, and proved it did.
    for version in versions_of(emulator)[1:]:
        log = "".join(e["data"] for e in emulator.backend.read_log_events(USER, SLUG, version))
        assert '"resumed_from": {"file": "checkpoint_epoch1_step' in log


def test_a_429_storm_while_following_does_not_end_the_run(stub_project, emulator, cli_runner):
    admin(emulator.url, "faults", {"fail": {"GetKernelSessionStatus": [429] * 8, "ListKernelSessionOutput": [503] * 3,
                                            "GetDataset": [429] * 3}})
    result = cli_runner.invoke(cli, ["launch", "--name", "storm", *sets(STUB_CHAIN)])
    assert result.exit_code == 0, result.output
    assert run_status(".kaggle-runner", "storm")["state"] == "complete"
    assert "Traceback" not in result.output and result.output.count("429") <= 4  # one note per outage


def test_a_weekly_quota_refusal_stops_the_chain_cleanly(stub_project, emulator, cli_runner):
    admin(emulator.url, "realism", {"weekly_gpu_seconds": 1})  # the first segment (2 s) uses it up
    result = cli_runner.invoke(cli, ["launch", "--name", "quota",
                                     *sets([*STUB_CHAIN, 'sample_prompt="stub: step=0.2"'])])
    assert result.exit_code == 4, result.output  # stopped
    status = run_status(".kaggle-runner", "quota")
    assert status["state"] == "stopped" and "Maximum weekly GPU quota" in status["reason"], status
    assert "resets" in status["reason"] and status["segments"][-1]["phase"] == Phase.FINAL
    assert len(versions_of(emulator)) == 1


def test_a_status_404_after_the_push_is_waited_out(stub_project, emulator, cli_runner):
    admin(emulator.url, "realism", {"status_404_window": 3.0, "output_lag": 2.0})
    result = cli_runner.invoke(cli, ["launch", "--name", "late", *sets([*STUB_CHAIN, "max_steps=10"])])
    assert result.exit_code == 0, result.output
    assert run_status(".kaggle-runner", "late")["state"] == "complete"


def test_a_session_without_a_gpu_stops_the_chain_saying_so(stub_project, emulator, cli_runner):
    admin(emulator.url, "realism", {"no_gpu": True})
    result = cli_runner.invoke(cli, ["launch", "--name", "cpu", *sets(STUB_CHAIN)])
    assert result.exit_code == 4, result.output
    status = run_status(".kaggle-runner", "cpu")
    assert status["state"] == "stopped" and "without a usable GPU" in status["reason"] and "allow_cpu" in \
        status["reason"]
    assert len(versions_of(emulator)) == 1


def test_no_progress_stops_the_chain(stub_project, cli_runner):
    # The kernel's own budget ends before training starts: every segment saves step 0 and stops.
    result = cli_runner.invoke(cli, ["launch", "--name", "stalled", *sets(
        [*STUB_CHAIN, "max_stalled_segments=2", 'sample_prompt="stub: stall"'])])
    assert result.exit_code == 4, result.output
    status = run_status(".kaggle-runner", "stalled")
    assert status["state"] == "stopped" and "without progress" in status["reason"]
    assert len(status["segments"]) == 3


def test_max_segments_then_resume_by_hand(stub_project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "capped", "--max-segments", "1", *sets(STUB_CHAIN)])
    assert result.exit_code == 4, result.output
    status = run_status(".kaggle-runner", "capped")
    assert status["state"] == "stopped" and "max_segments" in status["reason"] and "resume capped" in status["reason"]
    assert len(status["segments"]) == 1
    resumed = cli_runner.invoke(cli, ["resume", "capped", "--max-segments", "2"])
    assert resumed.exit_code == 0, resumed.output
    status = run_status(".kaggle-runner", "capped")
    assert status["state"] == "complete" and len(status["segments"]) == 2


def test_failure_before_the_first_step_is_not_relaunched(stub_project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "broken", *sets(
        [*STUB_CHAIN, 'dataset="text-files"', 'text_files_path="missing/*.txt"'])])
    assert result.exit_code == 3, result.output  # failed, and said so: not "stopped", not 0
    status = run_status(".kaggle-runner", "broken")
    assert status["state"] == "failed" and "could not load its data" in status["reason"]
    assert "resume broken" in status["reason"]
    assert len(versions_of(emulator)) == 1


def test_fetch_verifies_skips_and_repairs(stub_project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "short", *sets([*STUB_CHAIN, "max_steps=10"])])
    assert result.exit_code == 0, result.output
    target = stub_project / "fetched"
    assert cli_runner.invoke(cli, ["fetch", "short", "-o", str(target)]).exit_code == 0
    manifest = json.loads((target / "manifest.json").read_text())
    best = target / "best_model.pt"
    stamp = best.stat().st_mtime_ns
    assert cli_runner.invoke(cli, ["fetch", "short", "-o", str(target)]).exit_code == 0
    assert best.stat().st_mtime_ns == stamp  # verified and skipped, not downloaded again
    best.write_bytes(best.read_bytes()[: manifest["files"]["best_model.pt"]["size"] // 3])  # a partial file
    assert cli_runner.invoke(cli, ["fetch", "short", "-o", str(target)]).exit_code == 0
    from kaggle_runner.artifacts import verified

    assert all(verified(target, rel, info) for rel, info in manifest["files"].items())
    assert {"best_model.pt", "checkpoints", "final_model", "manifest.json", "training_history.json"} <= \
        {p.name for p in target.iterdir()}
    assert not list(stub_project.glob(".fetched.staging"))


def test_a_torn_run_state_reads_as_missing_not_a_traceback(stub_project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "torn", *sets([*STUB_CHAIN, 'sample_prompt="stub: torn"'])])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    status = run_status(".kaggle-runner", "torn")
    # No readable run_state: the segment counts as ended without a word from the kernel, and the chain goes on
    # from its verified checkpoint.
    assert status["state"] == "complete", status
