"""Runs kernel versions for real: one subprocess each, its log captured, its session limit enforced."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kaggle_runner.emulator.models import MAX_GPU_SESSIONS, TIMEOUT_MESSAGE, Kernel, Version
from kaggle_runner.emulator.state import Backend
from kaggle_runner.states import KaggleStatus

# What a process the emulator starts may inherit: nothing else (no KAGGLE_* credentials, no tokens).
ALLOWED_ENV = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "VIRTUAL_ENV",
                         "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRANSFORMERS_OFFLINE"})
ALLOWED_ENV_PREFIXES = ("LC_", "PYTHON")
DEFAULT_GPU = "NvidiaTeslaT4"


def allowed_environment(env: dict[str, str] | None = None, *extra: str) -> dict[str, str]:
    """The allow-listed part of `env` (default os.environ), plus the names in `extra`."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items()
            if k in ALLOWED_ENV or k in extra or k.startswith(ALLOWED_ENV_PREFIXES)
            or (k.startswith("HF_") and k.endswith("OFFLINE"))}


# What a Kaggle batch session ("Save & Run All", or a pushed version) sets, so that code which detects Kaggle
# (kagglehub's and kagglesdk's is_in_kaggle_notebook, Kaggle's docker-python) behaves the same under --local.
# Names from a dumped batch environment and Kaggle's docker-python; the values are harmless stand-ins: the
# proxy and the site are an address nothing answers on, the tokens open nothing.
UNREACHABLE = "http://127.0.0.1:9"
BATCH_SESSION = {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "KAGGLE_URL_BASE": UNREACHABLE,
                 "KAGGLE_DATA_PROXY_URL": UNREACHABLE, "KAGGLE_DATA_PROXY_PROJECT": "kaggle-runner-emulator",
                 "KAGGLE_DATA_PROXY_TOKEN": "emulated", "KAGGLE_USER_SECRETS_TOKEN": "emulated",
                 "KAGGLE_KERNEL_INTEGRATIONS": ""}
WATCH_SECONDS = 0.05  # how often (real time) a running version's process and working folder are looked at
OUTPUT_CAP_MESSAGE = "Your notebook's output exceeded the {:.2f} GiB that /kaggle/working keeps; nothing was saved."
OUTPUTS_NOT_SAVED = "The notebook's outputs could not be saved ({})."


def kernel_threads() -> int:
    """Threads a kernel's torch may use unless the user set OMP_NUM_THREADS: every core this process may run
    on but one. torch's OpenMP threads wait for each other at every op, so one thread sharing its core with
    any other busy process (the launcher, the emulator, the user's own work) stalls them all: measured on 2
    cores with one other busy process, the tiny demo trained at 411 tokens/s with 2 threads and 8,104 with 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _tree_size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def hold_to_cap(pid: int, working: Path, cap: int) -> None:
    """Keep a running version's working folder under `cap` bytes, as a full disk would: the file being written
    (the newest) may grow only by what the others leave free; past that, writes fail (EFBIG, through the
    process's RLIMIT_FSIZE; Linux only, and only the kernel's own process, not processes it starts)."""
    if cap <= 0 or not hasattr(resource, "prlimit"):
        return
    files = []
    for path in working.rglob("*") if working.is_dir() else ():
        with contextlib.suppress(OSError):
            if path.is_file():
                info = path.stat()
                files.append((info.st_mtime_ns, info.st_size))
    total = sum(size for _, size in files)
    growing = max(files)[1] if files else 0
    with contextlib.suppress(OSError, ValueError):
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (max(1, cap - (total - growing)), resource.RLIM_INFINITY))


def notebook_to_script(notebook_text: str) -> str:
    notebook = json.loads(notebook_text)
    cells = [c for c in notebook.get("cells", []) if c.get("cell_type") == "code"]
    sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]
    return "\n\n".join(sources) + "\n"


class Runner:
    def __init__(self, backend: Backend, python: str = sys.executable):
        self.backend = backend
        self.python = python
        self.processes: dict[tuple[str, int], subprocess.Popen] = {}
        self.cancelled: set[tuple[str, int]] = set()
        self.stuck: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()
        backend.runner = self

    def start_queued(self) -> None:
        """Start queued versions, oldest first, while GPU session slots are free."""
        backend = self.backend
        with backend.lock:
            if backend.faults.hold_queued:
                return
            queued = sorted(((v.created_at, k, v) for k in backend.kernels.values() for v in k.versions
                             if v.status == KaggleStatus.QUEUED), key=lambda item: item[0])
            for _, kernel, version in queued:
                started = backend.gpu_sessions_in_use((KaggleStatus.RUNNING, KaggleStatus.CANCEL_REQUESTED))
                if version.enable_gpu and started >= MAX_GPU_SESSIONS:
                    continue
                self._start(kernel, version)

    def _start(self, kernel: Kernel, version: Version) -> None:
        backend = self.backend
        folder = backend.kernel_dir(kernel.owner, kernel.slug, version.number)
        working, inputs, scratch = folder / "working", folder / "input", folder / "scratch"
        for path in (working, inputs, scratch):
            path.mkdir(parents=True, exist_ok=True)
        backend.mount_inputs(version, inputs)
        backend.mount_kernel_sources(version, inputs)
        code = (folder / version.code_file).read_text(encoding="utf-8")
        script = folder / "__kernel__.py"
        script.write_text(notebook_to_script(code) if version.kernel_type == "notebook" else code)
        env = allowed_environment()
        env.setdefault("OMP_NUM_THREADS", str(kernel_threads()))
        env.update(KAGGLE_RUNNER_INPUT_DIR=str(inputs), KAGGLE_RUNNER_SCRATCH_DIR=str(scratch),
                   KAGGLE_CONTAINER_NAME=f"kernel-session-{version.session_id}", **BATCH_SESSION,
                   BUILD_DATE=version.image, GIT_COMMIT=f"emulated-{version.image}",
                   PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        # A home of the emulator's own, as a Kaggle session's /root: never the user's, where credentials live.
        home = backend.data_dir / "kernel-home"
        home.mkdir(mode=0o700, exist_ok=True)
        env["HOME"] = str(home)
        # Models and datasets the user already has stay usable offline (HF_HUB_OFFLINE above): the hub and
        # datasets caches themselves, not HF_HOME, which also holds the user's Hugging Face token.
        hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
        env["HF_HUB_CACHE"] = os.environ.get("HF_HUB_CACHE") or str(hf_home / "hub")
        env["HF_DATASETS_CACHE"] = os.environ.get("HF_DATASETS_CACHE") or str(hf_home / "datasets")
        if not (version.enable_internet and backend.realism.internet_allowed):
            # the discard port: connections are refused at once
            env.update(HTTP_PROXY=UNREACHABLE, HTTPS_PROXY=UNREACHABLE, http_proxy=UNREACHABLE,
                       https_proxy=UNREACHABLE, NO_PROXY="", no_proxy="")
            if version.enable_internet:  # asked for and not given: say why, so the kernel neither retries nor
                # advises turning on what is on (Kaggle's unverified accounts get no such word)
                env["KAGGLE_RUNNER_NO_INTERNET"] = "the local Kaggle emulator gives its kernels no internet"
        gpu = version.enable_gpu and not backend.realism.no_gpu
        if gpu:  # the GPU asked for, emulated on the CPU; absent when the session "came without one"
            env["KAGGLE_RUNNER_EMULATED_GPU"] = version.machine_shape or DEFAULT_GPU
        log_path = backend.log_path(kernel.owner, kernel.slug, version)
        started = backend.clock()
        with open(log_path, "w", encoding="utf-8") as log:
            if version.enable_gpu:
                note = (f"kaggle-runner emulator: this version asked for a GPU ({version.machine_shape}); "
                        + ("it runs on this machine's CPU.\n" if gpu else
                           "this session came without one and runs on this machine's CPU.\n"))
                log.write(json.dumps({"stream_name": "stdout", "time": 0.0, "data": note}) + "\n")
        process = subprocess.Popen([self.python, "-u", str(script)], cwd=working, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        hold_to_cap(process.pid, working, backend.realism.output_cap_bytes)  # before the kernel's first write
        key = (f"{kernel.owner}/{kernel.slug}", version.number)
        with self.lock:
            self.processes[key] = process
        backend.set_version_status(kernel, version, KaggleStatus.RUNNING, started_at=started)
        write_lock = threading.Lock()
        readers = [threading.Thread(target=self._pump, args=(stream, name, log_path, started, write_lock),
                                    daemon=True)
                   for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._watch, args=(kernel, version, process, readers, working, key),
                         daemon=True).start()

    def _pump(self, stream, name: str, log_path: Path, started: float, write_lock: threading.Lock) -> None:
        for raw in iter(stream.readline, b""):
            event = {"stream_name": name, "time": round(self.backend.clock() - started, 3),
                     "data": raw.decode("utf-8", errors="replace")}
            with write_lock, open(log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(event) + "\n")
        stream.close()

    def _limit(self, version: Version) -> float:
        return float(version.session_timeout_seconds or self.backend.session_limit)

    def _watch(self, kernel, version, process, readers, working: Path, key) -> None:
        backend = self.backend
        limit = self._limit(version)
        timed_out = False
        while process.poll() is None:  # the process, in real time; its session limit, on the emulator's clock
            if not timed_out and backend.clock() - version.started_at > limit:
                timed_out = True
                self._terminate(process, sigterm=backend.realism.sigterm_before_kill)
            hold_to_cap(process.pid, working, backend.realism.output_cap_bytes)
            time.sleep(WATCH_SECONDS)
        for reader in readers:
            reader.join(timeout=5)
        with self.lock:
            self.processes.pop(key, None)
            cancelled = key in self.cancelled
        if backend.kernels.get(key[0]) is not kernel:  # deleted while it ran: nothing of it is kept
            self.start_queued()
            return
        try:
            self._end(kernel, version, process, working, key, cancelled, timed_out)
        except OSError as exc:  # the emulator's own disk is full (or gone): the outputs cannot be saved
            shutil.rmtree(working, ignore_errors=True)
            version.status, version.failure_message = KaggleStatus.ERROR, OUTPUTS_NOT_SAVED.format(exc.strerror)
            version.terminal_at = version.terminal_at or backend.clock()
            with contextlib.suppress(OSError):
                backend.set_version_status(kernel, version, KaggleStatus.ERROR)
        # A session's inputs and scratch end with it, as on Kaggle: only the outputs are kept (extracted
        # archives would otherwise hold tens of MB per version).
        shutil.rmtree(working.parent / "scratch", ignore_errors=True)
        shutil.rmtree(working.parent / "input", ignore_errors=True)
        self.start_queued()

    def idle(self) -> bool:
        """No version running or queued: nothing would be lost if the emulator stopped now."""
        with self.lock:
            if self.processes or self.stuck:
                return False
        return not any(v.status in (KaggleStatus.QUEUED, KaggleStatus.RUNNING, KaggleStatus.CANCEL_REQUESTED)
                       for k in self.backend.kernels.values() for v in k.versions)

    def _end(self, kernel, version, process, working: Path, key, cancelled: bool, timed_out: bool) -> None:
        backend = self.backend
        ended = backend.clock()
        backend.set_version_status(kernel, version, version.status, ended_at=ended)
        if backend.faults.stuck_running and not cancelled:
            with self.lock:
                self.stuck[key] = process.returncode  # still RUNNING until someone cancels it
            return
        cap = backend.realism.output_cap_bytes
        if cap > 0 and _tree_size(working) > cap:  # Kaggle saves at most the cap: none of it, reading it unkindly
            shutil.rmtree(working, ignore_errors=True)
            working.mkdir()
            backend.set_version_status(kernel, version, KaggleStatus.ERROR, OUTPUT_CAP_MESSAGE.format(cap / 2**30),
                                       ended_at=ended, exit_code=process.returncode)
            return
        self._upload_outputs(working)
        if backend.take_disk_full():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if cancelled:
            backend.set_version_status(kernel, version, KaggleStatus.CANCEL_ACKNOWLEDGED, ended_at=ended,
                                       exit_code=process.returncode)
        elif timed_out:
            if backend.faults.drop_outputs_on_timeout:
                shutil.rmtree(working, ignore_errors=True)
                working.mkdir()
            backend.set_version_status(kernel, version, KaggleStatus.CANCEL_ACKNOWLEDGED, TIMEOUT_MESSAGE,
                                       ended_at=ended, exit_code=process.returncode)
        elif process.returncode == 0:
            backend.set_version_status(kernel, version, KaggleStatus.COMPLETE, ended_at=ended, exit_code=0)
        else:
            backend.set_version_status(kernel, version, KaggleStatus.ERROR,
                                       f"Your notebook hit an error: the process exited with code "
                                       f"{process.returncode}. See the log for details.",
                                       ended_at=ended, exit_code=process.returncode)

    def _upload_outputs(self, working: Path) -> None:
        """Kaggle keeps the status RUNNING while it uploads the outputs: a fixed lag plus time per byte."""
        realism = self.backend.realism
        size = sum(p.stat().st_size for p in working.rglob("*") if p.is_file()) if working.is_dir() else 0
        lag = realism.output_lag + size / 1e9 * realism.output_seconds_per_gb
        self.backend.clock.wait_until(self.backend.clock() + lag, stop=lambda: self.backend.closed)

    def _terminate(self, process: subprocess.Popen, sigterm: bool = True) -> None:
        """SIGTERM, a grace period to save, then SIGKILL, for the whole process group (or SIGKILL at once)."""
        if not sigterm:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            return

        def kill_later():
            clock = self.backend.clock
            clock.wait_until(clock() + self.backend.kill_grace_seconds, stop=lambda: process.poll() is not None)
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        threading.Thread(target=kill_later, daemon=True).start()

    def cancel(self, kernel: Kernel, version: Version) -> None:
        key = (f"{kernel.owner}/{kernel.slug}", version.number)
        with self.lock:
            process = self.processes.get(key)
            if process is not None:
                self.cancelled.add(key)
            stuck = key in self.stuck
            exit_code = self.stuck.pop(key, None)
        if process is not None:
            self.backend.set_version_status(kernel, version, KaggleStatus.CANCEL_REQUESTED)
            self._terminate(process)
        elif stuck:
            self.backend.set_version_status(kernel, version, KaggleStatus.CANCEL_ACKNOWLEDGED,
                                            ended_at=self.backend.clock(), exit_code=exit_code)
        elif version.status == KaggleStatus.QUEUED:
            self.backend.set_version_status(kernel, version, KaggleStatus.CANCEL_ACKNOWLEDGED,
                                            ended_at=self.backend.clock())

    def kill_kernel(self, kernel: Kernel) -> None:
        """A deleted kernel's sessions end at once, without saving anything."""
        with self.lock:
            processes = [p for (ref, _), p in self.processes.items() if ref == f"{kernel.owner}/{kernel.slug}"]
            self.stuck = {key: code for key, code in self.stuck.items() if key[0] != f"{kernel.owner}/{kernel.slug}"}
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def stop_all(self) -> None:
        with self.lock:
            processes = list(self.processes.values())
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in processes:
            process.wait(timeout=10)
