"""Project-level helpers behind `init` and `render`: preset files and kernel folders."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kaggle_runner.config import load_config, preset_text
from kaggle_runner.credentials import CredentialsError, find_credentials
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.job_files import collect
from kaggle_runner.render import RenderedKernel, render_kernel


def write_preset(preset: str, path: Path, force: bool = False) -> Path:
    if path.exists() and not force:
        raise KaggleRunnerError(f"{path} already exists; pass --force to overwrite it, or -o to write elsewhere")
    path.write_text(preset_text(preset), encoding="utf-8")
    example = path.parent / "train.py"
    if preset == "script" and not example.exists():  # a script that keeps the contract, to start from
        example.write_bytes(resources.files("kaggle_runner.presets").joinpath("script_example.py").read_bytes())
    return path


def default_username() -> str:
    try:
        credentials = find_credentials()
    except CredentialsError:
        raise KaggleRunnerError("--username not given, and no usable Kaggle credentials (~/.kaggle/kaggle.json or "
                                "KAGGLE_USERNAME) to read it from; pass --username YOUR_KAGGLE_NAME (render needs "
                                "only the name)") from None
    if not credentials.username:
        raise KaggleRunnerError("an access token does not name its user offline; pass --username")
    return credentials.username


def render_to_folder(config_path: str, out_dir: str, overrides: tuple[str, ...] = (),
                     username: str | None = None) -> RenderedKernel:
    config = load_config(config_path, overrides)
    files = collect(config, Path(config_path).parent) if config.is_job else None
    return render_kernel(config, Path(out_dir), username or default_username(), job_files=files)


# -- the workspaces this user launched from, for `status --all` ------------------------------------------
def registry_path() -> Path:
    import os

    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "kaggle-runner" / "workspaces.json"


def remember_workspace(workspace: str | Path) -> None:
    """Record a workspace once; a registry that cannot be written is not worth failing a launch over."""
    import json

    path = registry_path()
    known = known_workspaces()
    absolute = str(Path(workspace).resolve())
    if absolute in known:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([*known, absolute], indent=1))
        tmp.replace(path)
    except OSError:
        pass


def known_workspaces() -> list[str]:
    import json

    try:
        data = json.loads(registry_path().read_text())
    except (OSError, ValueError):
        return []
    return [item for item in data if isinstance(item, str)] if isinstance(data, list) else []
