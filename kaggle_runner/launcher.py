"""Runs and their resume chains: launch, watch, resume, status, fetch, logs, cancel, quota.

A run is a sequence of segments, one kernel version each. A segment moves through phases, each one
recorded in the store before the next side effect, so a launcher killed at any moment continues with
`watch` without pushing twice, losing a checkpoint, or uploading again what already landed:

    pushing -> running -> ended -> resume_downloaded -> resume_uploaded -> done   (next segment: pushing)
                                 \\-> final (complete, failed, stopped)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from kaggle_runner import artifacts, chain
from kaggle_runner.config import RunConfig, load_config
from kaggle_runner.credentials import find_credentials
from kaggle_runner.display import Console
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.kaggle_api import GpuSessionsBusy, KaggleApiError, KaggleGateway, PushResult
from kaggle_runner.local import ensure_background_emulator, local_credentials
from kaggle_runner.render import render_kernel
from kaggle_runner.store import FINAL_STATES, Run, Segment, Store

DATASET_READY_TIMEOUT = 1800.0


@dataclass
class Context:
    store: Store
    run_name: str
    gateway: KaggleGateway
    console: Console
    poll_interval: float
    max_poll_interval: float

    @property
    def run(self) -> Run:
        return self.store.get_run(self.run_name)

    def run_dir(self) -> Path:
        path = self.store.workspace / "runs" / self.run_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def segment_dir(self, idx: int) -> Path:
        path = self.run_dir() / f"segment-{idx}"
        path.mkdir(parents=True, exist_ok=True)
        return path


# -- test hook -------------------------------------------------------------------------------------------
def kill_point(store: Store, name: str) -> None:
    """KAGGLE_RUNNER_TEST_KILL_AT=a,b: SIGKILL this process once at each named chain transition."""
    wanted = os.environ.get("KAGGLE_RUNNER_TEST_KILL_AT", "").split(",")
    if name not in wanted:
        return
    fired = store.workspace / "kill-points-fired"
    done = fired.read_text().split() if fired.exists() else []
    if name in done:
        return
    with open(fired, "a") as handle:
        handle.write(name + "\n")
    os.kill(os.getpid(), signal.SIGKILL)


# -- connecting ------------------------------------------------------------------------------------------
def _gateway(workspace: Path, local: bool, endpoint: str | None, notify: Callable[[str], None]) -> KaggleGateway:
    if local:
        url = ensure_background_emulator(workspace)
        return KaggleGateway(url, local_credentials(workspace), notify=notify)
    credentials = find_credentials()  # clear errors for missing or world-readable files, before any request
    return KaggleGateway(endpoint, credentials if credentials.username else None, notify=notify)


def _context(workspace: str | Path, run: Run, console: Console | None = None) -> Context:
    console = console or Console()
    store = Store(workspace)
    gateway = _gateway(store.workspace, bool(run.local), run.endpoint, console.note)
    return _bind(store, run, gateway, console)


def _bind(store: Store, run: Run, gateway: KaggleGateway, console: Console) -> Context:
    """Poll an emulator or a hand-picked endpoint briskly; back off further against Kaggle itself."""
    fast = bool(run.local) or bool(run.endpoint)
    return Context(store, run.name, gateway, console, poll_interval=1.0 if fast else 5.0,
                   max_poll_interval=2.0 if fast else 60.0)


# -- launch ----------------------------------------------------------------------------------------------
def launch(config_path: str, overrides=(), name: str | None = None, detach: bool = False, local: bool = False,
           endpoint: str | None = None, workspace: str | Path = ".kaggle-runner",
           console: Console | None = None) -> Run:
    console = console or Console()
    config = load_config(config_path, overrides)  # every check before any request or record
    for warning in config.warnings():
        console.note(f"warning: {warning}")
    store = Store(workspace)
    gateway = _gateway(store.workspace, local, endpoint, console.note)
    username = gateway.username
    if not username:
        raise KaggleRunnerError("the Kaggle client did not report a username for these credentials")
    if config.min_quota_hours > 0:
        quota = gateway.quota()
        left = (quota["total_seconds"] - quota["used_seconds"]) / 3600
        if left < config.min_quota_hours:
            raise KaggleRunnerError(f"only {left:.1f} GPU hours of quota left this week, less than min_quota_hours "
                                    f"({config.min_quota_hours}); wait for the reset ({quota['refresh']} UTC)")
    kernel_ref = f"{username}/{config.slug}"
    for other in store.list_runs():
        if other.kernel_ref == kernel_ref and other.state not in FINAL_STATES and bool(other.local) == local:
            raise KaggleRunnerError(f"run {other.name!r} is still following {kernel_ref}; wait for it, "
                                    f"`kaggle-runner cancel {other.name}`, or use another slug")
    name = name or f"{config.slug}-{datetime.now():%Y%m%d-%H%M%S}"
    now = time.time()
    run = Run(name=name, config_json=config.model_dump_json(), username=username, kernel_ref=kernel_ref,
              dataset_ref=f"{username}/{config.dataset_slug}", endpoint=None if local else endpoint,
              local=int(local), state="running", reason="", max_segments=config.max_segments,
              created_at=now, updated_at=now)
    store.create_run(run)
    store.add_segment(Segment(run=name, idx=1, phase="pushing"))
    console.say(f"Run {name}: kernel {kernel_ref}" + (" on the local emulator" if local else ""))
    return drive(_bind(store, run, gateway, console), detach=detach)


def watch_run(workspace: str | Path, name: str, console: Console | None = None) -> Run:
    run = Store(workspace).get_run(name)
    if run.state in FINAL_STATES:
        (console or Console()).say(f"Run {name} is {run.state}: {run.reason}")
        return run
    return drive(_context(workspace, run, console))


def resume_run(workspace: str | Path, name: str, max_segments: int | None = None,
               console: Console | None = None) -> Run:
    store = Store(workspace)
    run = store.get_run(name)
    if run.state == "complete":
        raise KaggleRunnerError(f"run {name} already completed training; `kaggle-runner fetch {name}` gets it")
    if run.state not in ("failed", "stopped", "cancelled"):
        raise KaggleRunnerError(f"run {name} is {run.state}; `kaggle-runner watch {name}` follows it")
    segments = store.segments(name)
    last = segments[-1]
    limit = max(max_segments or 0, run.max_segments, len(segments) + 1)
    manifest = artifacts.read_manifest(store.workspace / "runs" / name / f"segment-{last.idx}")
    if last.phase in ("final", "ended") and artifacts.checkpoints_newest_first(manifest):
        store.update_segment(name, last.idx, phase="ended_resume")
    elif last.phase in ("final", "ended"):  # nothing new to resume from: the previous hand-on, or scratch
        previous = segments[-2].resume_from if len(segments) > 1 else None
        store.advance_segment(name, last.idx, Segment(run=name, idx=last.idx + 1, phase="pushing",
                                                      resume_from=previous))
    store.update_run(name, state="running", reason="resumed by hand", max_segments=limit)
    return drive(_context(workspace, store.get_run(name), console))


# -- the chain driver --------------------------------------------------------------------------------------
def drive(ctx: Context, detach: bool = False) -> Run:
    while True:
        run = ctx.run
        if run.state in FINAL_STATES:
            if run.state == "cancelled":  # by `kaggle-runner cancel` in another process
                ctx.console.say(f"Run {run.name} was cancelled.")
            return run
        segment = ctx.store.segments(run.name)[-1]
        phase = segment.phase
        if phase == "pushing":
            push_segment(ctx, run, segment)
            if detach and ctx.run.state not in FINAL_STATES:
                ctx.console.say(f"Detached. Follow it with `kaggle-runner watch {run.name}`.")
                return ctx.run
        elif phase == "running":
            follow_segment(ctx, run, segment)
        elif phase == "ended":
            conclude_segment(ctx, run, segment)
        elif phase == "ended_resume":
            download_for_resume(ctx, run, segment)
        elif phase == "resume_downloaded":
            upload_for_resume(ctx, run, segment)
        elif phase == "resume_uploaded":
            start_next_segment(ctx, run, segment)
        else:
            raise KaggleRunnerError(f"run {run.name} segment {segment.idx} is in an unknown phase {phase!r}")


def _config(run: Run) -> RunConfig:
    return RunConfig.model_validate_json(run.config_json)


def _data_ref(run: Run) -> str:
    """The dataset holding the chain's token arrays, uploaded once so later segments skip tokenizing."""
    return f"{run.username}/{_config(run).data_dataset_slug}"


def push_segment(ctx: Context, run: Run, segment: Segment) -> None:
    ref = run.kernel_ref
    current = ctx.gateway.current_version(ref)
    if segment.base_version is None:
        ctx.store.update_segment(run.name, segment.idx, base_version=current[0] if current else 0)
        segment.base_version = current[0] if current else 0
    elif current and current[0] > segment.base_version:
        # An earlier launcher pushed, then died before recording it: follow that version, don't push again.
        ctx.console.note(f"note: version {current[0]} of {ref} was pushed before an interruption; following it")
        _record_push(ctx, run, segment, current[0], current[1])
        return
    config = _config(run)
    if segment.idx > 1:  # later segments resume from the chain's dataset, never from a fixed path
        config = config.model_copy(update={"resume_from_checkpoint": None})
    sources = [run.dataset_ref] if segment.resume_from else []
    if segment.idx > 1 and ctx.gateway.dataset_status(_data_ref(run)) is not None:
        sources.append(_data_ref(run))
    folder = render_kernel(config, ctx.run_dir() / f"kernel-{segment.idx}", run.username, sources).folder
    kill_point(ctx.store, "before_push")
    result = _push_when_a_gpu_session_is_free(ctx, run, folder, config.session_timeout_seconds,
                                              segment.base_version)
    if result is None:
        return
    kill_point(ctx.store, "after_push")
    _record_push(ctx, run, segment, result.version, result.kernel_id)


def _push_when_a_gpu_session_is_free(ctx: Context, run: Run, folder: Path, timeout: int,
                                     base_version: int | None) -> PushResult | None:
    """Push; while both GPU sessions are taken (by the user's other notebooks), wait rather than end the chain.

    None when the run was cancelled while waiting.
    """
    interval, waiting = ctx.poll_interval, False
    while True:
        try:
            return ctx.gateway.push(folder, timeout, base_version)
        except GpuSessionsBusy as exc:
            if not waiting:
                ctx.console.note(f"note: {exc} Waiting for one of your GPU sessions to end; "
                                 f"`kaggle-runner cancel {run.name}` stops waiting.")
                waiting = True
        time.sleep(interval)
        interval = min(ctx.max_poll_interval, interval * 1.5)
        if ctx.run.state == "cancelled":
            return None


def _record_push(ctx: Context, run: Run, segment: Segment, version: int, kernel_id: int | None) -> None:
    ctx.store.update_segment(run.name, segment.idx, phase="running", kernel_version=version,
                             kernel_id=kernel_id or None, pushed_at=time.time())
    ctx.console.say(f"Segment {segment.idx}: pushed {run.kernel_ref} version {version}"
                    + (f", resuming from {segment.resume_from}" if segment.resume_from else ""))


class LogFollower:
    """Reads the version's log stream in the background and reports each kernel JSON event once."""

    def __init__(self, ctx: Context, ref: str, version: int, on_event: Callable[[dict], None]):
        self.ctx, self.ref, self.version, self.on_event = ctx, ref, version, on_event
        self.seen = 0
        self.thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        count = 0
        try:
            for event in self.ctx.gateway.log_stream(self.ref, self.version):
                count += 1
                if count <= self.seen:
                    continue  # the stream replays from the start after a reconnect
                self.seen = count
                for line in str(event.get("data", "")).splitlines():
                    if line.startswith('{"event"'):
                        with contextlib.suppress(ValueError):
                            self.on_event(json.loads(line))
        except Exception:  # noqa: S110 - progress display is best effort; status polling decides what happens
            return


def follow_segment(ctx: Context, run: Run, segment: Segment) -> None:
    config = _config(run)
    ref, version = run.kernel_ref, segment.kernel_version
    assert version is not None

    def on_event(event: dict) -> None:
        ctx.console.kernel_event(segment.idx, version, event)
        if event["event"] == "progress":
            ctx.store.update_segment(run.name, segment.idx, global_step=event["global_step"],
                                     total_steps=event["total_steps"], epoch=event["epoch"],
                                     train_loss=event["loss"])

    follower = LogFollower(ctx, ref, version, on_event)
    interval, cancel_sent = ctx.poll_interval, False
    while True:
        if ctx.run.state == "cancelled":
            return
        status, message = ctx.gateway.status(ref, version)
        if status in chain.TERMINAL_KAGGLE:
            break
        if status == "RUNNING":
            follower.ensure_running()
        if not cancel_sent and chain.overran(segment.pushed_at or time.time(), time.time(),
                                             config.session_timeout_seconds, config.segment_grace_seconds):
            ctx.console.note(f"note: version {version} is still {status.lower()} past its session limit; "
                             "cancelling it")
            _cancel_version(ctx, run, segment)
            cancel_sent = True
        time.sleep(interval)
        interval = min(ctx.max_poll_interval, interval * 1.5)
    if follower.thread is not None:
        follower.thread.join(timeout=5)
    kill_point(ctx.store, "after_end")
    _record_end(ctx, run, segment, status, message)


def _record_end(ctx: Context, run: Run, segment: Segment, status: str, message: str | None) -> None:
    folder = ctx.segment_dir(segment.idx)
    files, _ = ctx.gateway.list_output(run.kernel_ref, segment.kernel_version)
    names = {f.name for f in files}
    small = [n for n in artifacts.SMALL_FILES if n in names]
    downloaded = 0
    if small:
        downloaded = ctx.gateway.download(run.kernel_ref, segment.kernel_version, folder,
                                          artifacts.exact_pattern(small), force=True)
    run_state = json.loads((folder / artifacts.RUN_STATE).read_text()) if "run_state.json" in names else None
    history_path = folder / "training_history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    ctx.store.update_segment(
        run.name, segment.idx, phase="ended", kaggle_status=status, failure_message=message,
        run_state_json=json.dumps(run_state) if run_state else None,
        global_step=(run_state or {}).get("global_step", segment.global_step),
        total_steps=(run_state or {}).get("total_steps", segment.total_steps),
        epoch=(run_state or {}).get("epoch", segment.epoch),
        val_loss=history[-1]["val_loss"] if history else None,
        bytes_downloaded=segment.bytes_downloaded + downloaded, ended_at=time.time())
    ctx.console.say(f"Segment {segment.idx}: version {segment.kernel_version} ended {status}"
                    + (f" ({(run_state or {}).get('reason')}, step {(run_state or {}).get('global_step')})"
                       if run_state else "") + (f": {message}" if message else ""))


def conclude_segment(ctx: Context, run: Run, segment: Segment) -> None:
    config = _config(run)
    segments = ctx.store.segments(run.name)
    manifest = artifacts.read_manifest(ctx.segment_dir(segment.idx))
    outcome = chain.SegmentOutcome(segment.kaggle_status or "ERROR", segment.failure_message, segment.run_state,
                                   has_checkpoint=bool(artifacts.checkpoints_newest_first(manifest)))
    quota_left = None
    if config.min_quota_hours > 0:
        quota = ctx.gateway.quota()
        quota_left = (quota["total_seconds"] - quota["used_seconds"]) / 3600
    decision = chain.decide(outcome, [s.global_step or 0 for s in segments[:-1]], len(segments),
                            run.max_segments, config.max_stalled_segments, quota_left, config.min_quota_hours)
    if decision.action == "resume":
        ctx.store.update_segment(run.name, segment.idx, phase="ended_resume")
        ctx.store.update_run(run.name, state="resuming", reason=decision.reason)
        ctx.console.say(f"Resuming: {decision.reason}")
        return
    if decision.action == "complete":
        target = fetch_outputs(ctx, run, segment, Path("outputs") / run.name)
        ctx.console.say(f"Training complete. Outputs in {target}")
    else:
        ctx.console.say(f"The chain stopped: {decision.reason}")
    ctx.store.update_segment(run.name, segment.idx, phase="final")
    ctx.store.update_run(run.name, state=decision.final_state, reason=decision.reason)


def download_for_resume(ctx: Context, run: Run, segment: Segment) -> None:
    """Only what resuming needs: the newest checkpoint that verifies, and best_model.pt."""
    folder = ctx.segment_dir(segment.idx)
    manifest = artifacts.read_manifest(folder)
    moved = 0
    for rel in artifacts.checkpoints_newest_first(manifest):
        moved += ctx.gateway.download(run.kernel_ref, segment.kernel_version, folder, artifacts.exact_pattern([rel]))
        if artifacts.verified(folder, rel, manifest["files"][rel]):
            break
        ctx.console.note(f"note: {rel} does not match its checksum; trying the previous checkpoint")
        (folder / rel).unlink(missing_ok=True)
    else:
        ctx.store.update_segment(run.name, segment.idx, phase="final")
        ctx.store.update_run(run.name, state="failed", reason="no checkpoint of the last segment verified; "
                             "see `kaggle-runner logs RUN`")
        return
    kill_point(ctx.store, "mid_download")
    wanted = [artifacts.BEST_MODEL] if artifacts.BEST_MODEL in manifest["files"] else []
    tokens = artifacts.token_files(manifest)
    if tokens and ctx.gateway.dataset_version(_data_ref(run)) is None:
        wanted += tokens  # the first resume of a chain: its token arrays, to upload once
    if wanted:
        moved += ctx.gateway.download(run.kernel_ref, segment.kernel_version, folder, artifacts.exact_pattern(wanted))
    ctx.store.update_segment(run.name, segment.idx, phase="resume_downloaded", resume_from=rel,
                             bytes_downloaded=segment.bytes_downloaded + moved)


def upload_tokens_once(ctx: Context, run: Run, segment: Segment) -> int:
    """Create the chain's token dataset from this segment's outputs, unless it exists or there are none."""
    source = ctx.segment_dir(segment.idx)
    tokens = [rel for rel in artifacts.token_files(artifacts.read_manifest(source)) if (source / rel).exists()]
    if not tokens or ctx.gateway.dataset_version(_data_ref(run)) is not None:
        return 0
    folder = ctx.run_dir() / "data-dataset"
    try:
        size = artifacts.build_flat_dataset(source, folder, tokens, _data_ref(run),
                                            artifacts.dataset_title(_config(run).slug, "tokens"),
                                            "Token arrays of a kaggle-runner chain, so segments skip tokenizing.")
    except artifacts.ArtifactError as exc:  # optional: later segments just tokenize again
        ctx.console.note(f"note: not caching tokens ({exc})")
        return 0
    ctx.console.say(f"Uploading the token arrays once ({size / 2**20:.1f} MiB) to dataset {_data_ref(run)}")
    ctx.gateway.create_dataset(folder)
    return size


def upload_for_resume(ctx: Context, run: Run, segment: Segment) -> None:
    config = _config(run)
    token_bytes = upload_tokens_once(ctx, run, segment)
    folder = ctx.run_dir() / "dataset"
    size = artifacts.build_resume_dataset(ctx.segment_dir(segment.idx), folder, segment.resume_from or "",
                                          run.dataset_ref, artifacts.dataset_title(config.dataset_slug))
    current = ctx.gateway.dataset_version(run.dataset_ref)
    if segment.dataset_version_before is None:
        ctx.store.update_segment(run.name, segment.idx, dataset_version_before=current or 0)
    elif (current or 0) > segment.dataset_version_before:
        ctx.console.note("note: the checkpoint upload had landed before an interruption; not uploading again")
        ctx.store.update_segment(run.name, segment.idx, phase="resume_uploaded")
        return
    ctx.console.say(f"Uploading {segment.resume_from} and best_model.pt ({size / 2**20:.1f} MiB) to "
                    f"dataset {run.dataset_ref}")
    kill_point(ctx.store, "before_upload")
    if current is None:
        ctx.gateway.create_dataset(folder)
    else:
        ctx.gateway.create_dataset_version(folder, f"{run.name} segment {segment.idx}: {segment.resume_from}")
    kill_point(ctx.store, "after_upload")
    ctx.store.update_segment(run.name, segment.idx, phase="resume_uploaded", bytes_uploaded=size + token_bytes)


def start_next_segment(ctx: Context, run: Run, segment: Segment) -> None:
    deadline = time.time() + DATASET_READY_TIMEOUT
    for ref, required in ((run.dataset_ref, True), (_data_ref(run), False)):  # the token dataset may not exist
        interval = ctx.poll_interval / 2
        while (status := ctx.gateway.dataset_status(ref)) != "ready":
            if status is None and not required:
                break
            if time.time() > deadline:
                raise KaggleRunnerError(f"dataset {ref} is still {status} after {DATASET_READY_TIMEOUT / 60:.0f} "
                                        f"minutes; `kaggle-runner watch {run.name}` tries again")
            time.sleep(interval)
            interval = min(ctx.max_poll_interval, interval * 1.5)
    ctx.store.advance_segment(run.name, segment.idx, Segment(run=run.name, idx=segment.idx + 1, phase="pushing",
                                                             resume_from=segment.resume_from))
    ctx.store.update_run(run.name, state="running", reason="")


# -- the other commands ------------------------------------------------------------------------------------
def fetch_outputs(ctx: Context, run: Run, segment: Segment, target: Path) -> Path:
    """All outputs of a version into `target`, verified against the manifest; resumable and idempotent."""
    target.mkdir(parents=True, exist_ok=True)
    files, _ = ctx.gateway.list_output(run.kernel_ref, segment.kernel_version)
    files = [f for f in files if not f.name.startswith("token_cache/")]  # the chain's, not a training output
    ctx.gateway.download(run.kernel_ref, segment.kernel_version, target,
                         artifacts.exact_pattern([artifacts.MANIFEST]), force=True)
    manifest = artifacts.read_manifest(target)
    with ctx.console.transfer(len(files)) as advance:
        for file in files:
            info = manifest["files"].get(file.name)
            if info and artifacts.verified(target, file.name, info):
                advance(file.name)
                continue
            ctx.gateway.download(run.kernel_ref, segment.kernel_version, target,
                                 artifacts.exact_pattern([file.name]), force=info is not None and
                                 (target / file.name).exists() and
                                 (target / file.name).stat().st_size >= info.get("size", 0))
            if info and not artifacts.verified(target, file.name, info):
                raise KaggleRunnerError(f"{file.name} does not match the kernel's checksum after downloading; "
                                        f"run `kaggle-runner fetch {run.name}` again")
            advance(file.name)
    return target


def _latest_with_version(store: Store, name: str) -> Segment:
    segments = [s for s in store.segments(name) if s.kernel_version]
    if not segments:
        raise KaggleRunnerError(f"run {name} has no kernel version yet")
    return segments[-1]


def fetch_run(workspace: str | Path, name: str, out_dir: str | None = None, console: Console | None = None) -> Path:
    run = Store(workspace).get_run(name)
    ctx = _context(workspace, run, console)
    segment = _latest_with_version(ctx.store, name)
    return fetch_outputs(ctx, run, segment, Path(out_dir) if out_dir else Path("outputs") / name)


def print_logs(workspace: str | Path, name: str, follow: bool = False, console: Console | None = None) -> None:
    run = Store(workspace).get_run(name)
    ctx = _context(workspace, run, console)
    segment = _latest_with_version(ctx.store, name)
    if follow:
        for event in ctx.gateway.log_stream(run.kernel_ref, segment.kernel_version):
            ctx.console.raw(str(event.get("data", "")))
        return
    text = ctx.gateway.log(run.kernel_ref, segment.kernel_version)
    try:
        events = json.loads(text)
        text = "".join(str(e.get("data", "")) for e in events) if isinstance(events, list) else text
    except ValueError:
        pass
    ctx.console.raw(text)


def _cancel_version(ctx: Context, run: Run, segment: Segment) -> str | None:
    if not segment.kernel_id or not segment.kernel_version:
        return "its kernel id is unknown"
    # Kaggle's public API does not return session ids; the emulator's is kernel id * 1000 + version.
    try:
        return ctx.gateway.cancel(segment.kernel_id * 1000 + segment.kernel_version)
    except KaggleApiError as exc:
        return str(exc)


def cancel_run(workspace: str | Path, name: str, console: Console | None = None) -> str:
    store = Store(workspace)
    run = store.get_run(name)
    if run.state in FINAL_STATES:
        return f"Run {name} is already {run.state}."
    store.update_run(name, state="cancelled", reason="cancelled by the user")
    segment = store.segments(name)[-1]
    if segment.phase != "running":
        return f"Cancelled run {name}; no kernel version was running."
    ctx = _context(workspace, run, console)
    problem = _cancel_version(ctx, run, segment)
    if problem:
        return (f"Cancelled run {name}, but Kaggle did not stop version {segment.kernel_version} ({problem}); "
                f"stop it at https://www.kaggle.com/code/{run.kernel_ref} to save GPU quota.")
    return f"Cancelled run {name} and its kernel version {segment.kernel_version}."


def quota_summary(workspace: str | Path, local: bool = False, endpoint: str | None = None) -> str:
    gateway = _gateway(Path(workspace), local, endpoint, Console().note)
    quota = gateway.quota()
    used, total = quota["used_seconds"] / 3600, quota["total_seconds"] / 3600
    return (f"GPU quota: {used:.2f} h used of {total:.2f} h this week, {max(0.0, total - used):.2f} h left; "
            f"resets {quota['refresh'] or 'weekly'} (UTC)")


def run_status(workspace: str | Path, name: str | None = None) -> dict | list[dict]:
    store = Store(workspace)
    if name is None:
        return [_describe(store, run) for run in store.list_runs()]
    return _describe(store, store.get_run(name), detail=True)


def _describe(store: Store, run: Run, detail: bool = False) -> dict:
    segments = store.segments(run.name)
    last = segments[-1] if segments else None
    gpu_seconds = sum(((s.ended_at or time.time()) - s.pushed_at) for s in segments if s.pushed_at)
    next_action = {
        "pushing": "push the next kernel version", "running": "wait for the kernel version to end",
        "ended": "decide whether to resume", "ended_resume": "download the newest checkpoint",
        "resume_downloaded": "upload it as a dataset version", "resume_uploaded": "wait for the dataset, then push",
    }.get(last.phase if last else "", "none")
    description = {
        "name": run.name, "state": run.state, "reason": run.reason, "kernel": run.kernel_ref,
        "dataset": run.dataset_ref, "local": bool(run.local), "segment": last.idx if last else 0,
        "kernel_version": last.kernel_version if last else None,
        "kaggle_status": last.kaggle_status if last else None,
        "global_step": max((s.global_step or 0 for s in segments), default=0),
        "total_steps": last.total_steps if last else None, "epoch": last.epoch if last else None,
        "train_loss": last.train_loss if last else None,
        "val_loss": next((s.val_loss for s in reversed(segments) if s.val_loss is not None), None),
        "checkpoint": next((s.resume_from for s in reversed(segments) if s.resume_from), None),
        "gpu_hours": round(gpu_seconds / 3600, 4),
        "next_action": next_action if run.state not in FINAL_STATES else "none",
        "segments": [{"index": s.idx, "kernel_version": s.kernel_version, "kaggle_status": s.kaggle_status,
                      "global_step": s.global_step, "phase": s.phase, "resume_from": s.resume_from,
                      "bytes_downloaded": s.bytes_downloaded, "bytes_uploaded": s.bytes_uploaded,
                      "failure_message": s.failure_message} for s in segments],
    }
    if detail:
        description["events"] = store.events(run.name)[-20:]
    return description
