"""What comes back is untrusted, and credentials go only where the user says: a kernel's hostile events,
manifest entries, history and log text; a status Kaggle never sent before; a store edited by another local
user; notifications that must arrive and must not wander. Each test fails on the code before it."""

from __future__ import annotations

import json
import sqlite3
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from kaggle_runner.cli import cli
from kaggle_runner.run_views import run_status
from tests.chain_helpers import SLUG, STUB_CHAIN, final_stub_weight, launcher, sets, start_launcher, stub_weight
from tests.emulator_helpers import USER, admin, local_http_server

pytestmark = pytest.mark.slow


def test_a_hostile_kernel_reaches_neither_the_store_nor_the_terminal(stub_project, cli_runner):
    good = cli_runner.invoke(cli, ["launch", "--name", "good", *sets([*STUB_CHAIN, "max_steps=5"])])
    assert good.exit_code == 0, good.output
    hostile = cli_runner.invoke(cli, ["launch", "--name", "hostile",
                                      *sets([*STUB_CHAIN, 'sample_prompt="stub: hostile"'])])
    assert hostile.exit_code == 0 and "Traceback" not in hostile.output, hostile.output
    assert "\x1b" not in hostile.output
    status = cli_runner.invoke(cli, ["status"])
    assert status.exit_code == 0 and "good" in status.output and "hostile" in status.output, status.output
    assert not list(Path(".kaggle-runner").glob("runs.damaged-*"))  # the store was never taken for damaged
    assert run_status(".kaggle-runner", "hostile")["global_step"] == 20  # the real steps, the junk dropped
    assert final_stub_weight(stub_project / "outputs/hostile", 20) == stub_weight(20)
    logs = cli_runner.invoke(cli, ["logs", "hostile"])
    assert logs.exit_code == 0 and "title and clipboard" in logs.output
    assert "\x1b" not in logs.output and "\x07" not in logs.output  # no title, no clipboard, no clear screen
    assert '{"event"' not in logs.output and '{"event"' in cli_runner.invoke(cli, ["logs", "hostile", "--raw"]).output
    report = cli_runner.invoke(cli, ["report", "hostile"])  # a 400-digit step in the history
    assert report.exit_code == 0 and "Traceback" not in report.output, report.output


def test_a_malformed_number_in_run_state_counts_as_missing(stub_project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "five",
                                     *sets([*STUB_CHAIN, 'sample_prompt="stub: malformed"'])])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert final_stub_weight(stub_project / "outputs/five", 20) == stub_weight(20)


def test_a_status_kaggle_never_sent_before_means_not_started_yet(stub_project, emulator, cli_runner):
    admin(emulator.url, "realism", {"new_script_window": 3})  # kagglesdk 0.1.38's NEW_SCRIPT for a while
    admin(emulator.url, "faults", {"status_names": ["SOMETHING_NEW"] * 3})
    result = cli_runner.invoke(cli, ["launch", "--name", "new", *sets([*STUB_CHAIN, "max_steps=5"])])
    assert result.exit_code == 0, result.output
    assert result.output.count("a status kaggle-runner does not know") == 1, result.output


@pytest.mark.parametrize("pinning", ["original", "latest"])
def test_an_image_update_under_a_chain_is_kept_out_unless_asked_for_and_said(stub_project, emulator, pinning):
    pinned = f'docker_image_pinning_type="{pinning}"'
    process = start_launcher("launch", "--name", "image", *sets([*STUB_CHAIN, pinned]))
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "Segment 1: pushed" in line:
            break
    admin(emulator.url, "realism", {"latest_image": "20261204"})  # Kaggle updates its image mid-chain
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0, "".join(seen) + rest
    kernel = emulator.backend.get_kernel(USER, SLUG)
    assert kernel.image_pinning == pinning  # kernel-metadata.json asked for it
    images = [v.image for v in kernel.versions]
    said = "segment 2 ran on another image than segment 1 (build_date 20261120 -> 20261204)" in rest
    if pinning == "original":
        assert images == ["20261120", "20261120"] and not said, rest
    else:
        assert images == ["20261120", "20261204"] and said, rest


def test_clean_gives_back_the_disk_and_touches_kaggle_only_when_asked(stub_project, emulator, cli_runner):
    first = cli_runner.invoke(cli, ["launch", "--name", "first", *sets(STUB_CHAIN)])
    assert first.exit_code == 0, first.output
    checkpoints = emulator.backend.get_dataset(USER, f"{SLUG}-ckpt")
    uploaded = len(checkpoints.versions)
    cleaned = cli_runner.invoke(cli, ["clean", "first"])
    assert cleaned.exit_code == 0 and "Cleaned run first: removed" in cleaned.output, cleaned.output
    assert not Path(".kaggle-runner/runs/first").exists() and Path("outputs/first").is_dir()
    assert len(checkpoints.versions) == uploaded  # nothing on Kaggle without --on-kaggle
    second = cli_runner.invoke(cli, ["launch", "--name", "second", "--detach", *sets(
        [*STUB_CHAIN, "max_steps=1000", "segment_steps=1000", 'sample_prompt="stub: step=0.5"'])])
    assert second.exit_code == 0, second.output
    refused = cli_runner.invoke(cli, ["clean", "second"])
    assert refused.exit_code == 1 and "cancel second" in refused.output, refused.output
    kept = cli_runner.invoke(cli, ["clean", "first", "--on-kaggle"])  # the running chain uses the same datasets
    assert f"kept dataset {USER}/{SLUG}-ckpt (another run still needs it)" in kept.output, kept.output
    assert cli_runner.invoke(cli, ["cancel", "second"]).exit_code == 0
    emptied = cli_runner.invoke(cli, ["clean", "--finished", "--on-kaggle"])
    assert emptied.exit_code == 0 and f"emptied dataset {USER}/{SLUG}-ckpt" in emptied.output, emptied.output
    assert "Cleaned run second" in emptied.output and "Cleaned run first" not in emptied.output
    assert checkpoints.versions[-1].files == ["EMPTIED.md"]
    assert all(version.files == [] for version in checkpoints.versions[:-1])  # the old checkpoints are gone
    assert emulator.backend.get_kernel(USER, SLUG).versions  # Kaggle kernels stay: they are the user's
    assert "No finished run is left to clean." in cli_runner.invoke(cli, ["clean", "--finished"]).output
    assert {r["name"] for r in run_status(".kaggle-runner")} == {"first", "second"}  # the records stay


@pytest.fixture
def listener():
    """An HTTP server on this machine that records every request's path and Authorization header."""
    seen: list[tuple[str, str | None]] = []

    class Record(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the name http.server calls
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST  # noqa: N815

    with local_http_server(Record) as url:
        yield url, seen


def test_credentials_never_go_to_an_endpoint_the_store_names(stub_project, cli_runner, listener, monkeypatch):
    result = cli_runner.invoke(cli, ["launch", "--name", "mine", *sets([*STUB_CHAIN, "max_steps=5"])])
    assert result.exit_code == 0, result.output
    elsewhere, seen = listener
    db = sqlite3.connect(".kaggle-runner/runs.sqlite")
    db.execute("UPDATE runs SET endpoint = ? WHERE name = 'mine'", (elsewhere,))  # another local user's edit
    db.commit()
    db.close()
    for command in (["logs", "mine"], ["status", "mine"], ["fetch", "mine", "-o", "again"], ["cancel", "mine"]):
        refused = cli_runner.invoke(cli, command)
        assert "Traceback" not in refused.output, refused.output
    monkeypatch.delenv("KAGGLE_RUNNER_API_ENDPOINT")  # and with no endpoint given at all: Kaggle's, not the store's
    refused = cli_runner.invoke(cli, ["logs", "mine"])
    assert refused.exit_code == 1 and "credentials go only where you say" in refused.output, refused.output
    assert seen == []  # not one request, with or without credentials
    cli_runner.invoke(cli, ["logs", "mine", "--endpoint", elsewhere])  # said now: the user's choice
    assert seen and all(auth for _, auth in seen)


def test_the_last_notification_arrives_redirects_are_not_followed_and_the_url_is_not_printed(stub_project, listener):
    received: list[bytes] = []

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path.startswith("/moved"):
                self.send_response(302)
                self.send_header("Location", listener[0] + "/redirected")
                self.end_headers()
                return
            time.sleep(1.5)  # the last post must still arrive, though the chain is over before it answers
            received.append(body)
            self.send_response(404 if self.path.startswith("/gone") else 200)
            self.end_headers()

    with local_http_server(Slow) as url:
        result = launcher("launch", "--name", "told", "--notify", f"{url}/secret-topic-123",
                          *sets([*STUB_CHAIN, "max_steps=5"]))
        assert result.returncode == 0, result.stdout + result.stderr
        assert any(json.loads(body)["event"] == "completed" for body in received), received
        moved = launcher("launch", "--name", "moved", "--notify", f"{url}/moved", *sets([*STUB_CHAIN, "max_steps=5",
                                                                                        'slug="moved-runner"',
                                                                                        'title="Moved Runner"']))
        assert moved.returncode == 0 and not [p for p, _ in listener[1] if p == "/redirected"]
        gone = launcher("launch", "--name", "gone", "--notify", f"{url}/gone-secret-456",
                        *sets([*STUB_CHAIN, "max_steps=5", 'slug="gone-runner"', 'title="Gone Runner"']))
        assert "was refused (HTTP 404)" in gone.stderr and "gone-secret-456" not in gone.stdout + gone.stderr


def test_fetch_lists_the_outputs_once_whatever_their_number(stub_project, emulator, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "many", *sets([*STUB_CHAIN, "max_steps=5",
                                                                       'sample_prompt="stub: files=60"'])])
    assert result.exit_code == 0, result.output
    emulator.app.calls.clear()
    fetched = cli_runner.invoke(cli, ["fetch", "many", "-o", "again"])
    assert fetched.exit_code == 0, fetched.output
    assert len(list(Path("again/final_model").glob("shard-*.json"))) == 60
    assert emulator.app.calls["ListKernelSessionOutput"] <= 10, emulator.app.calls  # not once or more per file


def test_a_run_that_failed_before_writing_outputs_is_said_so_and_reported(stub_project, cli_runner):
    failed = cli_runner.invoke(cli, ["launch", "--name", "broken", *sets([
        *STUB_CHAIN, 'dataset="text-files"', 'text_files_path="missing/*.txt"'])])
    assert failed.exit_code == 3, failed.output
    for command in (["fetch", "broken"], ["generate", "broken", "Hello"]):
        result = cli_runner.invoke(cli, command)
        assert result.exit_code == 1 and "left no manifest.json" in result.output, result.output
        assert "free space" not in result.output and "Traceback" not in result.output
        assert not Path("outputs/broken").exists() and not list(Path("outputs").glob(".broken.staging"))
    report = cli_runner.invoke(cli, ["report", "broken"])  # what exists is what the user wants now
    assert report.exit_code == 0, report.output
    page = Path("outputs/broken/report.html").read_text()
    assert "could not be fetched" in page and "text_files_path" in page
    chart = cli_runner.invoke(cli, ["report", "broken", "-o", "chart.png"])  # the suffix decides
    assert chart.exit_code == 0 and Path("chart.png").read_bytes().startswith(b"\x89PNG")
    assert not Path("chart.html").exists()
