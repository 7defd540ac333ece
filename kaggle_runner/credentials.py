"""Find Kaggle credentials where the official client looks, and refuse unsafe or missing ones clearly.

Credentials are held in memory only, never written anywhere by kaggle-runner, and `repr()` hides them.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kaggle_runner.errors import KaggleRunnerError


class CredentialsError(KaggleRunnerError):
    pass


@dataclass(frozen=True)
class Credentials:
    username: str | None
    key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = ""


def _config_dir() -> Path:
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home_dir = Path.home() / ".kaggle"
    xdg = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "kaggle"
    return home_dir if home_dir.exists() or not xdg.exists() else xdg


def _token_from(value: str) -> str:
    path = Path(value).expanduser()
    if path.exists():
        _check_private(path)
        return path.read_text().strip()
    return value.strip()


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        raise CredentialsError(f"{path} can be read by other users of this machine; "
                               f"run `chmod 600 {path}` and try again")


def find_credentials() -> Credentials:
    """Access token first, then kaggle.json overlaid by KAGGLE_USERNAME/KAGGLE_KEY: the client's order."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return Credentials(None, token=_token_from(os.environ["KAGGLE_API_TOKEN"]), source="KAGGLE_API_TOKEN")
    for name in ("access_token", "access_token.txt"):
        path = Path.home() / ".kaggle" / name
        if path.exists():
            return Credentials(None, token=_token_from(str(path)), source=str(path))
    values: dict[str, str] = {}
    path = _config_dir() / "kaggle.json"
    if path.exists():
        _check_private(path)
        try:
            values = {k: str(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError):
            raise CredentialsError(f"{path} is not valid JSON; download a new one from "
                                   "https://www.kaggle.com/settings (API > Create New Token)") from None
    username = os.environ.get("KAGGLE_USERNAME", values.get("username"))
    key = os.environ.get("KAGGLE_KEY", values.get("key"))
    if username and key:
        return Credentials(username, key=key, source=str(path) if path.exists() else "KAGGLE_USERNAME/KAGGLE_KEY")
    raise CredentialsError(
        f"no Kaggle credentials found: put kaggle.json in {path.parent} (chmod 600), or set KAGGLE_USERNAME "
        "and KAGGLE_KEY, or KAGGLE_API_TOKEN; create them at https://www.kaggle.com/settings. "
        "To try kaggle-runner without an account, use --local")
