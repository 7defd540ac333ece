"""The emulator, driven by the unmodified official kaggle client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from kaggle_runner.config import load_preset
from kaggle_runner.emulator.server import EmulatorServer
from kaggle_runner.render import render_kernel
from tests.emulator_helpers import (
    KEY,
    USER,
    admin,
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
                        realism=quick_realism()) as server:
        yield server


@pytest.fixture
def api(emulator, monkeypatch):
    return official_client(emulator.url, monkeypatch)


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


def test_follow_streams_a_running_version_until_it_ends(api, tmp_path, capsys):
    code = "import time\nfor i in range(4):\n    print('tick', i, flush=True)\n    time.sleep(0.4)\n"
    api.kernels_push(str(write_kernel(tmp_path / "k", code)))
    time.sleep(0.5)
    api.kernels_logs_cli(f"{USER}/hello-kernel", follow=True)
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
    time.sleep(emulator.backend.realism.pin_window)  # a brand-new dataset is not mountable at once
    code = ("import os, pathlib\nroot = pathlib.Path(os.environ['KAGGLE_RUNNER_INPUT_DIR'])\n"
            "print('read:', (root / 'datasets/alice/my-dataset/numbers.txt').read_text())\n")
    api.kernels_push(str(write_kernel(tmp_path / "k", code, dataset_sources=[f"{USER}/my-dataset"])))
    assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"
    assert "read: 1 2 3" in api.kernels_logs(f"{USER}/hello-kernel")


def test_dataset_create_version_status_and_delete_old_versions(api, emulator, tmp_path):
    admin(emulator.url, "faults", {"dataset_delay": 0.6})
    folder = write_dataset(tmp_path / "ds", "ckpt-dataset", {"a.bin": b"a" * 1000})
    assert api.dataset_create_new(str(folder), quiet=True).status == "ok"
    time.sleep(emulator.backend.realism.dataset_404_window)
    assert api.dataset_status(f"{USER}/ckpt-dataset") != "ready"
    time.sleep(0.5)
    assert api.dataset_status(f"{USER}/ckpt-dataset") == "ready"
    again = api.dataset_create_new(str(folder), quiet=True)
    assert "already in use" in again.error
    (folder / "a.bin").write_bytes(b"b" * 2000)
    assert api.dataset_create_version(str(folder), "v2", quiet=True, delete_old_versions=True).status == "ok"
    root = emulator.backend.data_dir / "datasets" / USER / "ckpt-dataset"
    assert not (root / "v1").exists() and (root / "v2" / "a.bin").stat().st_size == 2000


def test_bad_key_gets_401_and_no_credentials_on_disk(emulator, monkeypatch, tmp_path):
    api = official_client(emulator.url, monkeypatch, key="wrong-key")
    with pytest.raises(requests.HTTPError) as error:
        api.kernels_push(str(write_kernel(tmp_path / "k", HELLO)))
    assert error.value.response.status_code == 401
    with pytest.raises(ValueError) as denied:  # status, output and logs turn 401/403 into this
        api.kernels_status(f"{USER}/anything")
    assert "Permission 'kernels.get' was denied" in str(denied.value)
    good = official_client(emulator.url, monkeypatch)
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
    with EmulatorServer(data, username=USER, key=KEY, realism=quick_realism()) as first:
        api = official_client(first.url, monkeypatch)
        api.kernels_push(str(write_kernel(tmp_path / "a", HELLO, slug="done-kernel", title="Done Kernel")))
        wait_for(api, f"{USER}/done-kernel")
        api.kernels_push(str(write_kernel(tmp_path / "b", "import time\ntime.sleep(60)\n")))
        time.sleep(0.5)
    with EmulatorServer(data, username=USER, key=KEY, realism=quick_realism()) as second:
        api = official_client(second.url, monkeypatch)
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
    time.sleep(0.5)
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
    for _ in range(100):
        if emulator.backend.gpu_sessions_in_use() < 2:
            break
        time.sleep(0.1)
    assert not api.kernels_push(str(tmp_path / "three")).error  # a freed session takes the push


def test_quota_counts_gpu_time(api, tmp_path, capsys):
    api.kernels_push(str(write_kernel(tmp_path / "k", "import time\ntime.sleep(1)\n")))
    wait_for(api, f"{USER}/hello-kernel")
    quota = api.quota_view()
    assert quota.gpu_quota.time_used.total_seconds() >= 1
    assert quota.gpu_quota.total_time_allowed.total_seconds() == 30 * 3600
    api.quota_view_cli(csv_display=True)
    assert "30.00h" in capsys.readouterr().out


def _port_80_free() -> bool:
    if os.geteuid() != 0:
        return False
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 80))
            return True
        except OSError:
            return False


@pytest.mark.skipif(not _port_80_free(), reason="needs to bind localhost:80 (root, port free)")
def test_official_cli_with_localhost_environment(tmp_path):
    with EmulatorServer(tmp_path / "emu", username=USER, key=KEY, port=80):
        env = {**os.environ, "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "KAGGLE_USERNAME": USER, "KAGGLE_KEY": KEY,
               "NO_PROXY": "127.0.0.1,localhost"}
        folder = write_kernel(tmp_path / "k", HELLO)
        kaggle_cli = [sys.executable, "-m", "kaggle.cli"]
        pushed = subprocess.run([*kaggle_cli, "kernels", "push", "-p", str(folder)], env=env,
                                capture_output=True, text=True, timeout=60)
        assert "Kernel version 1 successfully pushed" in pushed.stdout, pushed.stdout + pushed.stderr
        for _ in range(100):
            status = subprocess.run([*kaggle_cli, "kernels", "status", f"{USER}/hello-kernel"], env=env,
                                    capture_output=True, text=True, timeout=60).stdout
            if "COMPLETE" in status:
                break
            time.sleep(0.3)
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
