"""Keep chains going without a terminal open: a cron line, a systemd user timer or unit, or a launchd agent.

Two forms. The timer form runs `kaggle-runner watch --all --once` every few minutes: each pass moves every run
as far as it can go now and exits (exit 6 means "still in flight: run me again"), so a laptop that sleeps only
delays the next pass. The resident form (`--resident`, systemd and launchd only) keeps `watch --all` running.

The command is built as an argument list and quoted for each format (systemd's own quoting and `%`
specifiers, cron's `%`, the shell's, XML); a path with a control character is refused rather than written.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from xml.sax.saxutils import escape

from kaggle_runner.errors import KaggleRunnerError

LABEL = "io.github.kaggle-runner.watch"
UNIT = "kaggle-runner-watch"
IN_FLIGHT_EXIT = 6  # `watch --once`: something is still in flight


def _checked(value: str, what: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise KaggleRunnerError(f"{what} {value!r} holds a control character (a newline?); a service file cannot "
                                "carry it safely: move the project or the workspace to a plain path")
    return value


def command(workspace: Path, once: bool) -> list[str]:
    """The watch command as an argument list: the installed script (one path, spaces and all), or this Python."""
    script = shutil.which("kaggle-runner")
    program = [script] if script else [sys.executable, "-m", "kaggle_runner.cli"]
    parts = [*program, "watch", "--all", *(["--once"] if once else []), "--workspace", str(workspace)]
    return [_checked(part, "the path") for part in parts]


def _systemd_quote(part: str) -> str:
    """One ExecStart argument in systemd's syntax: double quotes, backslash and quote escaped, and the
    specifier `%` and variable `$` doubled."""
    escaped = part.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _systemd_path(path: Path) -> str:
    return str(path).replace("%", "%%")


def systemd(project: Path, workspace: Path, resident: bool, every: int) -> str:
    """A user unit (resident) or a oneshot unit and its timer: save under ~/.config/systemd/user/, then
    `systemctl --user enable --now kaggle-runner-watch.timer` (or .service); `loginctl enable-linger` keeps it
    running after you log out."""
    exec_start = " ".join(_systemd_quote(part) for part in command(workspace, once=not resident))
    service = f"""[Unit]
Description=kaggle-runner: drive every unfinished training chain of {_systemd_path(project)}
After=network-online.target

[Service]
WorkingDirectory={_systemd_path(project)}
ExecStart={exec_start}
"""
    if resident:
        return f"""# ~/.config/systemd/user/{UNIT}.service
{service}Type=simple
Restart=on-failure
RestartSec=60

[Install]
WantedBy=default.target
"""
    return f"""# ~/.config/systemd/user/{UNIT}.service
{service}Type=oneshot
# Exit {IN_FLIGHT_EXIT}: a chain is still in flight, which is the normal state between passes.
SuccessExitStatus={IN_FLIGHT_EXIT}

# ~/.config/systemd/user/{UNIT}.timer
[Unit]
Description=kaggle-runner: a pass over every unfinished training chain every {every} minutes

[Timer]
OnBootSec=2min
OnUnitActiveSec={every}min
Persistent=true

[Install]
WantedBy=timers.target
"""


def launchd(project: Path, workspace: Path, resident: bool, every: int) -> str:
    """A LaunchAgent: save as ~/Library/LaunchAgents/<label>.plist, then `launchctl load` it."""
    arguments = "\n".join(f"    <string>{escape(part)}</string>" for part in command(workspace, once=not resident))
    schedule = ("  <key>KeepAlive</key>\n  <dict><key>SuccessfulExit</key><false/></dict>" if resident else
                f"  <key>StartInterval</key>\n  <integer>{every * 60}</integer>")
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
{schedule}
  <key>StandardOutPath</key>
  <string>{escape(str(workspace / "watch.log"))}</string>
  <key>StandardErrorPath</key>
  <string>{escape(str(workspace / "watch.log"))}</string>
</dict>
</plist>
"""


def cron(project: Path, workspace: Path, every: int) -> str:
    """One crontab line (`crontab -e`): a pass every `every` minutes, its output appended to watch.log."""
    log = workspace / "watch.log"
    shell = (f"cd {shlex.quote(str(project))} && {shlex.join(command(workspace, once=True))} "
             f">> {shlex.quote(str(log))} 2>&1")
    return f"*/{every} * * * * {shell.replace('%', chr(92) + '%')}\n"  # cron reads a bare % as a newline


def service_file(kind: str, workspace: str | Path, resident: bool = False, every: int = 5) -> str:
    workspace = Path(_checked(str(Path(workspace).resolve()), "the workspace"))
    project = Path(_checked(str(Path.cwd().resolve()), "the project folder"))
    if not 1 <= every <= 59:
        raise KaggleRunnerError(f"--every {every}: use 1 to 59 minutes")
    if kind == "systemd":
        return systemd(project, workspace, resident, every)
    if kind == "launchd":
        return launchd(project, workspace, resident, every)
    if kind == "cron":
        if resident:
            raise KaggleRunnerError("cron runs passes, not a resident process: drop --resident")
        return cron(project, workspace, every)
    raise KaggleRunnerError(f"unknown service kind {kind!r}; use cron, systemd or launchd")
