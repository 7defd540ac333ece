"""The chain's drivers with the stub kernel: cancel by session id, the launcher's own deadline, waiting for a GPU
session, a launcher killed at every transition, and two watchers that must make one driver."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.run_views import run_status
from tests.chain_helpers import SLUG, STUB_CHAIN, final_stub_weight, launcher, sets, start_launcher, stub_weight
from tests.emulator_helpers import USER, admin, eventually, official_client, write_kernel

pytestmark = pytest.mark.slow


def versions_of(emulator, slug: str = SLUG) -> list:
    return emulator.backend.get_kernel(USER, slug).versions


def test_cancel_stops_the_version_by_its_session_id(stub_project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "long", "--detach", *sets(
        [*STUB_CHAIN, "max_steps=1000", "segment_steps=1000", 'sample_prompt="stub: step=0.5"'])])
    assert result.exit_code == 0, result.output
    follower = start_launcher("watch", "long")
    # the driver learns the session id from the kernel's session event
    eventually(lambda: run_status(".kaggle-runner", "long")["segments"][0]["session_id"], what="a session id")
    cancelled = cli_runner.invoke(cli, ["cancel", "long"])
    assert cancelled.exit_code == 0 and "Cancelled run long and its kernel version 1" in cancelled.output, \
        cancelled.output
    out, _ = follower.communicate(timeout=60)
    assert "was cancelled" in out, out
    eventually(lambda: versions_of(emulator)[0].status == "CANCEL_ACKNOWLEDGED", what="the cancel")


def test_a_refused_cancel_says_where_to_stop_the_version(stub_project, cli_runner, emulator):
    admin(emulator.url, "realism", {"cancel_refused": True})
    result = cli_runner.invoke(cli, ["launch", "--name", "stuck", "--detach", *sets(
        [*STUB_CHAIN, "max_steps=1000", "segment_steps=1000", 'sample_prompt="stub: step=0.5"'])])
    assert result.exit_code == 0, result.output
    cancelled = cli_runner.invoke(cli, ["cancel", "stuck"])
    assert cancelled.exit_code == 1, cancelled.output  # it could not: not a success
    assert "did not stop version 1" in cancelled.output and emulator.url in cancelled.output
    assert "kaggle.com" not in cancelled.output  # an emulator's version has no page there
    admin(emulator.url, "realism", {"cancel_refused": False})
    again = cli_runner.invoke(cli, ["cancel", "stuck"])  # a cancelled run whose version runs on: try again
    assert again.exit_code == 0 and "Cancelled run stuck and its kernel version 1" in again.output, again.output
    eventually(lambda: versions_of(emulator)[0].status == "CANCEL_ACKNOWLEDGED", what="the cancel")


def test_cancel_stops_a_detached_run_that_nobody_follows(stub_project, cli_runner, emulator):
    result = cli_runner.invoke(cli, ["launch", "--name", "alone", "--detach", *sets(
        [*STUB_CHAIN, "max_steps=1000", "segment_steps=1000", 'sample_prompt="stub: step=0.5"'])])
    assert result.exit_code == 0, result.output
    cancelled = cli_runner.invoke(cli, ["cancel", "alone"])  # no driver ever read the kernel's session event
    assert cancelled.exit_code == 0 and "Cancelled run alone and its kernel version 1" in cancelled.output, \
        cancelled.output
    eventually(lambda: versions_of(emulator)[0].status == "CANCEL_ACKNOWLEDGED", what="the cancel")
    assert run_status(".kaggle-runner", "alone")["state"] == "cancelled"


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


def _launch_while_gpu_sessions_are_held(emulator, monkeypatch, release: Path,
                                        blockers: tuple[str, ...] = ("one", "two"),
                                        refusal: str = "Maximum batch GPU session count of 2 reached"):
    """The user's other notebooks hold GPU sessions until `release` exists; launch reaches its refusal."""
    blocker = f"import pathlib, time\nwhile not pathlib.Path({str(release)!r}).exists():\n    time.sleep(0.2)\n"
    api = official_client(emulator.url, monkeypatch)
    for name in blockers:
        assert not api.kernels_push(str(write_kernel(release.parent / name, blocker, slug=f"other-{name}",
                                                     title=f"Other {name}"))).error
    process = start_launcher("launch", "--name", "waits", *sets([*STUB_CHAIN, "max_steps=5"]))
    seen = []
    for line in process.stdout:
        seen.append(line)
        if refusal in line:
            break
    assert "Waiting for one of your GPU sessions to end" in seen[-1], "".join(seen)
    assert process.poll() is None and run_status(".kaggle-runner", "waits")["state"] == "running"
    return process


def test_a_push_waits_while_both_gpu_sessions_are_busy(stub_project, emulator, monkeypatch, tmp_path):
    process = _launch_while_gpu_sessions_are_held(emulator, monkeypatch, tmp_path / "release")
    (tmp_path / "release").touch()
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0, rest
    status = run_status(".kaggle-runner", "waits")
    assert status["state"] == "complete" and [s["kernel_version"] for s in status["segments"]] == [1]


def test_a_push_waits_while_running_sessions_hold_back_the_weeks_quota(stub_project, emulator, monkeypatch,
                                                                       tmp_path):
    # One running session holds back its 12 h limit minus its elapsed time: past a 6 h week, a new session
    # is refused until it ends. A wait, not a stop until the weekly reset.
    admin(emulator.url, "realism", {"weekly_gpu_seconds": 6 * 3600})
    process = _launch_while_gpu_sessions_are_held(emulator, monkeypatch, tmp_path / "release", ("one",),
                                                  "projected to exceed maximum weekly GPU quota")
    (tmp_path / "release").touch()
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0, rest
    assert run_status(".kaggle-runner", "waits")["state"] == "complete"


def test_cancel_stops_a_launch_waiting_for_a_gpu_session(stub_project, emulator, monkeypatch, tmp_path, cli_runner):
    process = _launch_while_gpu_sessions_are_held(emulator, monkeypatch, tmp_path / "release")
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
        with contextlib.suppress(subprocess.TimeoutExpired):
            follower.wait(timeout=0.3)  # a look at `status` every 0.3 s while the follower lives
    assert follower.returncode == 0, follower.stdout.read()
    assert "running" in seen and run_status(".kaggle-runner", "followed")["state"] == "complete"


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


def test_a_first_push_kaggle_does_not_show_yet_is_not_pushed_again(stub_project, emulator):
    # Kaggle shows neither the kernel nor the version's run for a while after the first push; the launcher
    # dies right after pushing, before recording the version, and `watch` starts while Kaggle still says 403.
    admin(emulator.url, "realism", {"kernel_404_window": 12.0, "status_404_window": 12.0})
    result = launcher("launch", "--name", "unseen", *sets([*STUB_CHAIN, "max_steps=10"]),
                      env={"KAGGLE_RUNNER_TEST_KILL_AT": "after_push"})
    assert result.returncode == -9, result.stdout + result.stderr
    result = launcher("watch", "unseen")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(versions_of(emulator)) == 1  # one kernel version for the one segment
    assert "was sent before an interruption and Kaggle does not show it yet" in result.stderr, result.stderr
    status = run_status(".kaggle-runner", "unseen")
    assert status["state"] == "complete" and [s["kernel_version"] for s in status["segments"]] == [1]


def test_a_push_that_landed_but_answered_503_is_looked_for_not_pushed_again(stub_project, emulator):
    """The push took effect, then the answer was a 503, and GetKernel does not show the version yet: pushing
    again would start a second session. The launcher waits for the version instead, and finds its run."""
    admin(emulator.url, "realism", {"kernel_404_window": 8.0})
    admin(emulator.url, "faults", {"fail_after": {"SaveKernel": [503]}})
    result = launcher("launch", "--name", "landed", *sets([*STUB_CHAIN, "max_steps=10"]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "may have landed; looking for it before pushing again" in result.stderr, result.stderr
    assert len(versions_of(emulator)) == 1
    status = run_status(".kaggle-runner", "landed")
    assert status["state"] == "complete" and [s["kernel_version"] for s in status["segments"]] == [1]


def test_a_launcher_killed_while_the_dataset_settles_sleeps_the_rest_before_pushing(stub_project, emulator):
    from kaggle_runner.store import Store

    chain = [*STUB_CHAIN, "dataset_settle_seconds=10"]
    result = launcher("launch", "--name", "settling", *sets(chain), env={"KAGGLE_RUNNER_TEST_KILL_AT": "mid_settle"})
    assert result.returncode == -9, result.stdout + result.stderr
    settle_until = Store(".kaggle-runner").segments("settling")[0].next_try_at
    assert settle_until is not None
    result = launcher("watch", "settling")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "more (the settle was interrupted)" in result.stdout, result.stdout
    first, second = Store(".kaggle-runner").segments("settling")
    assert second.pushed_at >= first.next_try_at == settle_until  # never pushed before the settle ended
    assert final_stub_weight(stub_project / "outputs/settling", 20) == stub_weight(20)


# -- the lease's identity --------------------------------------------------------------------------------------
def _lease_held_elsewhere(store, run: str, pid: int, pid_ns: str, token: str = "another-process") -> None:
    """A lease as another launcher writes it: in a container with our hostname, say, whose pids are its own."""
    from kaggle_runner.store import this_host

    with store.write() as db:
        now = time.time()
        db.execute("INSERT OR REPLACE INTO drivers (run, pid, host, started_at, heartbeat, token, pid_ns) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (run, pid, this_host(), now, now, token, pid_ns))


def test_a_lease_with_our_pid_and_host_but_another_token_is_not_ours(tmp_path):
    import os

    from kaggle_runner.store import Store, pid_namespace

    store = Store(tmp_path / "ws")
    # The same pid on the same hostname: a container's launcher (pids start again at 1 there) or a reused pid.
    _lease_held_elsewhere(store, "run", os.getpid(), pid_namespace())
    assert store.heartbeat("run") is False  # not renewed as if it were ours
    store.release_driver("run")  # nor released
    holder = store.acquire_driver("run")
    assert holder is not None and holder.token == "another-process"  # nor taken: its holder beats
    assert store.driver("run") is not None
    # Our own lease is renewed and released by its token.
    assert store.acquire_driver("mine") is None and store.heartbeat("mine") is True
    store.release_driver("mine")
    assert store.driver("mine") is None


def test_a_gone_pid_frees_a_lease_at_once_only_in_our_pid_namespace(tmp_path):
    import subprocess
    import sys

    from kaggle_runner.store import Store, pid_namespace

    store = Store(tmp_path / "ws")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # a process that has exited: its pid is free here
    _lease_held_elsewhere(store, "here", pid, pid_namespace())
    assert store.driver("here") is None  # our namespace, pid gone: taken over at once, as before
    _lease_held_elsewhere(store, "container", pid, "pid:[1]")
    assert store.driver("container") is not None  # another namespace: only a stale heartbeat frees it
    with store.write() as db:
        db.execute("UPDATE drivers SET heartbeat = heartbeat - 120 WHERE run = 'container'")
    assert store.driver("container") is None
