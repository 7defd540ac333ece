"""Shared fixtures: an isolated home (no real Kaggle credentials reach a test) and CLI helpers."""

from __future__ import annotations

import pytest
from click.testing import CliRunner


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
