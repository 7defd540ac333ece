"""The emulator, driven by the unmodified official kaggle client."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from kaggle_runner.config import load_preset
from kaggle_runner.emulator.clock import ManualClock
from kaggle_runner.emulator.server import EmulatorServer, port_free
from kaggle_runner.render import render_kernel
from tests.emulator_helpers import (
    KEY,
    USER,
    admin,
    eventually,
    official_client,
    outputs,
    quick_realism,
    status_of,
    wait_for,
    write_dataset,
    write_kernel,
)


@pytest.fixture
def emulator(tmp_path):
    with EmulatorServer(tmp_path / "emu", username=USER, key=KEY, session_limit=60, kill_grace_seconds=2,
                        realism=quick_realism(), clock=ManualClock()) as server:
        yield server


@pytest.fixture
def api(emulator, monkeypatch):
    return official_client(emulator.url, monkeypatch, clock=emulator.clock)


def _signal(emulator, slug: str = "hello-kernel", version: int = 1, name: str = "go") -> None:
    """Tell a kernel written with WAIT_FOR_GO to finish: the file it waits for, in its working directory."""
    (emulator.backend.kernel_dir(USER, slug, version) / "working" / name).touch()


# A kernel that runs until the test says so: its session lasts exactly the emulator time the test lets pass.
WAIT_FOR_GO = "import pathlib, time\nwhile not pathlib.Path('go').exists():\n    time.sleep(0.02)\n"


HELLO = """
import os, pathlib
print("hello from the kernel")
pathlib.Path("result.txt").write_text("42")
pathlib.Path("sub").mkdir()
pathlib.Path("sub/data.bin").write_bytes(os.urandom(300_000))
"""


def test_push_status_output_and_logs(api, emulator, tmp_path, capsys):
    folder = write_kernel(tmp_path / "k", HELLO)
    pushed = api.kernels_push(str(folder), timeout="30")
    assert pushed.version_number == 1 and not pushed.error
    assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"
    outputs(api, f"{USER}/hello-kernel", tmp_path / "out")
    assert (tmp_path / "out/result.txt").read_text() == "42"
    assert (tmp_path / "out/sub/data.bin").stat().st_size == 300_000
    log = json.loads((tmp_path / "out/hello-kernel.log").read_text())
    assert "runs on this machine's CPU" in log[0]["data"]
    assert any("hello from the kernel" in event["data"] for event in log)
    assert "hello from the kernel" in api.kernels_logs(f"{USER}/hello-kernel")
    api.kernels_logs_cli(f"{USER}/hello-kernel", follow=True)
    assert "hello from the kernel" in capsys.readouterr().out
    again = api.kernels_push(str(folder))
    assert again.version_number == 2


def test_follow_streams_a_running_version_until_it_ends(api, emulator, tmp_path, capsys):
    code = "for i in range(4):\n    print('tick', i, flush=True)\n" + WAIT_FOR_GO
    api.kernels_push(str(write_kernel(tmp_path / "k", code)))
    version = emulator.backend.get_kernel(USER, "hello-kernel").versions[0]
    eventually(lambda: "tick 3" in api.kernels_logs(f"{USER}/hello-kernel"), what="the ticks")
    assert version.status == "RUNNING"  # following a version that still runs, not an ended one's log
    ticking = threading.Event()

    def finish_later() -> None:  # the session ends while the client follows: outputs upload, the log ends
        _signal(emulator)
        while not ticking.wait(0.05):
            emulator.clock.advance(0.25)

    threading.Thread(target=finish_later, daemon=True).start()
    try:
        api.kernels_logs_cli(f"{USER}/hello-kernel", follow=True)
    finally:
        ticking.set()
    out = capsys.readouterr().out
    assert all(f"tick {i}" in out for i in range(4))
    assert api.kernels_status(f"{USER}/hello-kernel").status.name == "COMPLETE"


def test_rendered_kernel_metadata_passes_the_clients_checks(api, tmp_path):
    for kernel_type in ("script", "notebook"):
        config = load_preset("tiny", [f'kernel_type="{kernel_type}"', "max_steps=1"])
        rendered = render_kernel(config, tmp_path / kernel_type, USER)
        response = api.kernels_push(str(rendered.folder), no_run=True)
        assert not response.error and response.version_number >= 1


def test_kernel_reads_an_attached_dataset(api, emulator, tmp_path):
    write_dataset(tmp_path / "ds", "my-dataset", {"numbers.txt": b"1 2 3"})
    created = api.dataset_create_new(str(tmp_path / "ds"), quiet=True)
    assert created.status == "ok", created.error
    emulator.clock.advance(emulator.backend.realism.pin_window + 0.01)  # a brand-new dataset: not mountable at once
    code = ("import os, pathlib\nroot = pathlib.Path(os.environ['KAGGLE_RUNNER_INPUT_DIR'])\n"
            "print('read:', (root / 'datasets/alice/my-dataset/numbers.txt').read_text())\n")
    api.kernels_push(str(write_kernel(tmp_path / "k", code, dataset_sources=[f"{USER}/my-dataset"])))
    assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"
    assert "read: 1 2 3" in api.kernels_logs(f"{USER}/hello-kernel")
    version = emulator.backend.kernel_dir(USER, "hello-kernel", 1)
    assert (version / "working").is_dir() and not (version / "input").exists()  # a session's inputs end with it


def test_dataset_create_version_status_and_delete_old_versions(api, emulator, tmp_path):
    admin(emulator.url, "faults", {"dataset_delay": 0.6})
    folder = write_dataset(tmp_path / "ds", "ckpt-dataset", {"a.bin": b"a" * 1000})
    assert api.dataset_create_new(str(folder), quiet=True).status == "ok"
    emulator.clock.advance(emulator.backend.realism.dataset_404_window + 0.01)
    assert api.dataset_status(f"{USER}/ckpt-dataset") != "ready"
    emulator.clock.advance(0.41)
    assert api.dataset_status(f"{USER}/ckpt-dataset") == "ready"
    again = api.dataset_create_new(str(folder), quiet=True)
    assert "already in use" in again.error
    (folder / "a.bin").write_bytes(b"b" * 2000)
    assert api.dataset_create_version(str(folder), "v2", quiet=True, delete_old_versions=True).status == "ok"
    root = emulator.backend.data_dir / "datasets" / USER / "ckpt-dataset"
    assert not (root / "v1").exists() and (root / "v2" / "a.bin").stat().st_size == 2000
    emulator.clock.advance(emulator.backend.realism.dataset_404_window + 0.01)
    listed = api.dataset_list_files(f"{USER}/ckpt-dataset")  # the client's own `datasets files`
    assert [(f.name, f.total_bytes) for f in listed.dataset_files] == [("a.bin", 2000)]


def test_bad_key_gets_401_and_no_credentials_on_disk(emulator, monkeypatch, tmp_path):
    api = official_client(emulator.url, monkeypatch, key="wrong-key")
    with pytest.raises(requests.HTTPError) as error:
        api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    assert error.value.response.status_code == 401
    with pytest.raises(ValueError) as denied:  # status, output and logs turn 401/403 into this
        api.kernels_status(f"{USER}/anything")
    assert "Permission 'kernels.get' was denied" in str(denied.value)
    good = official_client(emulator.url, monkeypatch, clock=emulator.clock)
    good.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    wait_for(good, f"{USER}/hello-kernel")
    for path in emulator.backend.data_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_session_over_its_limit_is_stopped_and_keeps_its_files(api, emulator, tmp_path):
    admin(emulator.url, "realism", {"sigterm_before_kill": True})
    code = ("import signal, sys, time, pathlib\n"
            "pathlib.Path('partial.txt').write_text('half')\n"
            "def bye(*a):\n    pathlib.Path('got_sigterm.txt').write_text('yes'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\nprint('started', flush=True)\ntime.sleep(60)\n")
    api.kernels_push(str(write_kernel(tmp_path / "k", code)), timeout="2")
    assert wait_for(api, f"{USER}/hello-kernel", timeout=30) == "CANCEL_ACKNOWLEDGED"
    status = api.kernels_status(f"{USER}/hello-kernel")
    assert status.failure_message == ("Your notebook was stopped because it exceeded the max allowed "
                                      "execution duration.")
    outputs(api, f"{USER}/hello-kernel", tmp_path / "out")
    assert (tmp_path / "out/partial.txt").exists() and (tmp_path / "out/got_sigterm.txt").exists()


def test_ignoring_sigterm_gets_sigkill_after_the_grace_period(api, emulator, tmp_path):
    admin(emulator.url, "realism", {"sigterm_before_kill": True})
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"
    api.kernels_push(str(write_kernel(tmp_path / "k", code)), timeout="1")
    assert wait_for(api, f"{USER}/hello-kernel", timeout=60) == "CANCEL_ACKNOWLEDGED"
    assert emulator.backend.get_kernel(USER, "hello-kernel").versions[0].exit_code == -9  # SIGKILL, not SIGTERM


def test_errors_show_the_failure_message(api, tmp_path):
    api.kernels_push(str(write_kernel(tmp_path / "k", "raise SystemExit(3)\n")))
    assert wait_for(api, f"{USER}/hello-kernel") == "ERROR"
    assert "exited with code 3" in api.kernels_status(f"{USER}/hello-kernel").failure_message


def test_restart_keeps_state_and_reports_interrupted_versions_as_error(tmp_path, monkeypatch):
    data = tmp_path / "emu"
    with EmulatorServer(data, username=USER, key=KEY, realism=quick_realism(), clock=ManualClock()) as first:
        api = official_client(first.url, monkeypatch, clock=first.clock)
        api.kernels_push(str(write_kernel(tmp_path / "a", HELLO, slug="done-kernel", title="Done Kernel")))
        wait_for(api, f"{USER}/done-kernel")
        api.kernels_push(str(write_kernel(tmp_path / "b", WAIT_FOR_GO)))
        running = first.backend.get_kernel(USER, "hello-kernel").versions[0]
        eventually(lambda: running.status == "RUNNING")
        later = first.clock() + 60
    with EmulatorServer(data, username=USER, key=KEY, realism=quick_realism(), clock=ManualClock(later)) as second:
        api = official_client(second.url, monkeypatch, clock=second.clock)
        assert api.kernels_status(f"{USER}/done-kernel").status.name == "COMPLETE"
        interrupted = api.kernels_status(f"{USER}/hello-kernel")
        assert interrupted.status.name == "ERROR" and "emulator stopped" in interrupted.failure_message
        assert api.kernels_push(str(write_kernel(tmp_path / "a", HELLO, slug="done-kernel",
                                                 title="Done Kernel"))).version_number == 2


def test_injected_faults_reach_the_client_as_kaggle_shows_them(api, emulator, tmp_path):
    folder = write_kernel(tmp_path / "k", HELLO)
    admin(emulator.url, "faults", {"fail": {"SaveKernel": [429], "GetKernelSessionStatus": [500, 503]}})
    with pytest.raises(requests.HTTPError) as error:  # the client never retries a push
        api.kernels_push(str(folder))
    assert error.value.response.status_code == 429
    api.kernels_push(str(folder))
    for expected in (500, 503):
        with pytest.raises(requests.HTTPError) as error:
            api.kernels_status(f"{USER}/hello-kernel")
        assert error.value.response.status_code == expected
    assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"

    # StartBlobUpload and CreateDataset are retried by the client itself on 429.
    admin(emulator.url, "faults", {"fail": {"StartBlobUpload": [429], "CreateDataset": [429]}})
    folder = write_dataset(tmp_path / "ds", "fault-dataset", {"x.bin": b"x" * 5000})
    assert api.dataset_create_new(str(folder), quiet=True).status == "ok"

    # A download dropped halfway is resumed with a Range request and ends complete.
    outputs(api, f"{USER}/hello-kernel", tmp_path / "first")  # waits out the listing lag
    admin(emulator.url, "faults", {"drop_downloads": 1})
    api.kernels_output(f"{USER}/hello-kernel", str(tmp_path / "out"), file_pattern="data.bin")
    assert (tmp_path / "out/sub/data.bin").stat().st_size == 300_000

    # An upload answered 503 is INCOMPLETE to the client, which resumes it.
    admin(emulator.url, "faults", {"fail": {"UploadBlob": [503]}})
    folder = write_dataset(tmp_path / "ds2", "upload-dataset", {"y.bin": b"y" * 4000})
    assert api.dataset_create_new(str(folder), quiet=True).status == "ok"


def test_held_queue_keeps_versions_queued(api, emulator, tmp_path):
    admin(emulator.url, "faults", {"hold_queued": True})
    api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    emulator.clock.advance(3600)  # an hour later, still queued
    assert status_of(api, f"{USER}/hello-kernel") == "QUEUED"
    admin(emulator.url, "faults", {"hold_queued": False})
    assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"


def test_a_third_gpu_session_is_refused_with_kaggles_message(api, emulator, tmp_path):
    sleeper = "import time\ntime.sleep(60)\n"
    for name in ("one", "two"):
        folder = write_kernel(tmp_path / name, sleeper, slug=f"gpu-{name}", title=f"GPU {name}")
        assert not api.kernels_push(str(folder)).error
    third = api.kernels_push(str(write_kernel(tmp_path / "three", sleeper, slug="gpu-three", title="GPU three")))
    assert third.error == "Maximum batch GPU session count of 2 reached."
    assert "gpu-three" not in {k.slug for k in emulator.backend.kernels.values()}  # nothing was created
    cpu = write_kernel(tmp_path / "cpu", HELLO, slug="cpu-kernel", title="CPU Kernel", enable_gpu=False)
    assert not api.kernels_push(str(cpu)).error  # CPU sessions don't count against the GPU limit
    emulator.backend.runner.cancel(*emulator.backend.get_version(USER, "gpu-one", None))
    eventually(lambda: emulator.backend.gpu_sessions_in_use() < 2, clock=emulator.clock, what="a freed session")
    assert not api.kernels_push(str(tmp_path / "three")).error  # a freed session takes the push


def test_quota_counts_gpu_time(api, emulator, tmp_path, capsys):
    api.kernels_push(str(write_kernel(tmp_path / "k", WAIT_FOR_GO)))
    eventually(lambda: emulator.backend.get_kernel(USER, "hello-kernel").versions[0].started_at)
    emulator.clock.advance(3600)  # an hour of session
    _signal(emulator)
    wait_for(api, f"{USER}/hello-kernel")
    quota = api.quota_view()
    assert quota.gpu_quota.time_used.total_seconds() >= 3600
    assert quota.gpu_quota.total_time_allowed.total_seconds() == 30 * 3600
    api.quota_view_cli(csv_display=True)
    assert "30.00h" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0 or not port_free(80), reason="needs to bind localhost:80 (root, port free)")
def test_official_cli_with_localhost_environment(tmp_path):
    with EmulatorServer(tmp_path / "emu", username=USER, key=KEY, port=80):
        env = {**os.environ, "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "KAGGLE_USERNAME": USER, "KAGGLE_KEY": KEY,
               "NO_PROXY": "127.0.0.1,localhost"}
        folder = write_kernel(tmp_path / "k", HELLO)
        kaggle_cli = [sys.executable, "-m", "kaggle.cli"]
        pushed = subprocess.run([*kaggle_cli, "kernels", "push", "-p", str(folder)], env=env,
                                capture_output=True, text=True, timeout=60)
        assert "Kernel version 1 successfully pushed" in pushed.stdout, pushed.stdout + pushed.stderr
        status = eventually(lambda: next((out for out in [subprocess.run(
            [*kaggle_cli, "kernels", "status", f"{USER}/hello-kernel"], env=env, capture_output=True, text=True,
            timeout=60).stdout] if "COMPLETE" in out), None), what="a COMPLETE status")
        assert 'has status "KernelWorkerStatus.COMPLETE"' in status


def test_concurrent_clients_are_safe(api, emulator, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    wait_for(api, f"{USER}/hello-kernel")
    outputs(api, f"{USER}/hello-kernel", tmp_path / "first")

    def work(i: int):
        if i % 3 == 0:
            folder = write_dataset(tmp_path / f"ds{i}", f"dataset-{i:03d}", {"f.bin": bytes([i]) * 2000})
            return api.dataset_create_new(str(folder), quiet=True).status
        if i % 3 == 1:
            return api.kernels_status(f"{USER}/hello-kernel").status.name
        return len(api.kernels_output(f"{USER}/hello-kernel", str(tmp_path / f"out{i}"))[0])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(24)))
    assert results[0::3] == ["ok"] * 8 and set(results[1::3]) == {"COMPLETE"} and len(set(results[2::3])) == 1
    assert len(emulator.backend.datasets) == 8
    json.loads((emulator.backend.data_dir / "state.json").read_text())


# -- Kaggle's unkindness, on by default (Realism), each behaviour with its knob ---------------------------
READ_INPUTS = ("import os, pathlib\nroot = pathlib.Path(os.environ['KAGGLE_RUNNER_INPUT_DIR'])\n"
               "for p in sorted(root.rglob('*')):\n"
               "    if p.is_file():\n        print('input:', p.relative_to(root).as_posix(), p.read_text())\n")


def _inputs(api, ref: str) -> dict[str, str]:
    assert wait_for(api, ref) == "COMPLETE"
    lines = [e["data"].strip() for e in json.loads(api.kernels_logs(ref)) if e["data"].startswith("input: ")]
    return dict(line.removeprefix("input: ").split(" ", 1) for line in lines)


def _cancel(api, session_id: int) -> str:
    from kagglesdk.kernels.types.kernels_api_service import ApiCancelKernelSessionRequest

    request = ApiCancelKernelSessionRequest()
    request.kernel_session_id = session_id
    with api.build_kaggle_client() as kaggle:
        return kaggle.kernels.kernels_api_client.cancel_kernel_session(request).error_message


def test_realism_is_on_by_default_and_off_is_kind(tmp_path):
    from kaggle_runner.emulator.realism import Realism

    with EmulatorServer(tmp_path / "emu", username=USER, key=KEY) as server:
        assert server.backend.realism == Realism()
        assert Realism().rate_limit and Realism().pin_window and Realism().never_pushed_403
        values = admin(server.url, "realism", {"status_404_window": 0.25, "mount_layout": "slug"})
        assert values["status_404_window"] == 0.25 and values["mount_layout"] == "slug" and "pin_window" in values
        for bad in ({"mount_layout": "x"}, {"rate_limit": -1}, {"no_gpu": "yes"}, {"nonsense": 1}):
            response = requests.post(f"{server.url}/admin/realism", json=bad, auth=(USER, KEY), timeout=10)
            assert response.status_code == 400 and server.backend.realism.mount_layout == "slug"
    off = Realism.off()
    assert (off.rate_limit, off.pin_window, off.output_lag, off.weekly_gpu_seconds, off.mount_layout,
            off.sigterm_before_kill, off.never_pushed_403) == (0, 0, 0, 0, "datasets", True, False)


def test_kind_emulator_answers_at_once(tmp_path, monkeypatch):
    from kaggle_runner.emulator.realism import Realism

    with EmulatorServer(tmp_path / "emu", username=USER, key=KEY, realism=Realism.off()) as server:
        api = official_client(server.url, monkeypatch)
        write_dataset(tmp_path / "ds", "my-dataset", {"n.txt": b"1"})
        api.dataset_create_new(str(tmp_path / "ds"), quiet=True)
        assert api.dataset_status(f"{USER}/my-dataset") == "ready"
        api.kernels_push(str(write_kernel(tmp_path / "k", READ_INPUTS, dataset_sources=[f"{USER}/my-dataset"])))
        assert api.kernels_status(f"{USER}/hello-kernel").status.name in ("QUEUED", "RUNNING", "COMPLETE")
        assert _inputs(api, f"{USER}/hello-kernel") == {"datasets/alice/my-dataset/n.txt": "1"}
        files, _ = api.kernels_output(f"{USER}/hello-kernel", str(tmp_path / "out"))
        assert len(files) == 1  # only the log: the kernel wrote nothing, and nothing lags


def test_a_push_right_after_a_dataset_version_mounts_the_previous_one(api, emulator, tmp_path):
    folder = write_dataset(tmp_path / "ds", "my-dataset", {"n.txt": b"one"})
    api.dataset_create_new(str(folder), quiet=True)
    kernel = write_kernel(tmp_path / "k", READ_INPUTS, dataset_sources=[f"{USER}/my-dataset"])
    api.kernels_push(str(kernel))  # a brand-new dataset: not mountable yet
    assert _inputs(api, f"{USER}/hello-kernel") == {}
    emulator.clock.advance(emulator.backend.realism.pin_window + 0.01)
    (folder / "n.txt").write_text("two")
    assert api.dataset_create_version(str(folder), "v2", quiet=True).status == "ok"
    with pytest.raises(requests.HTTPError) as missing:  # a new version answers 404 for a moment
        api.dataset_status(f"{USER}/my-dataset")
    assert missing.value.response.status_code == 404
    emulator.clock.advance(emulator.backend.realism.dataset_404_window + 0.01)
    assert api.dataset_status(f"{USER}/my-dataset") == "ready"  # "ready", yet a push now gets version 1
    pushed = emulator.clock()
    api.kernels_push(str(kernel))
    assert _inputs(api, f"{USER}/hello-kernel") == {"my-dataset/n.txt": "one"}  # version 2: <input>/<slug>/
    emulator.clock.advance(max(0.0, pushed + emulator.backend.realism.pin_window - emulator.clock()) + 0.01)
    api.kernels_push(str(kernel))
    assert _inputs(api, f"{USER}/hello-kernel") == {"datasets/alice/my-dataset/n.txt": "two"}
    admin(emulator.url, "realism", {"pin_window": 0, "dataset_404_window": 0})
    (folder / "n.txt").write_text("three")
    api.dataset_create_version(str(folder), "v3", quiet=True)
    assert api.dataset_status(f"{USER}/my-dataset") == "ready"
    api.kernels_push(str(kernel))
    assert _inputs(api, f"{USER}/hello-kernel") == {"my-dataset/n.txt": "three"}


def test_mount_layouts_and_archives(api, emulator, tmp_path):
    import gzip
    import io
    import zipfile

    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        archive.writestr("inner/a.txt", "zipped")
    write_dataset(tmp_path / "ds", "my-dataset", {"c.zip": packed.getvalue(), "g.txt.gz": gzip.compress(b"gz"),
                                                   "plain.txt": b"plain"})
    api.dataset_create_new(str(tmp_path / "ds"), quiet=True)
    emulator.clock.advance(emulator.backend.realism.pin_window + 0.01)
    kernel = write_kernel(tmp_path / "k", READ_INPUTS, dataset_sources=[f"{USER}/my-dataset"])
    api.kernels_push(str(kernel))
    assert _inputs(api, f"{USER}/hello-kernel") == {
        "datasets/alice/my-dataset/c/inner/a.txt": "zipped", "datasets/alice/my-dataset/g.txt": "gz",
        "datasets/alice/my-dataset/plain.txt": "plain"}
    api.kernels_push(str(kernel))  # "alternate": the next version sees the other layout
    assert set(_inputs(api, f"{USER}/hello-kernel")) == {"my-dataset/c/inner/a.txt", "my-dataset/g.txt",
                                                          "my-dataset/plain.txt"}
    admin(emulator.url, "realism", {"mount_layout": "datasets"})
    api.kernels_push(str(kernel))
    assert "datasets/alice/my-dataset/plain.txt" in _inputs(api, f"{USER}/hello-kernel")
    start = _rpc(emulator.url, "StartBlobUpload", {"name": "deep/sub/f.txt", "contentLength": 1},
                 service="blobs.BlobApiService").json()
    assert emulator.backend.blobs[start["token"]].name == "f.txt"  # blob uploads flatten sub-paths


def test_status_answers_no_runs_found_right_after_a_push(api, emulator, tmp_path):
    api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    with pytest.raises(requests.HTTPError) as early:
        api.kernels_status(f"{USER}/hello-kernel")
    assert early.value.response.status_code == 404 and "No runs found for this kernel" in str(early.value)
    realism = emulator.backend.realism
    emulator.clock.advance(realism.status_404_window + 0.01)
    assert status_of(api, f"{USER}/hello-kernel") == "NEW_SCRIPT"  # saved, not run yet: kagglesdk's seventh
    emulator.clock.advance(realism.new_script_window)
    assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"
    admin(emulator.url, "realism", {"status_404_window": 0})
    api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    assert api.kernels_status(f"{USER}/hello-kernel").status.name in ("NEW_SCRIPT", "QUEUED", "RUNNING", "COMPLETE")


def test_a_never_pushed_kernel_is_permission_denied(api, emulator, tmp_path):
    ref = f"{USER}/never-pushed"
    for call in (api.kernels_status, lambda r: api.kernels_output(r, str(tmp_path / "o")), api.kernels_logs):
        with pytest.raises(ValueError, match="Permission 'kernels.get' was denied"):
            call(ref)
    with pytest.raises(requests.HTTPError) as pull:
        api.kernels_pull(ref, str(tmp_path / "pulled"))
    assert pull.value.response.status_code == 403
    admin(emulator.url, "realism", {"never_pushed_403": False})
    with pytest.raises(requests.HTTPError) as missing:
        api.kernels_status(ref)
    assert missing.value.response.status_code == 404


def test_weekly_gpu_quota_refuses_gpu_pushes_and_quota_reports_reserved_time(api, emulator, tmp_path):
    def quota() -> dict:
        url = f"{emulator.url}/v1/kernels.KernelsApiService/GetAcceleratorQuotaStatistics"
        return requests.post(url, json={}, auth=(USER, KEY), timeout=10).json()["gpuQuota"]

    admin(emulator.url, "realism", {"weekly_gpu_seconds": 0.5})
    api.kernels_push(str(write_kernel(tmp_path / "k", WAIT_FOR_GO)))
    eventually(lambda: emulator.backend.get_kernel(USER, "hello-kernel").versions[0].started_at)
    emulator.clock.advance(1)
    running = quota()
    assert float(running["timeReserved"][:-1]) > 0 and running["totalTimeAllowed"] == "0.500s"
    _signal(emulator)
    wait_for(api, f"{USER}/hello-kernel")
    ended = quota()
    assert float(ended["timeUsed"][:-1]) >= 1 and float(ended["timeReserved"][:-1]) == 0
    refused = api.kernels_push(str(tmp_path / "k"))
    assert refused.error == "Maximum weekly GPU quota of 0.00 hours reached." and refused.version_number == 0
    cpu = write_kernel(tmp_path / "cpu", HELLO, slug="cpu-kernel", title="CPU Kernel", enable_gpu=False)
    assert not api.kernels_push(str(cpu)).error  # CPU sessions spend no GPU quota
    admin(emulator.url, "realism", {"quota_fields_absent": True})
    assert "timeReserved" not in quota()
    admin(emulator.url, "realism", {"weekly_gpu_seconds": 0})
    assert api.kernels_push(str(tmp_path / "k")).version_number == 2


def test_running_sessions_reserve_the_rest_of_their_limit_and_a_push_past_it_is_refused(api, emulator, tmp_path):
    """Field notes (2026-10-08): each running GPU session holds back its limit minus its elapsed time, and a
    push that would take the week past its quota counting those reserves is refused until one ends."""
    limit = emulator.backend.session_limit  # 60 s here, 12 h on Kaggle
    admin(emulator.url, "realism", {"weekly_gpu_seconds": 36})  # 0.01 h: more than used, less than reserved
    api.kernels_push(str(write_kernel(tmp_path / "k", WAIT_FOR_GO)))
    first = emulator.backend.get_version(USER, "hello-kernel", "v1")[1]
    eventually(lambda: first.started_at)
    emulator.clock.advance(10)
    url = f"{emulator.url}/v1/kernels.KernelsApiService/GetAcceleratorQuotaStatistics"
    gpu = requests.post(url, json={}, auth=(USER, KEY), timeout=10).json()["gpuQuota"]
    assert float(gpu["timeReserved"][:-1]) == pytest.approx(limit - 10, abs=0.5)  # its limit minus elapsed
    assert float(gpu["timeUsed"][:-1]) == pytest.approx(10, abs=0.5)
    other = write_kernel(tmp_path / "other", HELLO, slug="other-kernel", title="Other Kernel")
    refused = api.kernels_push(str(other))
    assert refused.version_number == 0 and refused.error == (
        "Session cannot start because currently running sessions are projected to exceed maximum weekly GPU "
        "quota of 0.01. Cancelling running sessions may allow starting new sessions.")
    _signal(emulator)
    wait_for(api, f"{USER}/hello-kernel")
    assert api.kernels_push(str(other)).version_number == 1  # the reserve went with the session


def test_a_new_version_does_not_stop_the_running_one(api, emulator, tmp_path):
    folder = write_kernel(tmp_path / "k", WAIT_FOR_GO, enable_gpu=False)
    api.kernels_push(str(folder))
    first = emulator.backend.get_version(USER, "hello-kernel", "v1")[1]
    eventually(lambda: first.status == "RUNNING")
    assert api.kernels_push(str(folder)).version_number == 2
    second = emulator.backend.get_version(USER, "hello-kernel", "v2")[1]
    eventually(lambda: second.status == "RUNNING")
    emulator.clock.advance(60)
    assert first.status == "RUNNING"
    for version in emulator.backend.get_kernel(USER, "hello-kernel").versions:
        emulator.runner.cancel(emulator.backend.get_kernel(USER, "hello-kernel"), version)


def test_rate_limit_answers_429_with_retry_after(api, emulator, tmp_path):
    admin(emulator.url, "realism", {"rate_limit": 5, "rate_window": 10})
    statuses = []
    for _ in range(8):
        response = requests.post(f"{emulator.url}/v1/kernels.KernelsApiService/ListKernels", json={},
                                 auth=(USER, KEY), timeout=10)
        statuses.append(response.status_code)
        assert requests.get(f"{emulator.url}/healthz", timeout=10).ok  # not counted
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 3
    assert int(response.headers["Retry-After"]) >= 1
    with pytest.raises(requests.HTTPError) as limited:  # reads included; the client does not retry them
        api.kernels_status(f"{USER}/hello-kernel")
    assert limited.value.response.status_code == 429
    admin(emulator.url, "realism", {"rate_limit": 0})
    assert all(requests.post(f"{emulator.url}/v1/kernels.KernelsApiService/ListKernels", json={},
                             auth=(USER, KEY), timeout=10).ok for _ in range(10))


def test_outputs_are_listed_only_after_the_upload_lag(api, emulator, tmp_path):
    admin(emulator.url, "realism", {"output_lag": 0.6})
    code = "import pathlib\npathlib.Path('early.txt').write_text('x')\n" + WAIT_FOR_GO
    api.kernels_push(str(write_kernel(tmp_path / "k", code, enable_gpu=False)))
    ref, backend = f"{USER}/hello-kernel", emulator.backend
    version = backend.get_kernel(USER, "hello-kernel").versions[0]
    eventually(lambda: (emulator.backend.kernel_dir(USER, "hello-kernel", 1) / "working/early.txt").exists())
    emulator.clock.advance(1)
    files, _ = api.kernels_output(ref, str(tmp_path / "running"))
    assert [Path(f).name for f in files] == ["hello-kernel.log"]  # nothing listed while it runs
    _signal(emulator)
    eventually(lambda: version.ended_at, what="the process's end")
    emulator.clock.advance(0.5)
    assert version.status == "RUNNING"  # the process ended; Kaggle is still uploading its outputs
    emulator.clock.advance(0.1)
    eventually(lambda: version.status == "COMPLETE")
    files, _ = api.kernels_output(ref, str(tmp_path / "lagging"))
    assert [Path(f).name for f in files] == ["hello-kernel.log"]  # terminal, and still not listed
    assert version.terminal_at - version.ended_at >= 0.6 - 1e-6  # (the clock's floats)
    emulator.clock.advance(0.6)
    files, _ = api.kernels_output(ref, str(tmp_path / "out"))
    assert (tmp_path / "out/early.txt").exists()
    admin(emulator.url, "realism", {"output_lag": 0, "status_404_window": 0})
    api.kernels_push(str(tmp_path / "k"))
    eventually(lambda: (emulator.backend.kernel_dir(USER, "hello-kernel", 2) / "working/early.txt").exists())
    _signal(emulator, version=2)
    assert wait_for(api, ref) == "COMPLETE"
    files, _ = api.kernels_output(ref, str(tmp_path / "at-once"))
    assert "early.txt" in {Path(f).name for f in files}


def test_cancel_takes_only_the_random_session_id_the_kernel_sees(api, emulator, tmp_path):
    code = "import os, time\nprint('container', os.environ['KAGGLE_CONTAINER_NAME'], flush=True)\ntime.sleep(30)\n"
    api.kernels_push(str(write_kernel(tmp_path / "k", code)))
    ref = f"{USER}/hello-kernel"
    kernel, version = emulator.backend.get_version(USER, "hello-kernel", None)
    eventually(lambda: "container" in api.kernels_logs(ref), what="the container line")
    name = api.kernels_logs(ref).split("container ", 1)[1].split()[0]
    digits = re.findall(r"\d+", name)
    assert name.startswith("kernel-session-") and len(digits) == 1 and len(digits[0]) >= 12
    session_id = int(digits[0])
    assert session_id == version.session_id and session_id != kernel.id * 1000 + version.number
    with pytest.raises(requests.HTTPError):
        _cancel(api, kernel.id * 1000 + version.number)
    admin(emulator.url, "realism", {"cancel_refused": True})
    assert "denied" in _cancel(api, session_id)
    realism = emulator.backend.realism
    emulator.clock.advance(realism.status_404_window + realism.new_script_window + 0.01)
    assert status_of(api, ref) == "RUNNING"
    admin(emulator.url, "realism", {"cancel_refused": False})
    assert not _cancel(api, session_id)
    assert wait_for(api, ref) == "CANCEL_ACKNOWLEDGED"


def test_gpu_versions_are_marked_emulated_unless_the_session_came_without_one(api, emulator, tmp_path):
    code = "import os\nprint('gpu=' + os.environ.get('KAGGLE_RUNNER_EMULATED_GPU', 'none'))\n"
    ref = f"{USER}/hello-kernel"
    api.kernels_push(str(write_kernel(tmp_path / "k", code, machine_shape="NvidiaTeslaT4")))
    wait_for(api, ref)
    assert "gpu=NvidiaTeslaT4" in api.kernels_logs(ref)
    api.kernels_push(str(write_kernel(tmp_path / "c", code, enable_gpu=False)))
    wait_for(api, ref)
    assert "gpu=none" in api.kernels_logs(ref)  # CPU versions never get it
    admin(emulator.url, "realism", {"no_gpu": True})
    api.kernels_push(str(write_kernel(tmp_path / "k", code)))
    wait_for(api, ref)
    assert "gpu=none" in api.kernels_logs(ref) and "came without one" in api.kernels_logs(ref)


def test_session_limit_kills_without_sigterm_by_default(api, emulator, tmp_path):
    code = ("import signal, sys, time, pathlib\npathlib.Path('partial.txt').write_text('half')\n"
            "def bye(*a):\n    pathlib.Path('got_sigterm.txt').write_text('yes'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\nprint('started', flush=True)\ntime.sleep(60)\n")
    api.kernels_push(str(write_kernel(tmp_path / "k", code)), timeout="1")
    assert wait_for(api, f"{USER}/hello-kernel", timeout=30) == "CANCEL_ACKNOWLEDGED"
    assert "exceeded the max allowed execution duration" in api.kernels_status(f"{USER}/hello-kernel").failure_message
    assert emulator.backend.get_kernel(USER, "hello-kernel").versions[0].exit_code == -9  # 137 in a shell
    outputs(api, f"{USER}/hello-kernel", tmp_path / "out")
    assert (tmp_path / "out/partial.txt").exists() and not (tmp_path / "out/got_sigterm.txt").exists()



def _current_version(api, ref: str) -> int:
    """GetKernel through the official client's SDK: the version Kaggle calls current."""
    from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelRequest

    request = ApiGetKernelRequest()
    request.user_name, request.kernel_slug = ref.split("/")
    with api.build_kaggle_client() as kaggle:
        return kaggle.kernels.kernels_api_client.get_kernel(request).metadata.current_version_number


def test_get_kernel_can_lag_behind_a_push(api, emulator, tmp_path):
    ref = f"{USER}/hello-kernel"
    admin(emulator.url, "realism", {"kernel_404_window": 1.0})
    api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    with pytest.raises(requests.HTTPError) as unseen:  # a first version not shown yet: the kernel is unknown
        _current_version(api, ref)
    assert unseen.value.response.status_code == 403
    emulator.clock.advance(1.0)
    assert _current_version(api, ref) == 1
    api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    assert _current_version(api, ref) == 1  # the previous version is still "current"
    emulator.clock.advance(1.0)
    assert _current_version(api, ref) == 2


def test_dataset_versions_can_fail_processing_or_never_finish(api, emulator, tmp_path):
    ref = f"{USER}/my-dataset"
    folder = write_dataset(tmp_path / "ds", "my-dataset", {"n.txt": b"one"})
    admin(emulator.url, "realism", {"pin_window": 0, "dataset_versions_failing": 1, "dataset_versions_stuck": 1})
    api.dataset_create_new(str(folder), quiet=True)
    emulator.clock.advance(emulator.backend.realism.dataset_404_window + 0.01)
    assert api.dataset_status(ref) == "failed"
    kernel = write_kernel(tmp_path / "k", READ_INPUTS, dataset_sources=[ref])
    api.kernels_push(str(kernel))
    assert _inputs(api, f"{USER}/hello-kernel") == {}  # a failed version never mounts
    (folder / "n.txt").write_text("two")
    api.dataset_create_version(str(folder), "v2", quiet=True)
    emulator.clock.advance(emulator.backend.realism.dataset_404_window + 0.01)
    assert api.dataset_status(ref) == "blobs_copied_to_sds"  # its own status, not the previous version's
    emulator.clock.advance(86400)
    assert api.dataset_status(ref) == "blobs_copied_to_sds"  # a day later
    (folder / "n.txt").write_text("three")
    api.dataset_create_version(str(folder), "v3", quiet=True)  # the knobs are spent: this one processes
    emulator.clock.advance(emulator.backend.realism.dataset_404_window + 0.01)
    assert api.dataset_status(ref) == "ready"
    values = admin(emulator.url, "realism", {})
    assert values["dataset_versions_failing"] == 0 and values["dataset_versions_stuck"] == 0
    api.kernels_push(str(kernel))
    assert _inputs(api, f"{USER}/hello-kernel") == {"my-dataset/n.txt": "three"}


def test_a_push_can_find_its_dataset_sources_unattachable(api, emulator, tmp_path):
    ref = f"{USER}/my-dataset"
    api.dataset_create_new(str(write_dataset(tmp_path / "ds", "my-dataset", {"n.txt": b"one"})), quiet=True)
    emulator.clock.advance(emulator.backend.realism.pin_window + 0.01)
    kernel = write_kernel(tmp_path / "k", READ_INPUTS, dataset_sources=[ref])
    admin(emulator.url, "faults", {"unattachable": 1})
    landed = api.kernels_push(str(kernel))  # a version runs, without the dataset
    assert not landed.error and landed.versionNumber == 1 and landed.invalidDatasetSources == [ref]
    assert _inputs(api, f"{USER}/hello-kernel") == {}
    admin(emulator.url, "faults", {"unattachable": 1, "unattachable_refused": True})
    refused = api.kernels_push(str(kernel))  # refused outright: no version
    assert ref in refused.error and not refused.versionNumber
    assert len(emulator.backend.get_kernel(USER, "hello-kernel").versions) == 1
    again = api.kernels_push(str(kernel))  # the fault is spent
    assert again.versionNumber == 2 and not again.invalidDatasetSources
    assert _inputs(api, f"{USER}/hello-kernel") == {"my-dataset/n.txt": "one"}  # version 2: <input>/<slug>/

# -- trust boundaries -------------------------------------------------------------------------------------
def _rpc(url: str, method: str, body, service: str = "kernels.KernelsApiService", **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    kwargs.setdefault("auth", (USER, KEY))
    return requests.post(f"{url}/v1/{service}/{method}", data=data, timeout=10,
                         headers={"Content-Type": "application/json"}, **kwargs)


def test_trust_output_and_upload_urls_are_signed_and_expire(api, emulator, tmp_path):
    from urllib.parse import urlsplit

    api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    wait_for(api, f"{USER}/hello-kernel")
    outputs(api, f"{USER}/hello-kernel", tmp_path / "out")
    listing = _rpc(emulator.url, "ListKernelSessionOutput", {"userName": USER, "kernelSlug": "hello-kernel"}).json()
    url = next(f["url"] for f in listing["files"] if f["fileName"] == "result.txt")
    assert requests.get(url, timeout=10).content == b"42"
    parts = urlsplit(url)
    assert "signature=" in parts.query and "expires=" in parts.query
    bare = f"{emulator.url}{parts.path}"
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    other_file = url.replace("result.txt", "sub/data.bin")
    for bad in (bare, tampered, other_file, emulator.app.sign(parts.path, ttl=-5)):
        response = requests.get(bad, timeout=10)
        assert response.status_code == 403, bad
    start = _rpc(emulator.url, "StartBlobUpload", {"name": "x.bin", "contentLength": 3},
                 service="blobs.BlobApiService").json()
    again = _rpc(emulator.url, "StartBlobUpload", {"name": "x.bin", "contentLength": 3},
                 service="blobs.BlobApiService").json()
    assert len(start["token"]) >= 20 and start["token"] != again["token"] and not start["token"].startswith("blob-")
    unsigned = f"{emulator.url}{urlsplit(start['createUrl']).path}"
    assert requests.put(unsigned, data=b"abc", timeout=10).status_code == 403
    assert requests.put(start["createUrl"] + "0", data=b"abc", timeout=10).status_code == 403
    assert requests.put(start["createUrl"], data=b"abc", timeout=10).status_code == 200


def test_trust_keys_are_random_unless_given(tmp_path):
    from kaggle_runner.emulator.server import data_dir_key

    with EmulatorServer(tmp_path / "a", username=USER) as first, \
            EmulatorServer(tmp_path / "b", username=USER) as second:
        assert first.key != second.key and first.key != "local-key" and len(first.key) >= 20
        assert requests.post(f"{first.url}/admin/state", auth=(USER, "local-key"), timeout=10).status_code == 405
        assert requests.get(f"{first.url}/admin/state", auth=(USER, "local-key"), timeout=10).status_code == 401
    key, path = data_dir_key(tmp_path / "c")
    assert data_dir_key(tmp_path / "c") == (key, path) and len(key) >= 20  # one per data dir, kept
    assert path.stat().st_mode & 0o777 == 0o600


def test_trust_kernels_get_an_allow_listed_environment(api, emulator, tmp_path, monkeypatch):
    code = "import os\nprint('env:', ' '.join(sorted(os.environ)))\n"
    admin(emulator.url, "faults", {"hold_queued": True})
    api.kernels_push(str(write_kernel(tmp_path / "k", code)))
    with monkeypatch.context() as secrets:  # what the emulator's own environment may hold
        secrets.setenv("KAGGLE_KEY", "real-account-key")
        secrets.setenv("KAGGLE_API_TOKEN", "real-token")
        secrets.setenv("AWS_SECRET_ACCESS_KEY", "cloud-secret")
        secrets.setenv("KAGGLE_RUNNER_EMULATOR_KEY", "emulator-key")
        admin(emulator.url, "faults", {"hold_queued": False})  # the kernel starts now
    wait_for(api, f"{USER}/hello-kernel")
    line = next(e["data"] for e in json.loads(api.kernels_logs(f"{USER}/hello-kernel")) if e["data"].startswith("env:"))
    names = set(line.split()[1:])
    assert {n for n in names if n.startswith("KAGGLE")} == {
        "KAGGLE_CONTAINER_NAME", "KAGGLE_RUNNER_INPUT_DIR", "KAGGLE_RUNNER_SCRATCH_DIR", "KAGGLE_RUNNER_EMULATED_GPU",
        # what a Kaggle batch session sets, with harmless values, so code that detects Kaggle behaves the same
        "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_URL", "KAGGLE_DATA_PROXY_PROJECT",
        "KAGGLE_DATA_PROXY_TOKEN", "KAGGLE_USER_SECRETS_TOKEN", "KAGGLE_KERNEL_INTEGRATIONS"}
    assert "AWS_SECRET_ACCESS_KEY" not in names and "PATH" in names


def test_kernels_get_a_home_of_their_own_and_no_internet_unless_the_account_allows_it(api, emulator, tmp_path):
    code = ("import os, urllib.request\nprint('home:', os.environ['HOME'])\n"
            "try:\n    urllib.request.urlopen('http://example.com/', timeout=5)\n    print('internet: yes')\n"
            "except OSError as exc:\n    print('internet: no', type(exc).__name__)\n")
    api.kernels_push(str(write_kernel(tmp_path / "k", code, enable_internet=True)))
    wait_for(api, f"{USER}/hello-kernel")
    lines = [e["data"].strip() for e in json.loads(api.kernels_logs(f"{USER}/hello-kernel"))]
    assert f"home: {emulator.backend.data_dir / 'kernel-home'}" in lines
    assert "internet: no URLError" in lines  # asked for, but the account (by default) may not have it


def test_trust_malformed_requests_get_a_one_line_4xx(api, emulator, tmp_path):
    import base64
    from urllib.parse import urlsplit

    api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    wait_for(api, f"{USER}/hello-kernel")
    url = emulator.url
    non_ascii = {"Authorization": "Basic " + base64.b64encode("alicé:kéy".encode()).decode()}
    responses = [
        requests.post(f"{url}/v1/kernels.KernelsApiService/ListKernels", data="{}", headers=non_ascii, timeout=10),
        _rpc(url, "ListKernelSessionOutput", {"userName": USER, "kernelSlug": "hello-kernel", "pageToken": "abc"}),
        _rpc(url, "ListKernelSessionOutput", {"userName": USER, "kernelSlug": "hello-kernel", "pageSize": "x"}),
        _rpc(url, "GetKernelSessionStatus", {"userName": USER, "kernelSlug": "hello-kernel", "versionLabel": "v0"}),
        _rpc(url, "GetKernelSessionStatus", {"userName": USER, "kernelSlug": "hello-kernel", "versionLabel": "vx"}),
        _rpc(url, "GetKernelSessionStatus", {"userName": "..", "kernelSlug": ".."}),
        _rpc(url, "SaveKernel", {"slug": f"{USER}/..", "newTitle": "Escape", "text": "print(1)"}),
        _rpc(url, "SaveKernel", {"slug": f"{USER}/hello-kernel", "text": "print(1)", "sessionTimeoutSeconds": "x"}),
        _rpc(url, "CancelKernelSession", {"kernelSessionId": "12ab"}),
        _rpc(url, "StartBlobUpload", {"name": "a.bin", "contentLength": "x"}, service="blobs.BlobApiService"),
        _rpc(url, "CreateDataset", {"ownerSlug": USER, "slug": "../../etc", "title": "Escaping Data"},
             service="datasets.DatasetApiService"),
        _rpc(url, "CreateDataset", {"ownerSlug": USER, "slug": "good-slug", "title": "Some Data", "files": [{}]},
             service="datasets.DatasetApiService"),
        _rpc(url, "GetKernel", b"{not json"),
        _rpc(url, "GetKernel", b"[1, 2]"),
        requests.post(f"{url}/admin/faults", data=b"[", auth=(USER, KEY), timeout=10),
        requests.post(f"{url}/admin/faults", json={"drop_downloads": "many"}, auth=(USER, KEY), timeout=10),
    ]
    for response in responses:
        assert 400 <= response.status_code < 500, (response.request.body, response.status_code, response.text)
        assert "\n" not in response.text.strip() and "message" in response.json(), response.text
    assert not (emulator.backend.data_dir / "kernels" / "v1").exists()
    assert not list(emulator.backend.data_dir.parent.glob("etc*"))

    start = _rpc(url, "StartBlobUpload", {"name": "a.bin", "contentLength": 3}, service="blobs.BlobApiService").json()
    target = urlsplit(start["createUrl"])
    with socket.create_connection((target.hostname, target.port), timeout=10) as sock:
        sock.sendall(f"PUT {target.path}?{target.query} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n"
                     "Connection: close\r\n\r\nabc".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.split(b" ")[1].startswith(b"4"), reply[:200]


def test_trust_two_first_local_uses_start_one_emulator_with_a_clean_environment(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from kaggle_runner.local import ensure_background_emulator, stop_background_emulator

    monkeypatch.setenv("KAGGLE_KEY", "real-account-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-secret")
    workspace = tmp_path / "ws"
    try:
        with ThreadPoolExecutor(2) as pool:
            urls = list(pool.map(lambda _: ensure_background_emulator(workspace), range(2)))
        assert urls[0] == urls[1]
        data_dir = str(workspace / "emulator" / "data")
        servers = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if data_dir in cmdline.read_bytes().decode(errors="replace"):
                    servers.append(cmdline.parent)
            except OSError:
                continue
        assert len(servers) == 1
        environ = (servers[0] / "environ").read_bytes().split(b"\0")
        names = {item.split(b"=", 1)[0].decode() for item in environ if item}
        assert "KAGGLE_KEY" not in names and "AWS_SECRET_ACCESS_KEY" not in names
        assert "KAGGLE_RUNNER_EMULATOR_KEY" in names
    finally:
        stop_background_emulator(workspace)


# -- kernel sources: a version's outputs as another's input --------------------------------------------------
LIST_INPUTS = ("import os, pathlib\nroot = pathlib.Path(os.environ['KAGGLE_RUNNER_INPUT_DIR'])\n"
               "for p in sorted(root.rglob('*.txt')):\n"
               "    print('input:', p.relative_to(root).as_posix(), p.read_text())\n"
               "print('script:', sorted(str(p.relative_to(root)) for p in root.rglob('__script__.py')))\n")


def _writes(text: str) -> str:
    return f"import pathlib\npathlib.Path('out.txt').write_text({text!r})\n"


def test_a_kernel_source_attaches_the_newest_complete_version_pinned_at_push(api, emulator, tmp_path):
    source, reader = f"{USER}/source-kernel", f"{USER}/reader-kernel"
    window = emulator.backend.realism.kernel_source_window
    api.kernels_push(str(write_kernel(tmp_path / "s", _writes("one"), slug="source-kernel", title="Source Kernel")))
    assert wait_for(api, source) == "COMPLETE"
    kernel = write_kernel(tmp_path / "r", LIST_INPUTS, slug="reader-kernel", title="Reader Kernel",
                          kernel_sources=[source])
    early = api.kernels_push(str(kernel))  # right after its end: not attachable yet, and nothing older is
    assert early.version_number == 1 and not early.invalid_kernel_sources
    assert _inputs(api, reader) == {}
    emulator.clock.advance(window + 0.01)
    api.kernels_push(str(kernel))  # an even version: the older layout, <input>/<slug>/
    assert _inputs(api, reader) == {"source-kernel/out.txt": "one"}
    assert "source-kernel/__script__.py" in api.kernels_logs(reader)  # Kaggle's own files beside the outputs
    api.kernels_push(str(write_kernel(tmp_path / "s", _writes("two"), slug="source-kernel", title="Source Kernel")))
    assert wait_for(api, source) == "COMPLETE"
    api.kernels_push(str(kernel))  # inside the window of version 2: version 1's outputs, as pinned at push
    assert _inputs(api, reader) == {"notebooks/alice/source-kernel/out.txt": "one"}
    emulator.clock.advance(window + 0.01)
    api.kernels_push(str(write_kernel(tmp_path / "s", "raise SystemExit(1)\n", slug="source-kernel",
                                      title="Source Kernel")))
    assert wait_for(api, source) == "ERROR"
    emulator.clock.advance(window + 0.01)
    api.kernels_push(str(kernel))  # a failed version is never attached: the newest COMPLETE one is
    assert _inputs(api, reader) == {"source-kernel/out.txt": "two"}


def test_an_unfinished_kernel_or_the_kernel_itself_is_not_a_valid_source(api, emulator, tmp_path):
    api.kernels_push(str(write_kernel(tmp_path / "f", "raise SystemExit(2)\n", slug="failed-kernel",
                                      title="Failed Kernel")))
    assert wait_for(api, f"{USER}/failed-kernel") == "ERROR"
    reader = write_kernel(tmp_path / "r", LIST_INPUTS, slug="reader-kernel", title="Reader Kernel",
                          kernel_sources=[f"{USER}/failed-kernel", f"{USER}/never-pushed"])
    landed = api.kernels_push(str(reader))  # the version runs, without them (the client prints them)
    assert landed.version_number == 1 and landed.invalid_kernel_sources == [f"{USER}/failed-kernel",
                                                                            f"{USER}/never-pushed"]
    assert _inputs(api, f"{USER}/reader-kernel") == {}
    itself = write_kernel(tmp_path / "r", LIST_INPUTS, slug="reader-kernel", title="Reader Kernel",
                          kernel_sources=[f"{USER}/reader-kernel"])
    emulator.clock.advance(1)
    refused = api.kernels_push(str(itself))  # a kernel's own outputs: refused by default (the less kind reading)
    assert refused.version_number == 2 and refused.invalid_kernel_sources == [f"{USER}/reader-kernel"]
    wait_for(api, f"{USER}/reader-kernel")
    admin(emulator.url, "realism", {"self_source_refused": False})
    emulator.clock.advance(1)
    allowed = api.kernels_push(str(itself))
    assert allowed.version_number == 3 and not allowed.invalid_kernel_sources
    wait_for(api, f"{USER}/reader-kernel")
    assert emulator.backend.get_version(USER, "reader-kernel", "v3")[1].kernel_source_versions == \
        {f"{USER}/reader-kernel": 2}


def test_working_keeps_at_most_the_output_cap_as_a_full_disk_would(api, emulator, tmp_path):
    admin(emulator.url, "realism", {"output_cap_bytes": 300_000})
    code = ("import os\ntry:\n    open('big.bin', 'wb').write(os.urandom(500_000))\nexcept OSError as exc:\n"
            "    print('refused', exc.errno, flush=True)\n    os.remove('big.bin')\n"
            "open('small.txt', 'w').write('kept')\n")
    api.kernels_push(str(write_kernel(tmp_path / "k", code)))
    ended = wait_for(api, f"{USER}/hello-kernel")
    assert ended == "COMPLETE", (api.kernels_status(f"{USER}/hello-kernel").failure_message,
                                 api.kernels_logs(f"{USER}/hello-kernel"))
    assert "refused 27" in api.kernels_logs(f"{USER}/hello-kernel")  # EFBIG: the write past the cap failed
    outputs(api, f"{USER}/hello-kernel", tmp_path / "out")
    assert (tmp_path / "out/small.txt").read_text() == "kept" and not (tmp_path / "out/big.bin").exists()
    # Outputs that are over the cap when the version ends (the cap lowered meanwhile, here) are not saved.
    api.kernels_push(str(write_kernel(tmp_path / "k2", "import os\nopen('data.bin', 'wb').write(os.urandom(200_000))\n"
                                      + WAIT_FOR_GO)))
    data = emulator.backend.kernel_dir(USER, "hello-kernel", 2) / "working" / "data.bin"
    eventually(lambda: data.exists() and data.stat().st_size == 200_000)
    admin(emulator.url, "realism", {"output_cap_bytes": 100_000})
    _signal(emulator, version=2)
    assert wait_for(api, f"{USER}/hello-kernel") == "ERROR"
    assert "exceeded" in api.kernels_status(f"{USER}/hello-kernel").failure_message
    assert not data.exists()


def test_a_version_whose_outputs_cannot_be_saved_ends_in_error_not_running_forever(api, emulator, tmp_path):
    admin(emulator.url, "faults", {"disk_full": 1})
    api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    assert wait_for(api, f"{USER}/hello-kernel") == "ERROR"
    status = api.kernels_status(f"{USER}/hello-kernel")
    assert "could not be saved (No space left on device)" in status.failure_message
    api.kernels_push(str(tmp_path / "k"))  # the emulator goes on serving once space is back
    assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"


def test_a_kernel_sees_the_batch_session_kaggle_gives_and_detects_it(api, emulator, tmp_path):
    code = ("import os\nfrom kagglesdk.kaggle_env import is_in_kaggle_notebook\n"
            "print('run type:', os.environ['KAGGLE_KERNEL_RUN_TYPE'], 'in kaggle:', is_in_kaggle_notebook())\n")
    api.kernels_push(str(write_kernel(tmp_path / "k", code)))
    assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"
    assert "run type: Batch in kaggle: True" in api.kernels_logs(f"{USER}/hello-kernel")


def test_a_kernel_leaves_one_core_to_the_machine_unless_the_user_chose_its_threads(api, emulator, tmp_path,
                                                                                   monkeypatch):
    # torch's threads stall together when one of them shares a core with any other busy process
    from kaggle_runner.emulator.runner import kernel_threads

    code = "import os\nprint('threads:', os.environ.get('OMP_NUM_THREADS'))\n"
    folder = write_kernel(tmp_path / "k", code)
    answers = []
    for chosen in (None, "3"):
        if chosen is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", chosen)
        api.kernels_push(str(folder))
        assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"
        answers.append(next(e["data"].split()[1] for e in json.loads(api.kernels_logs(f"{USER}/hello-kernel"))
                            if e["data"].startswith("threads:")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert answers == [str(max(1, cores - 1)), "3"] and kernel_threads() == max(1, cores - 1)


def test_a_body_is_read_only_from_a_known_caller_and_only_so_large(emulator):
    from urllib.parse import urlsplit

    target = urlsplit(emulator.url)

    def answer(headers: str, body: bytes = b"") -> bytes:
        with socket.create_connection((target.hostname, target.port), timeout=10) as sock:
            sock.sendall(f"POST /v1/kernels.KernelsApiService/ListKernels HTTP/1.1\r\nHost: x\r\n{headers}"
                         "Content-Type: application/json\r\n\r\n".encode() + body)
            reply = b""
            while chunk := sock.recv(65536):  # it answers without waiting for 400 MiB that never come
                reply += chunk
            return reply

    assert answer("Content-Length: 419430400\r\n", b"{").split(b" ")[1] == b"401"
    import base64
    auth = "Authorization: Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode() + "\r\n"
    assert answer(auth + "Content-Length: 419430400\r\n", b"{").split(b" ")[1] == b"413"
    nested = b"[" * 100_000 + b"]" * 100_000
    reply = answer(auth + f"Content-Length: {len(nested)}\r\n", nested)
    assert reply.split(b" ")[1] == b"400" and b"<html" not in reply.lower() and b"not JSON" in reply
