"""Shared fixtures: an isolated home (no real Kaggle credentials reach a test) and CLI helpers."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from kaggle_runner.cli import cli
from kaggle_runner.emulator.server import EmulatorServer
from tests.chain_helpers import STUB
from tests.emulator_helpers import KEY, USER

# One thread per kernel process: the suite runs several files side by side on 2 cores (pytest -n), where
# oversubscribed OpenMP threads spin instead of working. Results do not depend on it: every comparison of
# weights runs both sides under the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR",
                 "KAGGLE_API_ENVIRONMENT", "KAGGLE_RUNNER_API_ENDPOINT", "KAGGLE_RUNNER_WORKSPACE"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def cli_runner():
    return CliRunner()


@pytest.fixture
def emulator(tmp_path):
    with EmulatorServer(tmp_path / "emu", username=USER, key=KEY, kill_grace_seconds=5) as server:
        yield server


@pytest.fixture
def project(tmp_path, monkeypatch, emulator, cli_runner):
    """A project folder with a tiny config and credentials for the emulator in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    monkeypatch.setenv("KAGGLE_RUNNER_API_ENDPOINT", emulator.url)
    assert cli_runner.invoke(cli, ["init", "--preset", "tiny"]).exit_code == 0
    return tmp_path


@pytest.fixture
def stub_project(project, monkeypatch):
    """The same project, whose kernel is the stub (tests/stub_kernel.py): the chain's logic without training."""
    monkeypatch.setenv("KAGGLE_RUNNER_TEST_KERNEL_SOURCE", STUB)
    return project
