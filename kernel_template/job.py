"""Your own training script, chained: what kaggle-runner pushes for a [job] (docs/script.md).

Contents: the contract with the launcher; paths and events; the shipped files; the carried checkpoint (found
by name and sha256 among the inputs, unpacked read-only); running the script (its environment, the deadline,
SIGTERM forwarded); carrying its checkpoint directory on (one tar in checkpoints/, named .ckpt); the manifest and
run_state.json; main. Standard library only: it runs before anything is installed.
"""


import base64
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

# ---------------------------------------------------------------------------------------------------
# The contract with the launcher: the same file names as kaggle-runner's own kernel, this kernel's reasons
# ---------------------------------------------------------------------------------------------------
# Literals only: kaggle_runner/contract.py reads them from this file without running it.
MANIFEST_NAME = "manifest.json"  # {"files": {relpath: {"sha256", "size", "kind", ...}}}: every output
RUN_STATE_NAME = "run_state.json"  # how the session ended: status, reason, message, step (checkpoints carried)
CHECKPOINT_DIR = "checkpoints"  # the carried checkpoint directory, one tar (.ckpt) per segment
MANIFEST_FORMAT = 1
FILE_KINDS = ("checkpoint", "output")
# JSON lines on stdout: session (who and where), start (the segment and what it resumes), end.
EVENTS = ("session", "start", "end")
STOP_REASONS = {
    "complete": "the script exited 0: training is finished",
    "job_resume": "the script saved and asked for a new session (exit 75, or request_resume() and exit 0)",
    "time_budget": "the script was stopped at KAGGLE_RUNNER_DEADLINE; its checkpoint directory is carried on",
    "interrupted": "the session was interrupted (SIGTERM, forwarded to the script); its checkpoint directory "
                   "is carried on",
    "job_failed": "the script exited with a code other than 0 or 75",
    "error": "the job kernel itself failed; the checkpoint directory is carried on if it holds anything",
    "resume_missing": "the chain's checkpoint was not attached (Kaggle attached an older version)",
    "resume_error": "the carried checkpoint could not be unpacked",
    "config_error": "the shipped files or the requirements could not be set up",
    "no_gpu": "the session came without a usable GPU",
    "output_budget": "the checkpoint directory would not fit beside the outputs under output_budget_gb; nothing "
                     "is carried on",
}
EXIT_FINISHED, EXIT_RESUME = 0, 75
RESUMABLE = ("job_resume", "time_budget", "interrupted", "error")


class JobStop(Exception):
    """The job cannot run: the reason written to run_state.json."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ---------------------------------------------------------------------------------------------------
# Paths and events
# ---------------------------------------------------------------------------------------------------
def input_root() -> Path:
    """Attached datasets and kernel outputs: /kaggle/input on Kaggle, overridable for local runs."""
    return Path(os.environ.get("KAGGLE_RUNNER_INPUT_DIR", "/kaggle/input"))


def scratch_dir() -> Path:
    """Outside /kaggle/working, so none of it becomes an output: the files, the checkpoint directory."""
    path = Path(os.environ.get("KAGGLE_RUNNER_SCRATCH_DIR") or Path(tempfile.gettempdir()) / "kaggle-runner-job")
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(message: str) -> None:
    print(f"[kaggle-runner job] {message}", flush=True)


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# The shipped files: written out byte for byte, inside one folder
# ---------------------------------------------------------------------------------------------------
def unpack(files: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
            raise JobStop("config_error", f"shipped file {rel!r} is not a relative path")
        path = folder.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(text))
    return folder


# ---------------------------------------------------------------------------------------------------
# The carried checkpoint: the tar the launcher names, by name and sha256, unpacked read-only
# ---------------------------------------------------------------------------------------------------
def source_folders(chain: dict) -> list[Path]:
    """Where Kaggle mounts the checkpoint's source: a dataset at <input>/datasets/<owner>/<slug>/ or
    <input>/<slug>/, a kernel's outputs at <input>/notebooks/<owner>/<slug>/ or <input>/<slug>/."""
    ref = chain.get("kernel") or chain["dataset"]
    owner, _, slug = ref.partition("/")
    return [input_root() / ("notebooks" if chain.get("kernel") else "datasets") / owner / slug, input_root() / slug]


def find_carried(chain: dict) -> Path:
    name, wanted = chain["file"], chain["sha256"]
    parts = PurePosixPath(name).parts
    candidates = [folder.joinpath(*parts) for folder in source_folders(chain)]
    candidates += sorted(input_root().rglob(parts[-1])) if input_root().is_dir() else []
    for path in candidates:
        if path.is_file() and sha256_of(path) == wanted:
            return path
    where = f"the outputs of kernel {chain['kernel']}" if chain.get("kernel") else f"dataset {chain['dataset']}"
    raise JobStop("resume_missing", f"the chain's checkpoint {name} (sha256 {wanted[:12]}) from {where} is not under "
                                    f"{input_root()}: Kaggle attached an older version; push again later")


def unpack_carried(archive: Path, folder: Path) -> Path:
    """The previous session's checkpoint directory, read-only: a script must never change what it resumes from."""
    try:
        with tarfile.open(archive) as packed:
            packed.extractall(folder, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise JobStop("resume_error", f"the carried checkpoint {archive.name} could not be unpacked ({exc})") from None
    for path in sorted(folder.rglob("*"), reverse=True):
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH | (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
                                                                  if path.is_dir() else 0))
    folder.chmod(0o555)
    return folder


def content_digest(folder: Path) -> str | None:
    """What a checkpoint directory holds, by names and bytes (not times): None when it holds nothing."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_of(path)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Running the script: its environment, the deadline, SIGTERM forwarded
# ---------------------------------------------------------------------------------------------------
INTERRUPTED = {"signal": False}
CHILD: dict = {"process": None}


def signal_script(process: subprocess.Popen, signum: int) -> None:
    """To the script's whole process group (it leads one of its own): workers a launcher such as torchrun or
    accelerate starts are asked to stop, and killed, with it, and none writes on while the checkpoint is packed."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def on_sigterm(signum, frame) -> None:
    INTERRUPTED["signal"] = True
    process = CHILD["process"]
    if process is not None and process.poll() is None:
        signal_script(process, signal.SIGTERM)


def die_with_parent() -> None:
    """The script's process dies with this one (Linux): a platform kill of the job kernel leaves no orphan."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def install_requirements(config: dict, source: Path) -> None:
    requirements = config.get("requirements")
    if not requirements:
        return
    if not config.get("enable_internet", True) or os.environ.get("KAGGLE_RUNNER_NO_INTERNET"):
        log(f"not installing {requirements}: this session has no internet")
        return
    log(f"installing {requirements}")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", str(source / requirements)],
                          capture_output=True, text=True)
    if done.returncode:
        raise JobStop("config_error", f"pip could not install {requirements}: {done.stderr.strip()[-500:]}")


def run_script(config: dict, source: Path, env: dict, deadline: float) -> tuple[int, bool]:
    """The script's exit code, and whether it was stopped at the deadline: SIGTERM there, SIGKILL once half the
    safety margin has passed too (the other half carries the checkpoint on)."""
    command = [sys.executable, "-u", str(source / config["script"]), *config.get("args", [])]
    process = subprocess.Popen(command, cwd=Path.cwd(), env=env, start_new_session=True, preexec_fn=die_with_parent)
    CHILD["process"] = process
    stopped = False
    kill_at = deadline + config["safety_margin_seconds"] / 2
    while process.poll() is None:
        now = time.time()
        if not stopped and now >= deadline:
            log("the deadline has come: asking the script to save and stop (SIGTERM)")
            stopped = True
            signal_script(process, signal.SIGTERM)
        if now >= kill_at:
            log("the script did not stop in time: killing it")
            signal_script(process, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)
    CHILD["process"] = None
    signal_script(process, signal.SIGKILL)  # workers the script left behind must not write on while it is packed
    return process.returncode, stopped


def reason_for(code: int, stopped: bool, resume_asked: bool) -> tuple[str, str]:
    if code == EXIT_FINISHED and not resume_asked:
        return "complete", "the script finished"
    if code == EXIT_RESUME or (code == EXIT_FINISHED and resume_asked):
        return "job_resume", "the script saved and asked for a new session"
    if INTERRUPTED["signal"]:
        return "interrupted", f"the session was interrupted; the script exited {code}"
    if stopped:
        return "time_budget", f"the script was stopped at the deadline (exit {code})"
    return "job_failed", f"the script exited with code {code}; see the log above"


# ---------------------------------------------------------------------------------------------------
# Carrying the checkpoint directory on, the manifest and run_state.json
# ---------------------------------------------------------------------------------------------------
def carry(folder: Path, segment: int) -> Path | None:
    """The checkpoint directory as one tar in checkpoints/ (an output the next segment attaches), named .ckpt: Kaggle
    unpacks a dataset's .tar and .zip files, and the chain needs this one whole, by its sha256."""
    if content_digest(folder) is None:
        return None
    target = Path.cwd() / CHECKPOINT_DIR / f"job_checkpoint_seg{segment}.ckpt"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with tarfile.open(partial, "w") as packed:
        for path in sorted(folder.rglob("*")):
            packed.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    os.replace(partial, target)
    return target


def tree_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def over_budget(config: dict, folder: Path) -> str | None:
    """Why carrying `folder` would pass output_budget_gb: Kaggle saves at most 20 GiB of /kaggle/working, and a
    write past that fails as a full disk does, losing the whole session's outputs."""
    budget_gb = config.get("output_budget_gb", 19)
    outputs, checkpoint = tree_size(Path.cwd()), tree_size(folder)
    if outputs + checkpoint <= budget_gb * 2**30:
        return None
    return (f"the checkpoint directory ({checkpoint / 2**30:.2f} GiB) beside the outputs in /kaggle/working "
            f"({outputs / 2**30:.2f} GiB) would pass output_budget_gb = {budget_gb} (Kaggle saves at most 20 GiB); "
            "save less in the checkpoint directory or write less to /kaggle/working")


def image_facts() -> dict:
    """The image this session runs on, as kaggle-runner's own kernel reports it, so the launcher says when a
    later segment landed on another one; package versions read without importing them."""
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
            "build_date": os.environ.get("BUILD_DATE"), "git_commit": os.environ.get("GIT_COMMIT")}


def write_manifest(carried: Path | None, generation: int) -> None:
    working = Path.cwd()
    files = {}
    for path in sorted(working.rglob("*")):
        rel = path.relative_to(working).as_posix()
        ours_half_written = path.name.startswith(".") and path.name.endswith((".partial", ".tmp"))
        if not path.is_file() or path.is_symlink() or rel in (MANIFEST_NAME, RUN_STATE_NAME) or ours_half_written:
            continue
        entry = {"sha256": sha256_of(path), "size": path.stat().st_size, "kind": "output"}
        if carried is not None and path == carried:
            entry.update(kind="checkpoint", global_step=generation)
        files[rel] = entry
    write_json(working / MANIFEST_NAME, {"kaggle_runner_manifest": MANIFEST_FORMAT, "files": files})


# ---------------------------------------------------------------------------------------------------
# main: one session of the job
# ---------------------------------------------------------------------------------------------------
def check_gpu(config: dict) -> None:
    if config.get("allow_cpu") or os.environ.get("KAGGLE_RUNNER_EMULATED_GPU"):
        return
    try:
        import torch
    except ImportError:
        return  # a script without torch: its own business
    if not torch.cuda.is_available():
        raise JobStop("no_gpu", "no CUDA device; set allow_cpu = true to run on the CPU")


def main(config: dict, files: dict) -> int:
    started = time.time()
    deadline = started + config["session_timeout_seconds"] - config["safety_margin_seconds"]
    signal.signal(signal.SIGTERM, on_sigterm)
    chain = config.get("chain_checkpoint")
    segment = int(config.get("segment") or 1)
    resumed_generation = int(chain.get("global_step") or 0) if chain else 0
    scratch = scratch_dir()
    checkpoints, marker = scratch / "checkpoint", scratch / "resume-requested"
    checkpoints.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    emit("session", container=os.environ.get("KAGGLE_CONTAINER_NAME"), python=platform.python_version(),
         build_date=os.environ.get("BUILD_DATE"), emulated_gpu=os.environ.get("KAGGLE_RUNNER_EMULATED_GPU"))
    resume_folder, resumed_digest, code = None, None, 1
    try:
        check_gpu(config)
        source = unpack(files, scratch / "files")
        if chain:
            resume_folder = unpack_carried(find_carried(chain), scratch / "resume")
            resumed_digest = content_digest(resume_folder)
        install_requirements(config, source)
        env = {**os.environ, "KAGGLE_RUNNER_CHECKPOINT_DIR": str(checkpoints),
               "KAGGLE_RUNNER_DEADLINE": str(int(deadline)), "KAGGLE_RUNNER_SEGMENT": str(segment),
               "KAGGLE_RUNNER_RESUME_MARKER": str(marker),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))}
        if resume_folder is not None:
            env["KAGGLE_RUNNER_RESUME_DIR"] = str(resume_folder)
        log(f"outputs: /kaggle/working and the checkpoint directory carried on must fit "
            f"{config.get('output_budget_gb', 19)} GiB together (output_budget_gb)")
        emit("start", segment=segment, resumed_from=chain and {"file": chain["file"], "sha256": chain["sha256"]},
             deadline=int(deadline))
        code, stopped = run_script(config, source, env, deadline)
        reason, message = reason_for(code, stopped, marker.exists())
    except JobStop as stop:
        reason, message = stop.reason, stop.message
    except Exception as exc:  # noqa: BLE001 - the job kernel's own failure: said, and the checkpoint carried on
        reason, message = "error", f"{type(exc).__name__}: {exc}"
    carried = None
    if reason not in ("resume_missing", "resume_error", "config_error", "no_gpu"):
        if content_digest(checkpoints) is None and resume_folder is not None:
            checkpoints = resume_folder  # nothing new: carry the resumed one on (the segment made no progress)
        if (why := over_budget(config, checkpoints)) is not None and reason == "complete":
            log(f"not carrying the checkpoint directory on, as training is finished: {why}")
        elif why is not None:
            reason, message = "output_budget", why
        else:
            carried = carry(checkpoints, segment)
    changed = carried is not None and content_digest(checkpoints) != resumed_digest
    generation = resumed_generation + 1 if changed else resumed_generation
    write_manifest(carried, generation)
    status = "complete" if reason == "complete" else "incomplete" if reason in RESUMABLE else "failed"
    write_json(Path.cwd() / RUN_STATE_NAME, {
        "status": status, "reason": reason, "message": message, "global_step": generation, "total_steps": None,
        "epoch": 1, "exit_code": code, "resumed_from": chain and {"file": chain["file"], "sha256": chain["sha256"],
                                                                  "global_step": resumed_generation},
        "newest_checkpoint": carried.relative_to(Path.cwd()).as_posix() if carried else None,
        "image": image_facts(), "updated_at": time.time()})
    emit("end", status=status, reason=reason, global_step=generation)
    log(f"{reason}: {message}")
    return 0 if status != "failed" else 1
