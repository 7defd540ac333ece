"""Project-level helpers behind `init` and `render`: preset files and kernel folders."""

from __future__ import annotations

from pathlib import Path

from kaggle_runner.config import load_config, preset_text
from kaggle_runner.credentials import CredentialsError, find_credentials
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.render import RenderedKernel, render_kernel


def write_preset(preset: str, path: Path, force: bool = False) -> Path:
    if path.exists() and not force:
        raise KaggleRunnerError(f"{path} already exists; pass --force to overwrite it, or -o to write elsewhere")
    path.write_text(preset_text(preset), encoding="utf-8")
    return path


def default_username() -> str:
    try:
        credentials = find_credentials()
    except CredentialsError as exc:
        raise KaggleRunnerError(f"--username not given and {exc}") from None
    if not credentials.username:
        raise KaggleRunnerError("an access token does not name its user offline; pass --username")
    return credentials.username


def render_to_folder(config_path: str, out_dir: str, overrides: tuple[str, ...] = (),
                     username: str | None = None) -> RenderedKernel:
    config = load_config(config_path, overrides)
    return render_kernel(config, Path(out_dir), username or default_username())
