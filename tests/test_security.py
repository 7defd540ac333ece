"""Trust boundaries on the launcher's side, driven the way a hostile party would drive them: a kernel (or Kaggle
itself) that returns crafted outputs, a user's typo that names a path, another local process holding the store.

The kernel's side (attached datasets are data, never code) is tests/test_kernel.py::
test_attached_datasets_are_data_never_code; the emulator's side is tests/test_emulator.py::test_trust_*.
docs/security.md draws the whole threat model and names the test that guards each boundary.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from kaggle_runner import artifacts, chain
from kaggle_runner.cli import cli
from kaggle_runner.run_views import run_status
from tests.chain_helpers import STUB_CHAIN, sets
from tests.emulator_helpers import KEY

SHORT_RUN = [*STUB_CHAIN, "max_steps=5"]  # one segment, complete at step 5
SENTINEL_TEXT = b"sentinel: the user's own file\n"
EVIL = b"evil bytes from a hostile kernel\n"

# The top of every hostile kernel: rendered below the real CONFIG block, pushed with the official client and run
# by the emulator, exactly as the stub kernel is (KAGGLE_RUNNER_TEST_KERNEL_SOURCE).
HOSTILE_HEAD = '''
import hashlib
import json
import os
import sys
from pathlib import Path


def sha(data):
    return hashlib.sha256(data).hexdigest()


def put(rel, data):
    path = Path(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"sha256": sha(data), "size": len(data)}


def complete(files, step=5):
    Path("manifest.json").write_text(json.dumps({"kaggle_runner_manifest": 1, "files": files}))
    Path("run_state.json").write_text(json.dumps({"status": "complete", "reason": "complete", "message": "",
                                                  "global_step": step, "total_steps": step, "epoch": 1,
                                                  "resumed_from": None}))
    print(json.dumps({"event": "end", "status": "complete", "reason": "complete", "global_step": step}), flush=True)
    return 0


def good_checkpoint():
    rel = "checkpoints/checkpoint_epoch1_step5.pt"
    return {rel: {**put(rel, b'{"step": 5, "weight": 15}'), "kind": "checkpoint", "global_step": 5, "epoch": 1}}
'''


def hostile_kernel(tmp_path: Path, monkeypatch, body: str) -> None:
    source = tmp_path / "hostile_kernel.py"
    source.write_text(HOSTILE_HEAD + body)
    monkeypatch.setenv("KAGGLE_RUNNER_TEST_KERNEL_SOURCE", str(source))


def assert_clean_exit(result, allowed=(0, 1)) -> None:
    """Exit 0, or 1 with one `Error:` line last: never a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in allowed, result.output
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output


def assert_one_line_error(result, *words: str) -> str:
    assert_clean_exit(result, allowed=(1,))
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: "), result.output
    for word in words:
        assert word in line, line
    return line


def snapshot(root: Path, ignore: tuple[str, ...]) -> dict[str, bytes | str]:
    """Every path under `root` but the ignored prefixes: file contents, symlink targets, folders."""
    seen: dict[str, bytes | str] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(ignore):
            continue
        seen[rel] = (f"-> {os.readlink(path)}" if path.is_symlink() else path.read_bytes() if path.is_file()
                     else "dir")
    return seen


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- 1, 2: what a kernel's outputs may do on the laptop -------------------------------------------------------
HOSTILE_NAMES = ("../../outside.txt", "/etc/x", "checkpoints/../../evil.pt", "../.x.staging/../../outside.txt")


@pytest.mark.slow
def test_a_hostile_manifest_and_listing_write_and_delete_nothing_outside_the_output_folder(
        stub_project, emulator, cli_runner, monkeypatch):
    root = stub_project
    sentinel = root / "outside.txt"
    sentinel.write_bytes(SENTINEL_TEXT)
    for folder in ("outputs", "deep"):  # where "checkpoints/../../evil.pt" points from outputs/x and deep/out
        (root / folder).mkdir()
        (root / folder / "evil.pt").write_bytes(SENTINEL_TEXT)
    hostile_kernel(root, monkeypatch, f'''
def main(config):
    files = good_checkpoint()
    evil = {{"sha256": sha({EVIL!r}), "size": {len(EVIL)}, "kind": "checkpoint", "global_step": 99}}
    for rel in {HOSTILE_NAMES!r}:
        files[rel] = evil
    os.symlink({str(sentinel)!r}, "link.pt")  # the emulator serves what a symlink points at
    files["link.pt"] = {{"sha256": sha({SENTINEL_TEXT!r}), "size": {len(SENTINEL_TEXT)}, "kind": "best"}}
    put("final_model/model.safetensors", b"garbage no manifest lists")
    return complete(files)
''')
    # Kaggle itself turns hostile too: its output listing offers those names, backed by real bytes.
    evil_source = root / "emu-evil.bin"
    evil_source.write_bytes(EVIL)
    real_listing = emulator.backend.output_files
    monkeypatch.setattr(emulator.backend, "output_files", lambda owner, slug, version: [
        *real_listing(owner, slug, version), *((name, evil_source) for name in HOSTILE_NAMES)])
    etc_x = Path("/etc/x").exists()
    ignore = ("emu/", "emu-evil.bin", ".kaggle-runner", "outputs/x", "outputs/.x.staging", "deep/out",
              "deep/.out.staging", "hostile_kernel.py")
    before = snapshot(root, ignore)

    launched = cli_runner.invoke(cli, ["launch", "--name", "x", *sets(SHORT_RUN)])
    assert_clean_exit(launched)
    fetched = cli_runner.invoke(cli, ["fetch", "x", "-o", str(root / "deep" / "out")])
    assert_clean_exit(fetched)

    assert snapshot(root, ignore) == before  # nothing outside the output folders was created, changed or deleted
    assert Path("/etc/x").exists() == etc_x
    for target in (root / "outputs" / "x", root / "deep" / "out"):
        assert not any(p.is_symlink() for p in target.rglob("*"))
        assert EVIL not in tree_of(target).values()
        assert not (target / "final_model" / "model.safetensors").exists()  # unlisted: never accepted
        manifest = artifacts.read_manifest(target)
        assert set(manifest["files"]) == {"checkpoints/checkpoint_epoch1_step5.pt", "link.pt"}
        assert all(artifacts.verified(target, rel, info) for rel, info in manifest["files"].items())
    assert "does not list" in fetched.output  # the skipped garbage is mentioned, not taken


@pytest.mark.slow
def test_a_tampered_best_model_never_lands_in_the_output_folder(stub_project, cli_runner, monkeypatch):
    hostile_kernel(stub_project, monkeypatch, '''
def main(config):
    files = good_checkpoint()
    files["final_model/config.json"] = {**put("final_model/config.json", b'{"n_layer": 1}'), "kind": "final_model"}
    put("best_model.pt", b"B" * 64)  # listed with the checksum of other bytes of the same size
    files["best_model.pt"] = {"sha256": sha(b"A" * 64), "size": 64, "kind": "best", "global_step": 5}
    put("final_model/model.safetensors", b"garbage no manifest lists")
    return complete(files)
''')
    launched = cli_runner.invoke(cli, ["launch", "--name", "x", *sets(SHORT_RUN)])
    assert_clean_exit(launched, allowed=(1,))
    assert "best_model.pt does not match the kernel's checksum" in launched.output
    fetched = cli_runner.invoke(cli, ["fetch", "x", "-o", "mine"])
    assert_clean_exit(fetched, allowed=(1,))
    assert "best_model.pt" in fetched.output.strip().splitlines()[-1]
    for target in (Path("outputs/x"), Path("mine")):
        assert not (target / "best_model.pt").exists()
        assert not (target / "final_model" / "model.safetensors").exists()


# -- 3: run names become folder names ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil", "/tmp/x", "a/b", "n" * 200, "..", ".hidden", "a\\b", "ok\n", "-rf"])
def test_a_run_name_that_is_a_path_is_refused_before_anything(stub_project, emulator, cli_runner, name):
    before = snapshot(stub_project, ("emu/",))
    tmp_x = Path("/tmp/x").exists()
    result = cli_runner.invoke(cli, ["launch", "--name", name, *sets(SHORT_RUN)])
    assert_one_line_error(result, "run name", "not allowed")
    assert emulator.app.request_count == 0
    assert snapshot(stub_project, ("emu/",)) == before  # not even the workspace was created
    assert Path("/tmp/x").exists() == tmp_x and not (stub_project.parent / "evil").exists()


# -- 4: configuration ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["learning_rate=inf", "learning_rate=nan", "learning_rate=-inf", "dropout=nan",
                                      "seed=-1", f"seed={2**40}"])
def test_non_finite_numbers_and_seeds_out_of_range_are_refused_naming_the_key(stub_project, emulator, cli_runner,
                                                                              override):
    result = cli_runner.invoke(cli, ["launch", "--name", "cfg", "--set", override])
    assert_one_line_error(result, override.split("=")[0])
    assert emulator.app.request_count == 0 and run_status(".kaggle-runner") == []


def test_a_config_file_that_is_not_utf8_gives_a_one_line_error(stub_project, emulator, cli_runner):
    Path("kaggle-runner.toml").write_bytes(b"\xff\xfe[model]\nn_embd = 64\n")
    result = cli_runner.invoke(cli, ["launch", "--name", "cfg"])
    assert_one_line_error(result, "kaggle-runner.toml")
    assert emulator.app.request_count == 0


# -- 5: the store ------------------------------------------------------------------------------------------------
def _half_a_store() -> bytes:
    from kaggle_runner.store import Store

    Store("whole")
    data = Path("whole/runs.sqlite").read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("damage", ["empty", "not sqlite", "header, then zeros", "cut in half"])
def test_a_damaged_store_is_moved_aside_and_the_next_command_starts_afresh(tmp_path, monkeypatch, cli_runner,
                                                                            damage):
    monkeypatch.chdir(tmp_path)
    content = {"empty": lambda: b"", "not sqlite": lambda: b"not a database at all",
               "header, then zeros": lambda: b"SQLite format 3\x00" + b"\x00" * 200,
               "cut in half": _half_a_store}[damage]()
    Path(".kaggle-runner").mkdir()
    Path(".kaggle-runner/runs.sqlite").write_bytes(content)
    result = cli_runner.invoke(cli, ["status"])
    assert_one_line_error(result, "damaged", "moved")
    assert "No runs yet" not in result.output
    (aside,) = Path(".kaggle-runner").glob("runs.damaged-*.sqlite")
    assert aside.read_bytes() == content  # kept for the user, not deleted
    again = cli_runner.invoke(cli, ["status"])
    assert again.exit_code == 0 and "No runs" in again.output, again.output


@pytest.mark.slow  # it waits out SQLite's 10 s busy timeout by design
def test_a_store_locked_by_another_process_fails_in_about_ten_seconds_saying_locked(tmp_path, monkeypatch,
                                                                                    cli_runner):
    monkeypatch.chdir(tmp_path)
    from kaggle_runner.store import Store

    Store(".kaggle-runner")  # `status` itself creates nothing
    holder = sqlite3.connect(".kaggle-runner/runs.sqlite", isolation_level=None, timeout=1)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        result = cli_runner.invoke(cli, ["status"])
        took = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    line = assert_one_line_error(result, "locked")
    assert "ROLLBACK" not in line and "database is locked" not in line
    assert took > 5, took  # it waited for the lock (SQLite's busy timeout) rather than failing at once
    assert not list(Path(".kaggle-runner").glob("runs.damaged-*"))  # busy is not damaged
    assert cli_runner.invoke(cli, ["status"]).exit_code == 0


# -- 6, 7: nothing recorded before the first request succeeds; credentials only over safe channels --------
@pytest.mark.slow
def test_a_refused_first_request_records_no_run_and_credentials_are_never_written(stub_project, emulator,
                                                                                   cli_runner, monkeypatch):
    monkeypatch.setenv("KAGGLE_KEY", "wrong-key-456")
    refused = cli_runner.invoke(cli, ["launch", "--name", "first", "--detach", *sets(SHORT_RUN)])
    assert_one_line_error(refused, "401")
    assert "wrong-key-456" not in refused.output
    assert run_status(".kaggle-runner") == []
    assert "No runs yet" in cli_runner.invoke(cli, ["status"]).output
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    launched = cli_runner.invoke(cli, ["launch", "--name", "first", "--detach", *sets(SHORT_RUN)])
    assert launched.exit_code == 0, launched.output
    assert [run["name"] for run in run_status(".kaggle-runner")] == ["first"]
    for path in [*Path(".kaggle-runner").rglob("*"), *Path(".").glob("*.toml")]:
        if path.is_file():
            data = path.read_bytes()
            assert KEY.encode() not in data and b"wrong-key-456" not in data, path


@pytest.mark.parametrize("endpoint", ["http://example.com", "http://127.0.0.1@example.com/",
                                      "http://localhost.example.com:8080", "http://{int_ip}:{port}"])
def test_plain_http_to_another_host_is_refused_before_any_request(stub_project, emulator, cli_runner, endpoint):
    endpoint = endpoint.format(int_ip=2130706433, port=emulator.port)  # 127.0.0.1 in disguise: refused too
    result = cli_runner.invoke(cli, ["launch", "--name", "h", "--endpoint", endpoint, *sets(SHORT_RUN)])
    assert_one_line_error(result, "credentials", "KAGGLE_RUNNER_ALLOW_HTTP")
    assert emulator.app.request_count == 0 and run_status(".kaggle-runner") == []


@pytest.mark.slow
def test_loopback_http_is_allowed_other_http_only_when_asked_and_rechecked_from_the_store(
        stub_project, emulator, cli_runner, monkeypatch):
    loopback = cli_runner.invoke(cli, ["launch", "--name", "lo", "--detach", "--endpoint", emulator.url,
                                       *sets(SHORT_RUN)])
    assert loopback.exit_code == 0, loopback.output
    monkeypatch.setenv("KAGGLE_RUNNER_ALLOW_HTTP", "1")
    disguised = f"http://2130706433:{emulator.port}"  # not recognisably loopback, so it takes the opt-in
    asked = cli_runner.invoke(cli, ["launch", "--name", "asked", "--detach", "--endpoint", disguised,
                                    *sets([*SHORT_RUN, 'slug="kaggle-runner-tinier"', 'title="Kaggle Runner Tinier"'])])
    assert asked.exit_code == 0, asked.output
    monkeypatch.delenv("KAGGLE_RUNNER_ALLOW_HTTP")
    # Another local user rewrites the run's endpoint in the store: the next command checks it again.
    with sqlite3.connect(".kaggle-runner/runs.sqlite") as db:
        db.execute("UPDATE runs SET endpoint = 'http://example.com' WHERE name = 'lo'")
    db.close()
    sent = emulator.app.request_count
    assert_one_line_error(cli_runner.invoke(cli, ["logs", "lo"]), "credentials")
    assert_one_line_error(cli_runner.invoke(cli, ["fetch", "lo", "-o", "lo-out"]), "credentials")
    assert emulator.app.request_count == sent and not Path("lo-out").exists()


# -- 8: malformed manifests and run states -----------------------------------------------------------------------
MALFORMED = ["[]", '{"files": []}', '{"files": null}', '{"files": {"a.pt": "x"}}', "null", '"text"', "7",
             '{"files": {"a.pt": {"sha256": 1, "size": "2"}}}', '{"files": {"a.pt": {"sha256": "ab", "size": 1e999}}}',
             '{"files": {"../a.pt": {"sha256": "ab", "size": 1}, "": {"sha256": "ab", "size": 1}}}',
             '{"status": "compl', "\udcff"]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_manifests_and_run_states_read_as_empty_never_raise(tmp_path, text):
    for name in (artifacts.MANIFEST, artifacts.RUN_STATE):
        (tmp_path / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    manifest = artifacts.read_manifest(tmp_path)
    assert manifest["files"] == {} and artifacts.checkpoints_newest_first(manifest) == []
    assert artifacts.token_files(manifest) == []
    state = artifacts.read_run_state(tmp_path)
    assert state is None or isinstance(state, dict)


def test_a_manifest_that_is_a_folder_reads_as_empty(tmp_path):
    (tmp_path / artifacts.MANIFEST).mkdir()
    (tmp_path / artifacts.RUN_STATE).mkdir()
    assert artifacts.read_manifest(tmp_path)["files"] == {} and artifacts.read_run_state(tmp_path) is None


def test_a_deeply_nested_manifest_reads_as_empty(tmp_path):
    for name in (artifacts.MANIFEST, artifacts.RUN_STATE):
        (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
    assert artifacts.read_manifest(tmp_path)["files"] == {}
    assert artifacts.read_run_state(tmp_path) is None


@pytest.mark.slow
def test_a_kernel_whose_manifest_and_run_state_are_lists_fails_the_chain_cleanly(stub_project, cli_runner,
                                                                                 monkeypatch):
    hostile_kernel(stub_project, monkeypatch, '''
def main(config):
    Path("manifest.json").write_text("[]")
    Path("run_state.json").write_text("[]")
    return 0
''')
    launched = cli_runner.invoke(cli, ["launch", "--name", "odd", *sets(SHORT_RUN)])
    assert_clean_exit(launched, allowed=(3,))  # the chain failed, and says so
    status = run_status(".kaggle-runner", "odd")
    assert status["state"] == "failed" and "before its first training step" in status["reason"], status
    fetched = cli_runner.invoke(cli, ["fetch", "odd", "-o", "odd-out"])
    assert_clean_exit(fetched)


def test_a_diverged_kernel_fails_the_chain_saying_why():
    outcome = chain.SegmentOutcome("COMPLETE", None, {"status": "incomplete", "reason": "diverged", "global_step": 12,
                                                      "message": "loss not finite for 6 optimizer steps in a row"},
                                   has_checkpoint=True)
    decision = chain.decide(outcome, [], 1, 6, 2, None, 0, "run")
    assert decision.action == "fail" and "diverged" in decision.reason and "not finite" in decision.reason


# -- 9: disk errors while fetching ---------------------------------------------------------------------------------
@pytest.fixture
def fetched_run(stub_project, cli_runner):
    result = cli_runner.invoke(cli, ["launch", "--name", "x", *sets(SHORT_RUN)])
    assert result.exit_code == 0 and run_status(".kaggle-runner", "x")["state"] == "complete", result.output
    return "x"


def _root_can_write_through_chmod(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_text("")
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.mark.slow
def test_an_output_path_under_a_file_gives_a_one_line_error(fetched_run, cli_runner):
    Path("a-file").write_text("not a folder")
    assert_one_line_error(cli_runner.invoke(cli, ["fetch", fetched_run, "-o", "a-file/out"]))


@pytest.mark.slow
def test_a_folder_where_a_listed_file_must_go_gives_a_one_line_error(fetched_run, cli_runner):
    Path("blocked/best_model.pt").mkdir(parents=True)
    assert_one_line_error(cli_runner.invoke(cli, ["fetch", fetched_run, "-o", "blocked"]))


@pytest.mark.slow
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod does not stop writes (the test above blocks the path instead)")
def test_a_read_only_output_folder_gives_a_one_line_error(fetched_run, cli_runner):
    folder = Path("read-only")
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if _root_can_write_through_chmod(folder):
            pytest.skip("chmod does not stop writes here (a capability or file system that ignores it)")
        result = cli_runner.invoke(cli, ["fetch", fetched_run, "-o", str(folder / "out")])
        assert_one_line_error(result)
    finally:
        folder.chmod(0o755)
