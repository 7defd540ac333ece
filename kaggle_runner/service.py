"""Keep `kaggle-runner watch --all` running across logouts: a systemd user unit or a launchd agent."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from xml.sax.saxutils import escape

from kaggle_runner.errors import KaggleRunnerError

LABEL = "io.github.kaggle-runner.watch"


def _command(workspace: Path) -> list[str]:
    executable = shutil.which("kaggle-runner") or f"{sys.executable} -m kaggle_runner.cli"
    return [*shlex.split(executable), "watch", "--all", "--workspace", str(workspace)]


def systemd_unit(project: Path, workspace: Path) -> str:
    """A user unit: `systemctl --user enable --now kaggle-runner-watch`; `loginctl enable-linger` for logouts."""
    command = " ".join(shlex.quote(part) for part in _command(workspace))
    return f"""[Unit]
Description=kaggle-runner: drive every unfinished training chain of {project}
After=network-online.target

[Service]
Type=simple
WorkingDirectory={project}
ExecStart={command}
Restart=on-failure
RestartSec=60

[Install]
WantedBy=default.target
"""


def launchd_plist(project: Path, workspace: Path) -> str:
    """A LaunchAgent: `launchctl load ~/Library/LaunchAgents/<label>.plist`."""
    arguments = "\n".join(f"    <string>{escape(part)}</string>" for part in _command(workspace))
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{LABEL}</string>
  <key>ProgramArguments</key>
  <array>
{arguments}
  </array>
  <key>WorkingDirectory</key>
  <string>{escape(str(project))}</string>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict><key>SuccessfulExit</key><false/></dict>
  <key>StandardOutPath</key>
  <string>{escape(str(workspace / "watch.log"))}</string>
  <key>StandardErrorPath</key>
  <string>{escape(str(workspace / "watch.log"))}</string>
</dict>
</plist>
"""


def service_file(kind: str, workspace: str | Path) -> str:
    workspace = Path(workspace).resolve()
    project = Path.cwd().resolve()
    if kind == "systemd":
        return systemd_unit(project, workspace)
    if kind == "launchd":
        return launchd_plist(project, workspace)
    raise KaggleRunnerError(f"unknown service kind {kind!r}; use systemd or launchd")
