"""`kaggle-runner doctor` against the emulator: CPU probes only, a measured pin delay, doctor.json for launch."""

from __future__ import annotations

import ast
import json

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.doctor_probe import probe_script, report_in_log
from tests.emulator_helpers import KEY, USER, admin


@pytest.mark.slow
def test_doctor_measures_the_pin_delay_on_cpu_kernels(tmp_path, monkeypatch, emulator, cli_runner):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    admin(emulator.url, "realism", {"pin_window": 0})
    admin(emulator.url, "faults", {"stale_mounts": 1})  # the first probe, pushed at once, sees no new version
    result = cli_runner.invoke(cli, ["doctor", "--endpoint", emulator.url])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    for check in ("credentials", "GPU quota", "probe kernel", "status after push", "dataset pinning",
                  "dataset mount", "image versions", "internet", "session variable", "outputs to another kernel",
                  "outputs to itself"):
        assert check in result.output, check
    assert "phone" in result.output  # the emulator's kernels have no internet: the what-to-do row says why

    saved_text = (tmp_path / ".kaggle-runner/doctor.json").read_text()
    saved = json.loads(saved_text)
    assert saved["pin_delay_seconds"] > 0 and saved["pin_delay_exact"] is True
    assert saved["status_invisible_seconds"] is not None and saved["status_invisible_seconds"] >= 0
    assert saved["mount_layout"] in ("datasets", "slug")
    assert saved["versions"]["python"].count(".") == 2
    assert saved["internet"] is False and saved["session_variable"] is True
    assert saved["endpoint"] == emulator.url and saved["measured_at"]
    assert KEY not in saved_text and KEY not in result.output

    kernel = emulator.backend.kernels[f"{USER}/kaggle-runner-probe"]
    assert 3 <= len(kernel.versions) <= 4  # 2 or 3 to see the new dataset version, 1 to try reading itself
    second = emulator.backend.kernels[f"{USER}/kaggle-runner-probe-b"]
    assert not any(v.enable_gpu for v in kernel.versions + second.versions)  # no GPU quota spent
    assert all(v.dataset_sources == [f"{USER}/kaggle-runner-probe-data"] for v in kernel.versions[:-1])
    # The outputs route: a second kernel read the probe's newest outputs; the emulator, by default, refuses a
    # kernel its own (the less kind reading of thin evidence).
    assert saved["outputs_other_attach"] is True and saved["outputs_self_attach"] is False
    assert saved["outputs_attach_delay_seconds"] >= 0 and saved["outputs_mount_layout"] in ("notebooks", "slug")
    assert all(v.kernel_sources == [f"{USER}/kaggle-runner-probe"] for v in second.versions)


def test_probe_settings_are_data_and_its_report_is_found_in_a_log():
    hostile = "alice/x'); import shutil #\n\"\"\""
    tree = ast.parse(probe_script(hostile))  # a hostile value cannot break the script
    settings = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                    and getattr(node.targets[0], "id", "") == "SETTINGS")
    assert isinstance(settings, ast.Call) and isinstance(settings.args[0], ast.Constant)
    assert json.loads(settings.args[0].value)["dataset"] == hostile
    assert not any(isinstance(node, ast.Import) and node.names[0].name == "shutil" for node in ast.walk(tree))

    line = json.dumps({"event": "probe", "nonce": "n1"})
    log = json.dumps([{"stream_name": "stdout", "time": 0.1, "data": "hello\n"},
                      {"stream_name": "stdout", "time": 0.2, "data": line + "\n"}])
    assert report_in_log(log)["nonce"] == "n1"
    lines = "\n".join(json.dumps({"stream_name": "stdout", "time": 0.1, "data": d}) for d in ("a\n", line + "\n"))
    assert report_in_log(lines)["nonce"] == "n1"
    assert report_in_log("plain text\n" + line + "\n")["nonce"] == "n1"
    assert report_in_log("") is None and report_in_log("no report here") is None


@pytest.mark.slow
def test_doctor_says_whether_a_kernel_can_attach_its_own_outputs(tmp_path, monkeypatch, emulator, cli_runner):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    admin(emulator.url, "realism", {"self_source_refused": False, "kernel_source_window": 0})
    result = cli_runner.invoke(cli, ["doctor", "--endpoint", emulator.url, "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.output[result.output.index("{"):])
    assert measured["outputs_self_attach"] is True and measured["outputs_other_attach"] is True
    assert measured["outputs_attach_delay_seconds"] is not None
