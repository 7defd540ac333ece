"""The resume chain's logic end to end with the stub kernel: the CLI, the official client, the emulator as
unkind as Kaggle (its defaults), and a kernel that honours the real kernel's file contract in a second."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.launcher import run_status
from kaggle_runner.states import Phase
from tests.chain_helpers import SLUG, STUB_CHAIN, final_stub_weight, launcher, sets, start_launcher, stub_weight
from tests.emulator_helpers import USER, admin, official_client, write_kernel

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


def test_a_resume_pushed_inside_the_pin_window_is_pushed_again(stub_project, emulator, cli_runner):
    # No settle time and a long pin window: the first resume's kernel mounts the previous (absent) version.
    admin(emulator.url, "realism", {"pin_window": 3.0})
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


def test_cancel_stops_the_version_by_its_session_id(stub_project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "long", "--detach", *sets(
        [*STUB_CHAIN, "max_steps=1000", "segment_steps=1000", 'sample_prompt="stub: step=0.5"'])])
    assert result.exit_code == 0, result.output
    follower = start_launcher("watch", "long")
    for _ in range(100):  # the driver learns the session id from the kernel's session event
        if run_status(".kaggle-runner", "long")["segments"][0]["session_id"]:
            break
        time.sleep(0.2)
    cancelled = cli_runner.invoke(cli, ["cancel", "long"])
    assert cancelled.exit_code == 0 and "Cancelled run long and its kernel version 1" in cancelled.output, \
        cancelled.output
    out, _ = follower.communicate(timeout=60)
    assert "was cancelled" in out, out
    for _ in range(100):
        if versions_of(emulator)[0].status == "CANCEL_ACKNOWLEDGED":
            break
        time.sleep(0.2)
    assert versions_of(emulator)[0].status == "CANCEL_ACKNOWLEDGED"


def test_a_refused_cancel_says_where_to_stop_the_version(stub_project, cli_runner, emulator):
    admin(emulator.url, "realism", {"cancel_refused": True})
    result = cli_runner.invoke(cli, ["launch", "--name", "stuck", "--detach", *sets(
        [*STUB_CHAIN, "max_steps=1000", "segment_steps=1000", 'sample_prompt="stub: step=0.5"'])])
    assert result.exit_code == 0, result.output
    time.sleep(1)
    cancelled = cli_runner.invoke(cli, ["cancel", "stuck"])
    assert cancelled.exit_code == 0, cancelled.output
    assert "did not stop version 1" in cancelled.output and f"kaggle.com/code/{USER}/{SLUG}" in cancelled.output
    admin(emulator.url, "realism", {"cancel_refused": False})


def test_the_launcher_cancels_a_version_kaggle_reports_running_past_its_limit(stub_project, cli_runner, emulator):
    admin(emulator.url, "faults", {"stuck_running": True})
    # The kernel stops itself after 10 steps, but Kaggle keeps saying RUNNING; the launcher's own deadline
    # (session timeout + 5 s of grace, counted from the first RUNNING) cancels it by its session id.
    result = cli_runner.invoke(cli, ["launch", "--name", "overrun", *sets(
        [*STUB_CHAIN, "session_timeout_seconds=12", "safety_margin_seconds=2", "segment_grace_seconds=5",
         "max_segments=1"])])
    assert result.exit_code == 4, result.output
    assert "past its session limit; cancelling it" in result.output
    status = run_status(".kaggle-runner", "overrun")
    assert status["segments"][0]["kaggle_status"] == "CANCEL_ACKNOWLEDGED"
    assert status["state"] == "stopped" and "max_segments" in status["reason"]


def _launch_while_both_gpu_sessions_are_busy(emulator, monkeypatch, release: Path):
    """The user's other notebooks hold both GPU sessions until `release` exists; launch reaches its refusal."""
    blocker = f"import pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists():\n    time.sleep(0.2)\n"
    api = official_client(emulator.url, monkeypatch)
    for name in ("one", "two"):
        assert not api.kernels_push(str(write_kernel(release.parent / name, blocker, slug=f"other-{name}",
                                                     title=f"Other {name}"))).error
    process = start_launcher("launch", "--name", "waits", *sets([*STUB_CHAIN, "max_steps=5"]))
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "Maximum batch GPU session count of 2 reached" in line:
            break
    assert "Waiting for one of your GPU sessions to end" in seen[-1], "".join(seen)
    assert process.poll() is None and run_status(".kaggle-runner", "waits")["state"] == "running"
    return process


def test_a_push_waits_while_both_gpu_sessions_are_busy(stub_project, emulator, monkeypatch, tmp_path):
    process = _launch_while_both_gpu_sessions_are_busy(emulator, monkeypatch, tmp_path / "release")
    (tmp_path / "release").touch()
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0, rest
    status = run_status(".kaggle-runner", "waits")
    assert status["state"] == "complete" and [s["kernel_version"] for s in status["segments"]] == [1]


def test_cancel_stops_a_launch_waiting_for_a_gpu_session(stub_project, emulator, monkeypatch, tmp_path, cli_runner):
    process = _launch_while_both_gpu_sessions_are_busy(emulator, monkeypatch, tmp_path / "release")
    cancelled = cli_runner.invoke(cli, ["cancel", "waits"])
    assert cancelled.exit_code == 0 and "no kernel version was running" in cancelled.output, cancelled.output
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 5 and "Run waits was cancelled." in rest, rest
    assert run_status(".kaggle-runner", "waits")["state"] == "cancelled"
    assert SLUG not in {k.slug for k in emulator.backend.kernels.values()}  # nothing pushed
    (tmp_path / "release").touch()


def test_status_reads_while_another_process_follows(stub_project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "followed", "--detach", *sets(STUB_CHAIN)])
    assert result.exit_code == 0, result.output
    follower = start_launcher("watch", "followed")
    seen = set()
    while follower.poll() is None:
        status = cli_runner.invoke(cli, ["status", "followed", "--json"])
        assert status.exit_code == 0, status.output
        seen.add(json.loads(status.output)["state"])
        time.sleep(0.3)
    assert follower.returncode == 0, follower.stdout.read()
    assert "running" in seen and run_status(".kaggle-runner", "followed")["state"] == "complete"


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


def test_launcher_killed_at_every_transition_resumes_without_duplicates(stub_project, emulator):
    points = ["before_push", "after_push", "after_end", "mid_download", "before_upload", "after_upload"]
    env = {"KAGGLE_RUNNER_TEST_KILL_AT": ",".join(points)}
    result = launcher("launch", "--name", "killed", *sets([*STUB_CHAIN, "max_steps=30"]), env=env)
    kills = 0
    while result.returncode == -9:
        kills += 1
        assert kills <= len(points), result.stdout + result.stderr
        result = launcher("watch", "killed", env=env)  # the dead driver's lease is taken over at once
    assert result.returncode == 0, result.stdout + result.stderr
    assert kills == len(points)
    assert sorted(Path(".kaggle-runner/kill-points-fired").read_text().split()) == sorted(points)
    status = run_status(".kaggle-runner", "killed")
    assert status["state"] == "complete"
    versions = [s["kernel_version"] for s in status["segments"]]
    assert versions == list(range(1, len(versions_of(emulator)) + 1))  # no version pushed twice
    assert len(emulator.backend.get_dataset(USER, f"{SLUG}-ckpt").versions) == len(versions) - 1  # nor uploaded
    assert final_stub_weight(stub_project / "outputs/killed", 30) == stub_weight(30)


@pytest.mark.parametrize("kill_at", ["before_push", "before_upload"])
def test_two_watchers_at_once_make_one_driver(stub_project, emulator, kill_at):
    """A run left in `pushing` (or `resume_downloaded`) by a dead launcher; two `watch` start together."""
    result = launcher("launch", "--name", "twice", *sets([*STUB_CHAIN, "max_steps=30"]),
                      env={"KAGGLE_RUNNER_TEST_KILL_AT": kill_at})
    assert result.returncode == -9, result.stdout + result.stderr
    assert run_status(".kaggle-runner", "twice")["segments"][-1]["phase"] == \
        {"before_push": "pushing", "before_upload": "resume_downloaded"}[kill_at]
    watchers = [start_launcher("watch", "twice") for _ in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in watchers]
    assert [w.returncode for w in watchers] == [0, 0], outputs
    assert sum("following it read-only" in out for out in outputs) >= 1, outputs
    status = run_status(".kaggle-runner", "twice")
    assert status["state"] == "complete"
    versions = [s["kernel_version"] for s in status["segments"]]
    assert versions == list(range(1, len(versions_of(emulator)) + 1))  # one kernel version per segment
    assert len(emulator.backend.get_dataset(USER, f"{SLUG}-ckpt").versions) == len(versions) - 1  # one per resume
    assert final_stub_weight(stub_project / "outputs/twice", 30) == stub_weight(30)
