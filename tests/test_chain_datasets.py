"""The chain and the checkpoint dataset, end to end with the stub kernel against the unkind emulator: a version
pinned at push, versions that fail processing or never get ready, a first version Kaggle will not let go of,
pushes refused or run without the dataset, and old versions kept until a segment proved its resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.run_views import run_status
from tests.chain_helpers import SLUG, STUB_CHAIN, final_stub_weight, sets, stub_weight
from tests.emulator_helpers import USER, admin

pytestmark = pytest.mark.slow


def versions_of(emulator, slug: str = SLUG) -> list:
    return emulator.backend.get_kernel(USER, slug).versions


def test_a_resume_pushed_inside_the_pin_window_is_pushed_again(stub_project, emulator, cli_runner):
    # The first resume is pushed as if inside the pin window: its kernel mounts the previous (absent) version.
    admin(emulator.url, "faults", {"stale_mounts": 1})
    result = cli_runner.invoke(cli, ["launch", "--name", "pinned", *sets([*STUB_CHAIN, "dataset_settle_seconds=0"])])
    assert result.exit_code == 0, result.output
    assert "did not find its checkpoint" in result.output
    status = run_status(".kaggle-runner", "pinned")
    assert status["state"] == "complete", status
    reasons = [json.loads(Path(f".kaggle-runner/runs/pinned/segment-{s['index']}/run_state.json").read_text())
               ["reason"] for s in status["segments"]]
    assert reasons[0] == "step_budget" and "resume_missing" in reasons[1:-1] and reasons[-1] == "complete"
    assert final_stub_weight(stub_project / "outputs/pinned", 20) == stub_weight(20)


def test_older_checkpoint_versions_stay_until_a_segment_proved_it_resumed(stub_project, emulator, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "keep", *sets([*STUB_CHAIN, "max_steps=30"])])
    assert result.exit_code == 0, result.output
    dataset = emulator.backend.get_dataset(USER, f"{SLUG}-ckpt")
    # Version 2 was uploaded by segment 2, which proved it resumed from version 1: only then did version 1 go.
    assert [bool(v.files) for v in dataset.versions] == [False, True]


def test_a_checkpoint_version_that_fails_processing_is_uploaded_again(stub_project, emulator, cli_runner):
    admin(emulator.url, "realism", {"dataset_versions_failing": 1})  # the first resume's upload fails on Kaggle
    result = cli_runner.invoke(cli, ["launch", "--name", "failed-upload", *sets(STUB_CHAIN)])
    assert result.exit_code == 0, result.output
    assert "failed processing" in result.output and "uploading it again (1 of 2)" in result.output
    status = run_status(".kaggle-runner", "failed-upload")
    assert status["state"] == "complete" and [s["kernel_version"] for s in status["segments"]] == [1, 2]
    dataset = emulator.backend.get_dataset(USER, f"{SLUG}-ckpt")
    assert [v.processing for v in dataset.versions] == ["failed", "ok"]
    assert final_stub_weight(stub_project / "outputs/failed-upload", 20) == stub_weight(20)


def test_a_checkpoint_dataset_that_keeps_failing_stops_the_chain_saying_so(stub_project, emulator, cli_runner):
    admin(emulator.url, "realism", {"dataset_versions_failing": 3})  # the upload and both uploads again
    result = cli_runner.invoke(cli, ["launch", "--name", "never-ready", *sets(STUB_CHAIN)])
    assert result.exit_code == 4, result.output  # stopped by a guardrail, in one line, no traceback
    assert "Traceback" not in result.output
    status = run_status(".kaggle-runner", "never-ready")
    ref = f"{USER}/{SLUG}-ckpt"
    assert status["state"] == "stopped" and ref in status["reason"] and "after 3 tries" in status["reason"]
    assert "resume never-ready" in status["reason"], status["reason"]
    assert len(emulator.backend.get_dataset(USER, f"{SLUG}-ckpt").versions) == 3
    assert len(versions_of(emulator)) == 1  # no push of a resume that could not mount its checkpoint
    resumed = cli_runner.invoke(cli, ["resume", "never-ready"])  # Kaggle processes versions again
    assert resumed.exit_code == 0, resumed.output
    assert run_status(".kaggle-runner", "never-ready")["state"] == "complete"
    assert final_stub_weight(stub_project / "outputs/never-ready", 20) == stub_weight(20)


def _drive_with_a_short_readiness_deadline(name: str):
    """The same driver `watch` runs, with the deadline for a dataset's readiness cut from minutes to seconds."""
    from dataclasses import replace

    from kaggle_runner.connect import context_for as _context
    from kaggle_runner.controller import drive
    from kaggle_runner.store import Store

    ctx = _context(".kaggle-runner", Store(".kaggle-runner").get_run(name))
    ctx.pace = replace(ctx.pace, dataset_ready=6.0)
    return drive(ctx)


def test_a_checkpoint_version_still_unready_at_the_deadline_is_uploaded_again(stub_project, emulator, cli_runner,
                                                                             capsys, monkeypatch):
    from kaggle_runner.store import Store
    from tests.emulator_helpers import official_client, write_dataset

    # The checkpoint dataset has a processed first version (an earlier run's): Kaggle takes new versions of it.
    earlier = write_dataset(stub_project / "earlier", f"{SLUG}-ckpt", {"old.txt": b"an earlier run"})
    official_client(emulator.url, monkeypatch).dataset_create_new(str(earlier), quiet=True)
    admin(emulator.url, "realism", {"dataset_versions_stuck": 1})  # never ready; the next one is
    result = cli_runner.invoke(cli, ["launch", "--name", "stuck", "--detach", *sets(STUB_CHAIN)])
    assert result.exit_code == 0, result.output
    assert _drive_with_a_short_readiness_deadline("stuck").state == "complete"
    err = capsys.readouterr().err
    assert "was still blobs_copied_to_sds" in err and "uploading it again (1 of 2)" in err, err
    dataset = emulator.backend.get_dataset(USER, f"{SLUG}-ckpt")
    assert [v.processing for v in dataset.versions] == ["ok", "stuck", "ok"]
    assert [s.kernel_version for s in Store(".kaggle-runner").segments("stuck")] == [1, 2]
    assert final_stub_weight(stub_project / "outputs/stuck", 20) == stub_weight(20)


def test_a_first_checkpoint_version_that_never_finishes_stops_the_chain_after_waiting_for_it(stub_project, emulator,
                                                                                             cli_runner, capsys):
    """Kaggle refuses a second version while the first still processes: the chain waits for the first again
    (it holds the same checkpoint) instead of failing on the refusal, and stops, saying so, when it never comes."""
    admin(emulator.url, "realism", {"dataset_versions_stuck": 1})
    result = cli_runner.invoke(cli, ["launch", "--name", "wedged", "--detach", *sets(STUB_CHAIN)])
    assert result.exit_code == 0, result.output
    run = _drive_with_a_short_readiness_deadline("wedged")
    err = capsys.readouterr().err
    assert err.count("while its first one is still processing; waiting for that one instead") == 2, err
    assert run.state == "stopped" and f"the checkpoint dataset {USER}/{SLUG}-ckpt did not become ready" in run.reason
    assert [v.processing for v in emulator.backend.get_dataset(USER, f"{SLUG}-ckpt").versions] == ["stuck"]


def test_a_push_refused_while_kaggle_does_not_see_the_checkpoint_dataset_is_pushed_again(stub_project, emulator,
                                                                                         cli_runner):
    admin(emulator.url, "faults", {"unattachable": 2, "unattachable_refused": True})  # the first push has none
    result = cli_runner.invoke(cli, ["launch", "--name", "unseen-data", *sets(STUB_CHAIN)])
    assert result.exit_code == 0, result.output
    assert result.output.count("Kaggle does not see it yet, pushing again") == 2, result.output
    status = run_status(".kaggle-runner", "unseen-data")
    assert status["state"] == "complete" and [s["kernel_version"] for s in status["segments"]] == [1, 2]
    assert final_stub_weight(stub_project / "outputs/unseen-data", 20) == stub_weight(20)


def test_a_version_kaggle_ran_without_the_checkpoint_dataset_is_followed_not_failed(stub_project, emulator,
                                                                                    cli_runner):
    admin(emulator.url, "faults", {"unattachable": 1})  # the resume's version runs without its dataset
    result = cli_runner.invoke(cli, ["launch", "--name", "unattached", *sets(STUB_CHAIN)])
    assert result.exit_code == 0, result.output
    assert "following that version" in result.output
    status = run_status(".kaggle-runner", "unattached")
    assert status["state"] == "complete", status
    # The version without the dataset found no checkpoint; the same resume went out once more, never two
    # versions at once.
    assert [s["kernel_version"] for s in status["segments"]] == [1, 2, 3] == [v.number for v in versions_of(emulator)]
    assert status["segments"][1]["resume_retries"] == 0 and status["segments"][2]["resume_retries"] == 1
    assert final_stub_weight(stub_project / "outputs/unattached", 20) == stub_weight(20)


def test_a_version_that_landed_without_a_dataset_of_the_users_is_followed_not_left_running(stub_project, emulator,
                                                                                          cli_runner):
    """Kaggle created the version but did not attach the user's dataset: failing the run there would leave a
    session running that no `cancel` reaches. It is followed; the stub kernel needs no data, so it completes."""
    admin(emulator.url, "faults", {"unattachable": 1})
    result = cli_runner.invoke(cli, ["launch", "--name", "theirs", *sets([*STUB_CHAIN, "max_steps=10",
                                                                          f'dataset_sources=["{USER}/my-own-data"]'])])
    assert result.exit_code == 0, result.output
    assert f"Kaggle did not attach {USER}/my-own-data" in result.output and "following that version" in result.output
    status = run_status(".kaggle-runner", "theirs")
    assert status["state"] == "complete" and [s["kernel_version"] for s in status["segments"]] == [1]
