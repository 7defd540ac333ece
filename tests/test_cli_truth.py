"""A CLI that tells the truth, and runs that need no babysitting: exit codes, resume with fixes, messages
that name the run, status anywhere, logs of any segment, watch --all, notifications, service files."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.run_views import run_status
from tests.chain_helpers import STUB_CHAIN, sets
from tests.emulator_helpers import local_http_server

pytestmark = pytest.mark.slow


@pytest.fixture
def inbox():
    """An HTTP endpoint on this machine that keeps what is POSTed to it."""
    received: list[tuple[str, bytes]] = []

    class Keep(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the name http.server calls
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers.get("Content-Type", ""), body))
            self.send_response(200)
            self.end_headers()

    with local_http_server(Keep) as url:
        yield f"{url}/topic", received


def test_a_stopped_chain_exits_non_zero_and_resume_takes_fixes_but_not_shape_changes(stub_project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "capped", "--max-segments", "1", *sets(STUB_CHAIN)])
    assert result.exit_code == 4, result.output
    reason = run_status(".kaggle-runner", "capped")["reason"]
    assert "kaggle-runner resume capped" in reason and "RUN" not in reason  # the real run, no placeholder
    refused = cli_runner.invoke(cli, ["resume", "capped", "--set", "n_embd=32"])
    assert refused.exit_code == 1 and "cannot change n_embd" in refused.output
    invalid = cli_runner.invoke(cli, ["resume", "capped", "--set", "learning_rate=inf"])
    assert invalid.exit_code == 1 and "learning_rate" in invalid.output
    assert run_status(".kaggle-runner", "capped")["state"] == "stopped"  # refusals changed nothing
    resumed = cli_runner.invoke(cli, ["resume", "capped", "--set", "max_segments=3", "--set", "log_steps=2"])
    assert resumed.exit_code == 0, resumed.output
    status = run_status(".kaggle-runner", "capped")
    assert status["state"] == "complete" and json.loads(
        Path(".kaggle-runner/runs/capped/kernel-2/train.py").read_text().split('json.loads(r"""')[1]
        .split('""")')[0])["log_steps"] == 2  # re-rendered with the fix
    shown = cli_runner.invoke(cli, ["status", "capped"]).output
    assert "None" not in shown and "train loss 0.0500" in shown  # the last known loss, unknowns as dashes
    one = cli_runner.invoke(cli, ["logs", "capped", "--segment", "1", "--raw"]).output
    both = cli_runner.invoke(cli, ["logs", "capped", "--all", "--raw"]).output
    assert '"global_step": 10' in one and "segment 2" in both and '"global_step": 20' in both
    assert cli_runner.invoke(cli, ["logs", "capped", "--segment", "9"]).exit_code == 1


def test_status_outside_a_workspace_creates_nothing_and_all_lists_every_workspace(stub_project, cli_runner,
                                                                                  tmp_path, monkeypatch):
    assert cli_runner.invoke(cli, ["launch", "--name", "here", *sets([*STUB_CHAIN, "max_steps=5"])]).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli_runner.invoke(cli, ["status"])
    assert result.exit_code == 0 and "No runs here" in result.output and "--all" in result.output
    assert not (elsewhere / ".kaggle-runner").exists()
    listing = json.loads(cli_runner.invoke(cli, ["status", "--all", "--json"]).output)
    assert [(r["name"], r["state"]) for r in listing] == [("here", "complete")]
    assert listing[0]["workspace"] == str((stub_project / ".kaggle-runner").resolve())


def test_watch_all_drives_every_unfinished_run_and_notifies(stub_project, cli_runner, inbox):
    url, received = inbox
    for name, slug in (("first", "kaggle-runner-one"), ("second", "kaggle-runner-two")):
        title = " ".join(word.capitalize() for word in slug.split("-"))
        result = cli_runner.invoke(cli, ["launch", "--name", name, "--detach",
                                         *sets([*STUB_CHAIN, f'slug="{slug}"', f'title="{title}"'])])
        assert result.exit_code == 0, result.output
    result = cli_runner.invoke(cli, ["watch", "--all", "--notify", url])
    assert result.exit_code == 0, result.output
    assert {run["state"] for run in run_status(".kaggle-runner")} == {"complete"}
    events = [json.loads(body) for kind, body in received if kind == "application/json"]
    assert {(e["run"], e["event"]) for e in events} >= {("first", "completed"), ("second", "completed"),
                                                        ("first", "segment started")}


def test_notifications_in_plain_text_and_an_unreachable_url_never_block(stub_project, cli_runner, inbox):
    url, received = inbox
    result = cli_runner.invoke(cli, ["launch", "--name", "texted", "--notify", url,
                                     *sets([*STUB_CHAIN, "max_steps=5", 'notify_format="text"'])])
    assert result.exit_code == 0, result.output
    texts = [body.decode() for kind, body in received if kind.startswith("text/plain")]
    assert any(t.startswith("kaggle-runner: run texted completed") for t in texts), texts
    unreachable = cli_runner.invoke(cli, ["launch", "--name", "nobody", "--notify", "http://127.0.0.1:9/x",
                                          *sets([*STUB_CHAIN, "max_steps=5"])])
    assert unreachable.exit_code == 0, unreachable.output
    assert run_status(".kaggle-runner", "nobody")["state"] == "complete"


@pytest.mark.parametrize("kind, expected", [("systemd", "ExecStart="), ("launchd", "<key>ProgramArguments</key>")])
def test_service_files_keep_watch_all_running(tmp_path, monkeypatch, cli_runner, kind, expected):
    monkeypatch.chdir(tmp_path)
    result = cli_runner.invoke(cli, ["service", kind])
    assert result.exit_code == 0, result.output
    assert expected in result.output and "--all" in result.output
    assert str((tmp_path / ".kaggle-runner").resolve()) in result.output


@pytest.mark.parametrize(("setting", "message"), [
    ('init_from="./my-model"', "init_from './my-model' is a folder on this machine, which a Kaggle kernel cannot"),
    ('text_files_path="./my-model"', "set data_dir = './my-model' instead"),
])
def test_a_path_on_this_machine_is_refused_before_anything_goes_to_kaggle(tmp_path, monkeypatch, cli_runner, setting,
                                                                          message):
    monkeypatch.chdir(tmp_path)
    assert cli_runner.invoke(cli, ["init", "--preset", "tiny"]).exit_code == 0
    Path("my-model").mkdir()
    extra = ['dataset="text-files"'] if setting.startswith("text_files_path") else []
    result = cli_runner.invoke(cli, ["launch", "--set", setting, *sum((["--set", e] for e in extra), [])])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not Path(".kaggle-runner").exists()


def test_resume_takes_the_config_file_of_a_data_dir_run(stub_project, cli_runner):
    """launch stores a data_dir run as training on the uploaded corpus dataset; the same file given to resume
    is read the same way, not refused as a change of dataset."""
    Path("corpus").mkdir()
    Path("corpus/a.txt").write_text("Some text of my own, line after line.\n" * 50)
    own = [*STUB_CHAIN, 'data_dir="corpus"', 'dataset="stdlib-docs"']
    result = cli_runner.invoke(cli, ["launch", "--name", "texts", "--max-segments", "1", *sets(own)])
    assert result.exit_code == 4, result.output
    assert "data_dir is set, so the run trains on 'corpus', not on dataset 'stdlib-docs'" in result.output
    same_run = [item for item in own if not item.startswith("max_segments")]
    resumed = cli_runner.invoke(cli, ["resume", "texts", "-c", "kaggle-runner.toml", *sets(same_run)])
    assert resumed.exit_code == 0, resumed.output
    assert run_status(".kaggle-runner", "texts")["state"] == "complete"


def test_resume_takes_a_fixed_config_file(stub_project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "filed", "--max-segments", "1", *sets(STUB_CHAIN)])
    assert result.exit_code == 4, result.output
    fixed = Path("fixed.toml")
    fixed.write_text(Path("kaggle-runner.toml").read_text().replace("max_segments = 8", "max_segments = 3"))
    same_run = [item for item in STUB_CHAIN if not item.startswith("max_segments")]  # launch's --set, kept
    resumed = cli_runner.invoke(cli, ["resume", "filed", "-c", str(fixed), *sets(same_run)])
    assert resumed.exit_code == 0, resumed.output
    assert run_status(".kaggle-runner", "filed")["state"] == "complete"
    Path("bad.toml").write_text(Path("kaggle-runner.toml").read_text().replace("n_layer = 4", "n_layer = 6"))
    refused = cli_runner.invoke(cli, ["resume", "filed", "-c", "bad.toml"])
    assert refused.exit_code == 1 and "already completed" in refused.output  # a completed run is not resumed
