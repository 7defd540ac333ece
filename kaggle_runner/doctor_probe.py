"""The probe kernels `kaggle-runner doctor` pushes: a tiny CPU script that reports what its session sees.

It reads the nonce of the probe dataset (which version Kaggle attached), the outputs nonce of each kernel
source (which version's outputs Kaggle attached), the image's versions, internet access and the session
variable, and prints them as one JSON line (also saved as probe.json); it writes its own outputs nonce, so a
later probe can attach this version's outputs. Settings enter as one JSON string literal: data, never code.
"""

from __future__ import annotations

import json
from pathlib import Path

PROBE_SLUG = "kaggle-runner-probe"
PROBE_TITLE = "Kaggle Runner Probe"
SECOND_SLUG = "kaggle-runner-probe-b"  # the outputs route's second kernel, as a probe
SECOND_TITLE = "Kaggle Runner Probe B"
DATA_SLUG = "kaggle-runner-probe-data"
DATA_TITLE = "Kaggle Runner Probe Data"
NONCE_FILE = "kaggle-runner-probe-nonce.json"
OUTPUTS_NONCE_FILE = "kaggle-runner-probe-outputs.json"
PROBE_OUTPUT = "probe.json"
INTERNET_URL = "https://huggingface.co"

PROBE_SCRIPT = '''"""kaggle-runner doctor's probe: reports what a CPU session sees, as one JSON line and probe.json."""
import json
import os
import platform
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

SETTINGS = json.loads(__SETTINGS__)  # data from kaggle-runner doctor, as a JSON string


def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def find(root, folders, name):
    """(nonce, layout, path) of the first `name` in `folders` (the two mount layouts), else anywhere shallow."""
    candidates = [root / folder / name for folder in folders]
    candidates += sorted(p for depth in ("*", "*/*", "*/*/*", "*/*/*/*") for p in root.glob(depth + "/" + name))
    for path in candidates:
        if path.is_file():
            try:
                nonce = json.loads(path.read_text()).get("nonce")
            except (OSError, ValueError, AttributeError):
                nonce = None
            rel = path.relative_to(root)
            layout = rel.parts[0] if rel.parts[0] in ("datasets", "notebooks") else \\
                "slug" if len(rel.parts) == 2 else "other"
            return nonce, layout, str(rel)
    return None, None, None


def internet():
    try:
        urllib.request.urlopen(SETTINGS["internet_url"], timeout=SETTINGS["internet_timeout"]).close()
        return True, None
    except urllib.error.HTTPError:
        return True, None  # an answer, even a refusal, means the network works
    except Exception as exc:
        return False, (type(exc).__name__ + ": " + str(exc))[:200]


root = Path(os.environ.get("KAGGLE_RUNNER_INPUT_DIR") or "/kaggle/input")
working = Path("/kaggle/working")
working = working if working.is_dir() else Path.cwd()
working.joinpath(SETTINGS["outputs_file"]).write_text(json.dumps({"nonce": SETTINGS["outputs_nonce"]}))
report = {"event": "probe", "nonce": None, "mount_layout": None, "mount_path": None, "input_root": str(root)}
if SETTINGS["dataset"]:
    owner, slug = SETTINGS["dataset"].split("/")
    nonce, layout, where = find(root, ["datasets/" + owner + "/" + slug, slug], SETTINGS["nonce_file"])
    report.update(nonce=nonce, mount_layout=layout if layout != "notebooks" else "other", mount_path=where)
seen = {}
for source in SETTINGS["kernel_sources"]:
    owner, slug = source.split("/")
    nonce, layout, where = find(root, ["notebooks/" + owner + "/" + slug, slug], SETTINGS["outputs_file"])
    seen[source] = {"nonce": nonce, "layout": layout, "path": where}
online, why_offline = internet()
report.update({
    "kernel_sources_seen": seen,
    "python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
    "datasets": version("datasets"), "internet": online, "internet_error": why_offline,
    "session_variable": bool(os.environ.get("KAGGLE_CONTAINER_NAME")),
})
print(json.dumps(report), flush=True)
working.joinpath(SETTINGS["output"]).write_text(json.dumps(report))
'''


def probe_script(dataset_ref: str | None, kernel_sources: list[str] | None = None, outputs_nonce: str = "") -> str:
    settings = {"dataset": dataset_ref, "nonce_file": NONCE_FILE, "output": PROBE_OUTPUT,
                "internet_url": INTERNET_URL, "internet_timeout": 5, "kernel_sources": list(kernel_sources or []),
                "outputs_file": OUTPUTS_NONCE_FILE, "outputs_nonce": outputs_nonce}
    # The settings enter as one Python string literal holding JSON: data, never code.
    return PROBE_SCRIPT.replace("__SETTINGS__", repr(json.dumps(settings)))


def write_probe(folder: Path, kernel_ref: str, dataset_ref: str | None, internet: bool = True,
                kernel_sources: list[str] | None = None, outputs_nonce: str = "", title: str = PROBE_TITLE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe.py").write_text(probe_script(dataset_ref, kernel_sources, outputs_nonce), encoding="utf-8")
    (folder / "kernel-metadata.json").write_text(json.dumps({
        "id": kernel_ref, "title": title, "code_file": "probe.py", "language": "python",
        "kernel_type": "script", "is_private": True, "enable_gpu": False, "enable_tpu": False,
        "enable_internet": internet, "dataset_sources": [dataset_ref] if dataset_ref else [],
        "competition_sources": [], "kernel_sources": list(kernel_sources or []), "model_sources": [],
        "keywords": [],
    }, indent=2) + "\n", encoding="utf-8")
    return folder


def write_probe_dataset(folder: Path, dataset_ref: str, nonce: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / NONCE_FILE).write_text(json.dumps({"nonce": nonce}))
    (folder / "dataset-metadata.json").write_text(json.dumps({
        "id": dataset_ref, "title": DATA_TITLE, "licenses": [{"name": "CC0-1.0"}],
        "description": "A nonce that kaggle-runner doctor's probe kernel reads, to measure dataset pinning.",
    }, indent=2))
    return folder


def report_in_log(log: str | None) -> dict | None:
    """The probe's {"event": "probe"} line from a log (Kaggle's JSON list of stream events, or plain text)."""
    if not log:
        return None
    try:
        events = json.loads(log)
        text = "".join(str(e.get("data", "")) for e in events if isinstance(e, dict)) if isinstance(events, list) \
            else log
    except (ValueError, RecursionError):  # the emulator's and Kaggle's logs can be JSON lines
        text = "".join(_data_of(line) for line in log.splitlines())
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"probe"' in line:
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(event, dict) and event.get("event") == "probe":
                return event
    return None


def _data_of(line: str) -> str:
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return line + "\n"
    return str(event.get("data", "")) if isinstance(event, dict) and "stream_name" in event else line + "\n"
