"""The command line through Click's CliRunner: every command exists, documents itself, fails cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaggle_runner.cli import cli

COMMANDS = ["init", "render", "launch", "status", "fetch", "logs", "cancel", "watch", "resume", "quota", "doctor",
            "emulator", "bench", "generate", "report", "service", "clean"]


def test_group_lists_every_command(cli_runner):
    result = cli_runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS)


@pytest.mark.parametrize("command", [[c] for c in COMMANDS] + [["emulator", "serve"], ["emulator", "stop"]])
def test_every_command_has_real_help(cli_runner, command):
    result = cli_runner.invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    summary = result.output.split("\n\n")[1].strip()
    assert len(summary) > 20, f"{command} needs a real description, got {summary!r}"


def test_every_command_is_documented():
    docs = "\n".join(p.read_text() for p in Path("docs").glob("*.md")) + Path("README.md").read_text()
    for command in COMMANDS:
        assert f"`kaggle-runner {command}" in docs or f"`{command} " in docs or f"`{command}`" in docs, command


def test_init_writes_a_commented_preset_and_refuses_to_overwrite(cli_runner, tmp_path):
    target = tmp_path / "kaggle-runner.toml"
    result = cli_runner.invoke(cli, ["init", "--preset", "tiny", "-o", str(target)])
    assert result.exit_code == 0, result.output
    text = target.read_text()
    assert 'dataset = "stdlib-docs"' in text and text.lstrip().startswith("#")
    again = cli_runner.invoke(cli, ["init", "--preset", "seed", "-o", str(target)])
    assert again.exit_code != 0
    assert "--force" in again.output and "Traceback" not in again.output
    assert target.read_text() == text  # nothing lost


def test_render_writes_kernel_folder(cli_runner, tmp_path):
    config = tmp_path / "kaggle-runner.toml"
    cli_runner.invoke(cli, ["init", "--preset", "seed", "-o", str(config)])
    out = tmp_path / "kernel"
    result = cli_runner.invoke(cli, ["render", "-c", str(config), "-o", str(out), "--username", "alice",
                                     "--set", "epochs=5"])
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / "kernel-metadata.json").read_text())
    assert metadata["id"] == "alice/kaggle-runner-gpt"
    assert metadata["enable_gpu"] is True and metadata["machine_shape"] == "NvidiaTeslaT4"
    assert '"epochs": 5' in (out / "train.py").read_text()


def test_render_without_credentials_or_username_says_how_to_fix(cli_runner, tmp_path):
    config = tmp_path / "kaggle-runner.toml"
    cli_runner.invoke(cli, ["init", "--preset", "seed", "-o", str(config)])
    result = cli_runner.invoke(cli, ["render", "-c", str(config), "-o", str(tmp_path / "k")])
    assert result.exit_code == 1
    assert "--username" in result.output and "kaggle.json" in result.output
    assert "Traceback" not in result.output


def test_bad_config_is_one_line_naming_the_key(cli_runner, tmp_path):
    config = tmp_path / "kaggle-runner.toml"
    cli_runner.invoke(cli, ["init", "--preset", "seed", "-o", str(config)])
    result = cli_runner.invoke(cli, ["render", "-c", str(config), "-o", str(tmp_path / "k"),
                                     "--username", "alice", "--set", "n_head=7"])
    assert result.exit_code == 1
    assert "n_embd (256) must be divisible by n_head (7)" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "k").exists()


def test_every_config_key_is_in_the_reference():
    from kaggle_runner.config import RunConfig

    reference = Path("docs/config.md").read_text()
    missing = [key for key in RunConfig.model_fields if f"`{key}`" not in reference]
    assert not missing, f"document these keys in docs/config.md: {missing}"


def test_status_table_fits_80_columns_without_cutting_anything(monkeypatch, capsys):
    from kaggle_runner.display import print_status

    monkeypatch.setenv("COLUMNS", "80")
    run = {"name": "kaggle-runner-tiny-20261127-181114", "state": "complete", "segment": 2, "kernel_version": 2,
           "kaggle_status": "COMPLETE", "global_step": 100, "total_steps": 100, "val_loss": 6.0265,
           "reason": "training complete at step 100"}
    print_status([run])
    output = capsys.readouterr().out
    assert max(len(line) for line in output.splitlines()) <= 80
    lines = [line for line in output.splitlines() if line.strip()]
    header, rows = lines[0], lines[2:]  # header, rule, then the row folded over several lines
    state_at, reason_at = header.index("state"), header.index("reason")
    assert "".join(line[:state_at].strip() for line in rows) == run["name"]  # folded, never cut short
    assert " ".join(line[reason_at:].strip() for line in rows).split() == run["reason"].split()
    assert rows[0][state_at:reason_at].split() == ["complete", "2", "2", "COMPLETE", "100/100", "6.0265"]


def test_a_disk_error_is_one_line_not_a_traceback(cli_runner, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = cli_runner.invoke(cli, ["init", "--preset", "tiny", "-o", str(tmp_path / "a-file" / "x.toml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and "a-file" in result.output, result.output


def test_output_for_scripts_and_for_80_columns(cli_runner, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    empty = cli_runner.invoke(cli, ["status", "--json"])
    assert empty.exit_code == 0 and json.loads(empty.output) == []  # a script reads a list, even an empty one
    assert "finetune" in cli_runner.invoke(cli, ["init", "--help"]).output
    from kaggle_runner.display import print_status

    monkeypatch.setenv("COLUMNS", "80")
    reason = ("reached max_segments (6) at step 300; continue with `kaggle-runner resume "
              "kaggle-runner-tiny-20261127-181114 --max-segments 8`")
    print_status([{"name": "kaggle-runner-tiny-20261127-181114", "state": "stopped", "segment": 6,
                   "kernel_version": 6, "kaggle_status": "COMPLETE", "global_step": 300, "total_steps": 900,
                   "val_loss": 5.5, "reason": reason}])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 80 and len(lines) <= 8, lines  # not dozens of folded lines
    assert any(line.startswith("[1] kaggle-runner-tiny") for line in lines)
    assert "--max-segments 8" in " ".join(lines)  # the whole reason, once, under the table


def test_a_misspelled_section_is_said_and_its_keys_still_count(tmp_path):
    from kaggle_runner.config import load_config, preset_text

    path = tmp_path / "kaggle-runner.toml"
    path.write_text(preset_text("tiny").replace("[training]", "[trainning]"))
    config = load_config(path)
    assert config.epochs == 1 and any("[trainning]" in w and "typo" in w for w in config.warnings())


def test_service_files_carry_real_paths_safely(tmp_path, monkeypatch, cli_runner):
    import shlex

    project = tmp_path / "my 100% project"
    project.mkdir()
    monkeypatch.chdir(project)
    timer = cli_runner.invoke(cli, ["service", "systemd"])
    assert timer.exit_code == 0 and "OnUnitActiveSec=5min" in timer.output and "SuccessExitStatus=6" in timer.output
    exec_line = next(line for line in timer.output.splitlines() if line.startswith("ExecStart="))
    assert '"--once"' in exec_line and "my 100%% project" in exec_line  # quoted; % is a systemd specifier
    assert "WorkingDirectory=" + str(project).replace("%", "%%") in timer.output
    cron = cli_runner.invoke(cli, ["service", "cron", "--every", "10"]).output.strip()
    assert cron.startswith("*/10 * * * * ") and "\\%" in cron and "%" not in cron.replace("\\%", "")
    assert "--once" in shlex.split(cron.replace("\\%", "%"))  # the shell reads back the arguments whole
    resident = cli_runner.invoke(cli, ["service", "launchd", "--resident"])
    assert "<key>KeepAlive</key>" in resident.output and "--once" not in resident.output
    bad = tmp_path / "evil\nExecStartPre=touch pwned"
    bad.mkdir()
    monkeypatch.chdir(bad)
    refused = cli_runner.invoke(cli, ["service", "systemd"])
    assert refused.exit_code == 1 and "control character" in refused.output and "ExecStartPre" not in \
        refused.output.split("control character")[1]
