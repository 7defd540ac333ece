"""The user commands that act on runs: launch, watch, resume, fetch, cancel (run_views.py: status, logs, quota).

Each is one library call for the CLI. Driving a run's chain is the controller's job (controller/); these set
a run up, hand it to the controller, or act on what the store and Kaggle say. connect.py decides where
requests go.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from datetime import datetime
from pathlib import Path

from kaggle_runner import artifacts, corpus, waits
from kaggle_runner.config import RunConfig, build_config, load_config
from kaggle_runner.connect import context_for, gateway_for
from kaggle_runner.controller import (
    ChainContext,
    ChainPace,
    cancel_version,
    drive,
    fetch_outputs,
    look_at,
    look_at_small_outputs,
    quota_left_hours,
)
from kaggle_runner.dataset_readiness import wait_for_dataset
from kaggle_runner.display import Console
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.job_files import collect as collect_job_files
from kaggle_runner.job_files import save_snapshot as save_job_snapshot
from kaggle_runner.kaggle_api import KaggleApiError, KaggleGateway
from kaggle_runner.local import hub_downloads_offline
from kaggle_runner.logfollow import events_in, session_in
from kaggle_runner.states import Actor, KaggleStatus, Phase, RunState
from kaggle_runner.store import Run, Segment, Store
from kaggle_runner.workspace import remember_workspace

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Exit codes of launch, watch and resume: 0 only when training completed (or, detached, the push landed).
EXIT_CODES = {RunState.COMPLETE: 0, RunState.FAILED: 3, RunState.STOPPED: 4, RunState.CANCELLED: 5}
EXIT_STILL_RUNNING = 6  # watch --all returned while another process still drives a run
CORPUS_READY_TIMEOUT = 1800.0  # how long a corpus upload may take to be processed
# Keys a resume must keep: they decide the model's shape, the data and its order, or the kernel's identity,
# so changing them would not continue the same training.
RESUME_FIXED_KEYS = ("n_embd", "n_layer", "n_head", "max_length", "dropout", "batch_size",
                     "gradient_accumulation_steps", "seed", "dataset", "text_files_path", "tokenizer",
                     "bpe_vocab_size", "slug", "title", "init_from", "model_type", "dataset_config", "text_column",
                     "train_split", "validation_split", "data_dir", "epochs", "max_steps")


def exit_code(run: Run, detached: bool = False) -> int:
    """What a chain's outcome means to a shell: see docs/chain.md, "Exit codes"."""
    if detached and not run.final:
        return 0
    return EXIT_CODES.get(RunState(run.state), EXIT_STILL_RUNNING)


CURRENT_RUN: dict[str, str] = {}  # the run this process works on, for the CLI's interrupt hint


def check_run_name(name: str) -> str:
    """Run names become folder names (the workspace, outputs/RUN): letters, digits, '.', '_', '-', no '..'."""
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise KaggleRunnerError(f"run name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit (it names folders)")
    return name


# -- launch ----------------------------------------------------------------------------------------------
def launch(config_path: str, overrides=(), name: str | None = None, detach: bool = False, local: bool = False,
           endpoint: str | None = None, workspace: str | Path = ".kaggle-runner", console: Console | None = None,
           max_segments: int | None = None, notify_url: str | None = None) -> Run:
    console = console or Console()
    extra = [*overrides, *([f"max_segments={max_segments}"] if max_segments else []),
             *([f'notify_url="{notify_url}"'] if notify_url else [])]
    config = load_config(config_path, extra)  # every check before any request or record
    if name is not None:
        check_run_name(name)
    for warning in config.warnings():
        console.note(f"warning: {warning}")
    if not local:
        check_paths_reach_kaggle(config, Path(config_path).parent)
    else:
        for problem in hub_downloads_offline(config, Path(config_path).parent):
            console.note(f"warning: the local emulator gives kernels no internet, and {problem} (or the first "
                         "segment stops saying so)")
    if (why := config.outputs_fit()) is not None:
        raise KaggleRunnerError(f"{why}: raise output_budget_gb (at most 20) or train a smaller model")
    job_files = collect_job_files(config, Path(config_path).parent) if config.is_job else None
    store = Store(workspace)
    gateway = gateway_for(store.workspace, local, endpoint, console.note)
    username = gateway.username
    if not username:
        raise KaggleRunnerError("the Kaggle client did not report a username for these credentials")
    kernel_ref = f"{username}/{config.slug}"
    route, why = resume_route(config, store.workspace, local, endpoint or gateway.endpoint)
    alternate = f"{username}/{config.alternate_slug}" if route == "outputs" else None
    for other in store.list_runs():
        if {kernel_ref, alternate} & {other.kernel_ref, other.alternate_kernel_ref} - {None} and not other.final \
                and bool(other.local) == local:
            raise KaggleRunnerError(f"run {other.name!r} is still following {other.kernel_ref}; wait for it, "
                                    f"`kaggle-runner cancel {other.name}`, or use another slug")
    # The first request, before anything is recorded: a refusal (401, a bad host) leaves no run behind.
    gateway.current_version(kernel_ref, pushed_before=False)
    if config.min_quota_hours > 0:
        left = quota_left_hours(gateway, console.note)
        if left is not None and left < config.min_quota_hours:
            raise KaggleRunnerError(f"only {left:.1f} GPU hours of quota left this week, less than min_quota_hours "
                                    f"({config.min_quota_hours}); wait for the weekly reset (`kaggle-runner quota`)")
    if config.data_dir:
        config = upload_corpus(store, gateway, console, config, username, Path(config_path).parent)
    name = name or f"{config.slug}-{datetime.now():%Y%m%d-%H%M%S}"
    now = time.time()
    run = Run(name=name, config_json=config.model_dump_json(), username=username, kernel_ref=kernel_ref,
              checkpoint_dataset_ref=f"{username}/{config.checkpoint_dataset_slug}",
              endpoint=None if local else endpoint, local=int(local), state=RunState.RUNNING, reason="",
              max_segments=config.max_segments, created_at=now, updated_at=now, resume_via=route,
              alternate_kernel_ref=alternate)
    if job_files is not None:  # every segment pushes the bytes shipped now, whatever changes here later
        save_job_snapshot(job_files, store.workspace / "runs" / name)
    store.create_run(run)
    store.add_segment(Segment(run=name, idx=1, phase=Phase.PUSHING, kernel_ref=kernel_ref))
    remember_workspace(store.workspace)
    CURRENT_RUN["name"] = name
    console.say(f"Run {name}: kernel {kernel_ref}" + (" on the local emulator" if local else ""))
    how = "Kaggle, each version reading the last one's outputs" if route == "outputs" else \
        f"the checkpoint dataset {run.checkpoint_dataset_ref}, through this machine"
    console.say(f"Resumes go through {how} ({why})")
    return drive(ChainContext(store, run.name, gateway, console, ChainPace.for_run(run)), detach=detach)


def resume_route(config: RunConfig, workspace: Path, local: bool, endpoint: str) -> tuple[str, str]:
    """How this run's checkpoints reach the next segment ("outputs" or "dataset"), and why."""
    if config.resume_via != "auto":
        return config.resume_via, f"resume_via = {config.resume_via!r}"
    if local:
        return "outputs", "the local emulator attaches one kernel's outputs to the next"
    measured = artifacts.read_json_file(workspace / "doctor.json")
    if isinstance(measured, dict) and measured.get("outputs_other_attach") is True \
            and measured.get("endpoint") == endpoint:
        return "outputs", f"doctor confirmed on {measured.get('measured_at')} that this account can attach them"
    return "dataset", ("`kaggle-runner doctor` has not confirmed that this account can attach one kernel's outputs "
                       "to another; run it to resume through Kaggle and move no checkpoint through this machine")


def check_paths_reach_kaggle(config: RunConfig, config_dir: Path) -> None:
    """A path written as one of this machine's (./x, ../x, ~/x, /x) that exists here names nothing a Kaggle
    kernel can see: say so before anything is pushed, rather than let the kernel fail on Kaggle an hour later.
    (--local runs kernels on this machine, where such paths do work.)"""
    def local_folder(value: str | None) -> Path | None:
        if not value or not value.startswith(("/", "./", "../", "~")):
            return None
        path = Path(value).expanduser()
        path = path if path.is_absolute() else config_dir / path
        return path if path.exists() else None

    if local_folder(config.init_from):
        raise KaggleRunnerError(f"init_from {config.init_from!r} is a folder on this machine, which a Kaggle kernel "
                                "cannot see: upload it as a Kaggle dataset, add it to dataset_sources and set "
                                "init_from to its folder name there, or use a Hugging Face hub id")
    if config.dataset == "text-files" and not config.data_dir and local_folder(config.text_files_path):
        raise KaggleRunnerError(f"text_files_path {config.text_files_path!r} is on this machine, which a Kaggle "
                                f"kernel cannot see: set data_dir = {config.text_files_path!r} instead, and "
                                "kaggle-runner uploads it as a private dataset")


def upload_corpus(store: Store, gateway: KaggleGateway, console: Console, config: RunConfig, username: str,
                  config_dir: Path) -> RunConfig:
    """data_dir as the private dataset <user>/<slug>-corpus (a new version only when the text changed), ready and
    settled before the first push; the returned config trains on it."""
    ref = f"{username}/{config.corpus_dataset_slug}"
    if len(config.corpus_dataset_slug) > 50:
        raise KaggleRunnerError(f"slug {config.slug!r} is too long for data_dir: the dataset "
                                f"{config.corpus_dataset_slug!r} must be 6-50 characters (a slug of at most 43)")
    source = Path(config.data_dir).expanduser()
    source = source if source.is_absolute() else config_dir / source
    hashed = corpus.content_hash(source)
    files, content_hash = hashed
    before = gateway.dataset_version(ref)
    if before is not None and corpus.uploaded_hash(store.workspace, ref) == content_hash:
        console.say(f"Corpus {ref} is up to date ({len(files)} files); not uploading")
    else:  # copied (or zipped) only when it goes up
        built = corpus.build_corpus(source, store.workspace / "corpus" / config.corpus_dataset_slug, ref,
                                    artifacts.dataset_title(config.slug, "corpus"), hashed)
        console.say(f"Uploading {built.files} text file(s) from {source} ({built.size / 2**20:.1f} MiB) to the "
                    f"private dataset {ref}")
        started = time.time()
        if before is None:
            gateway.create_dataset(built.folder)
        else:
            gateway.create_dataset_version(built.folder, f"{built.files} files, {built.content_hash[:12]}")
        console.say(f"Uploaded in {time.time() - started:.1f}s; waiting until Kaggle can mount it")
        wait_for_dataset(gateway, ref, before or 0, CORPUS_READY_TIMEOUT, console.note,
                         "launch again later (the upload is not repeated if the text did not change)")
        waits.sleep(config.dataset_settle_seconds)  # Kaggle attaches the version mountable at push time
        corpus.remember_hash(store.workspace, ref, built.content_hash)
    return on_corpus(config, username)


def on_corpus(config: RunConfig, username: str) -> RunConfig:
    """A data_dir configuration as the run stores it: training on the attached <user>/<slug>-corpus dataset."""
    sources = list(dict.fromkeys([*config.dataset_sources, f"{username}/{config.corpus_dataset_slug}"]))
    return config.model_copy(update={"dataset": "text-files", "text_files_path": config.corpus_dataset_slug,
                                     "dataset_sources": sources})


def watch_run(workspace: str | Path, name: str, console: Console | None = None, notify_url: str | None = None,
              once: bool = False, endpoint: str | None = None) -> Run:
    """Drive the run to its end, or with `once` as far as it can go now (then return it, maybe still running)."""
    run = Store(workspace, create=False).get_run(name)
    CURRENT_RUN["name"] = name
    if run.final:
        (console or Console()).say(f"Run {name} is {run.state}: {run.reason}")
        return run
    ctx = context_for(workspace, run, console, endpoint)
    ctx.notify_url, ctx.once = notify_url, once
    run = drive(ctx)
    if once and not run.final:
        segment = ctx.store.last_segment(run.name)
        ctx.console.say(f"Run {run.name}: segment {segment.idx} {segment.phase}"
                        + (f", waiting: {segment.wait_reason}" if segment.wait_reason else ""))
    return run


def watch_all(workspace: str | Path, console: Console | None = None, notify_url: str | None = None,
              once: bool = False, endpoint: str | None = None) -> list[Run]:
    """Drive every unfinished run of the workspace in one process (each still has one driver): side by side, or
    with `once` one pass over each in turn."""
    import threading

    console = console or Console()
    store = Store(workspace, create=False)
    runs = [run for run in store.list_runs() if not run.final]
    if not runs:
        if not once:
            console.say(f"No unfinished runs in {store.workspace}.")
        return []
    if not once:
        console.say(f"Watching {len(runs)} run(s): {', '.join(run.name for run in runs)}")
    results: dict[str, Run] = {}

    def one(run: Run) -> None:
        try:
            results[run.name] = watch_run(workspace, run.name, console, notify_url, once, endpoint)
        except Exception as exc:  # noqa: BLE001 - one run's trouble must not end the others; said in one line
            console.note(f"run {run.name}: {exc}")
            results[run.name] = Store(workspace).get_run(run.name)

    if once:
        for run in runs:
            one(run)
        return [results[run.name] for run in runs]

    threads = [threading.Thread(target=one, args=(run,), daemon=True) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=1.0)
    return [results[run.name] for run in runs if run.name in results]


def _resume_config(run: Run, config_path: str | None, overrides) -> str:
    """The run's configuration with the user's fixes; keys an exact resume depends on may not change."""
    old = RunConfig.model_validate_json(run.config_json)
    if config_path:
        new = load_config(config_path, overrides)
        if new.data_dir:  # as launch stored it; the corpus itself stays the version the run trains on
            new = on_corpus(new, run.username)
    else:
        new = build_config(old.model_dump(), overrides, source=f"run {run.name}")
    changed = [key for key in RESUME_FIXED_KEYS
               if key in RunConfig.model_fields and getattr(old, key) != getattr(new, key)]
    if changed:
        raise KaggleRunnerError(f"resume cannot change {', '.join(changed)}: they decide the model, the data or "
                                f"the kernel, so the run would not continue the same training. Launch a new run "
                                f"for that")
    return new.model_dump_json()


def resume_run(workspace: str | Path, name: str, max_segments: int | None = None,
               console: Console | None = None, config_path: str | None = None, overrides=(),
               notify_url: str | None = None, endpoint: str | None = None) -> Run:
    store = Store(workspace, create=False)
    run = store.get_run(name)
    CURRENT_RUN["name"] = name
    if run.state == RunState.COMPLETE:
        raise KaggleRunnerError(f"run {name} already completed training; `kaggle-runner fetch {name}` gets it")
    if not run.final:
        raise KaggleRunnerError(f"run {name} is {run.state}; `kaggle-runner watch {name}` follows it")
    if run.cleaned_at and (run.local or build_config(json.loads(run.config_json)).is_job):
        raise KaggleRunnerError(f"run {name} was cleaned (the emulator's copies of its kernels, or the job's "
                                "files kept at launch, went with it): launch it again")
    config_json = _resume_config(run, config_path, overrides) if (config_path or overrides) else run.config_json
    segments = store.segments(name)
    last = segments[-1]
    limit = max(max_segments or 0, run.max_segments, len(segments) + 1)
    ctx = context_for(workspace, run, console, endpoint)
    folder = ctx.segment_dir(last.idx)
    if last.kernel_version and not (folder / artifacts.MANIFEST).exists() and last.kaggle_status is not None:
        # Kaggle may list a version's outputs long after it ended: look again before concluding there is no
        # newer checkpoint, which would resume from an older one and throw a session's work away.
        ctx.console.say(f"Looking for the outputs of version {last.kernel_version} again")
        with contextlib.suppress(waits.WaitTimedOut):
            waits.poll(lambda: True if look_at_small_outputs(ctx, last)[0] in ("whole", "no_run_state") else None,
                       ctx.pace.poll, ctx.pace.max_poll, ctx.pace.output_wait)
    manifest = artifacts.read_manifest(folder)
    if last.phase == Phase.FINAL and last.kernel_version and last.kaggle_status is None:
        # The chain stopped before Kaggle ever reported on this version: follow it, never push a second one.
        store.transition(name, last.idx, Phase.FINAL, Phase.RUNNING, by=Actor.RESUME)
    elif last.phase in (Phase.FINAL, Phase.ENDED) and artifacts.checkpoints_newest_first(manifest) \
            and last.kernel_version:
        # Its version is its kernel's newest still (the chain stopped after it): the outputs route reads it there.
        store.transition(name, last.idx, Phase(last.phase), Phase.OUTPUTS_SETTLING if run.resume_via == "outputs"
                         else Phase.ENDED_RESUME, by=Actor.RESUME)
    elif last.phase in (Phase.FINAL, Phase.ENDED, Phase.REPUSH):
        # Nothing new to resume from: what this segment was handed (or scratch), pushed again.
        store.advance_segment(name, last.idx, Phase(last.phase), Segment(
            run=name, idx=last.idx + 1, phase=Phase.PUSHING, kernel_ref=last.kernel_ref,
            resume_from=last.resume_from, resume_sha256=last.resume_sha256, resume_step=last.resume_step,
            best_sha256=last.best_sha256, resume_via=last.resume_via), by=Actor.RESUME)
    store.set_state(name, RunState.RUNNING, "resumed by hand", by=Actor.RESUME, max_segments=limit,
                    config_json=config_json)
    ctx.notify_url = notify_url
    return drive(ctx)


# -- the other commands ------------------------------------------------------------------------------------
def _latest_with_version(store: Store, name: str) -> Segment:
    segments = [s for s in store.segments(name) if s.kernel_version]
    if not segments:
        raise KaggleRunnerError(f"run {name} has no kernel version yet")
    return segments[-1]


def fetch_run(workspace: str | Path, name: str, out_dir: str | None = None, console: Console | None = None,
              endpoint: str | None = None) -> Path:
    run = Store(workspace).get_run(name)
    ctx = context_for(workspace, run, console, endpoint)
    segment = _latest_with_version(ctx.store, name)
    return fetch_outputs(ctx, run, segment, Path(out_dir) if out_dir else Path("outputs") / name)


def cancel_run(workspace: str | Path, name: str, console: Console | None = None, endpoint: str | None = None) -> str:
    """Mark the run cancelled (the chain stops) and stop its running version on Kaggle: by the session id the
    driver learned, or, for a run nobody follows, the one this reads from the version's log, waiting a bounded
    time for the kernel's session event. KaggleRunnerError when the version could not be stopped; `cancel`
    again tries again."""
    store = Store(workspace)
    run = store.get_run(name)
    if run.final and run.state != RunState.CANCELLED:
        return f"Run {name} is already {run.state}."
    if run.state != RunState.CANCELLED:
        store.set_state(name, RunState.CANCELLED, "cancelled by the user", by=Actor.CANCEL)
    segment = store.last_segment(name)
    if segment.phase != Phase.RUNNING or not segment.kernel_version:
        return f"Cancelled run {name}; no kernel version was running."
    ctx = context_for(workspace, run, console, endpoint)
    where = f"stop it at {look_at(run, segment.kernel_ref)}"
    try:
        seen = ctx.gateway.status(segment.kernel_ref, segment.kernel_version)
    except KaggleApiError as exc:
        raise KaggleRunnerError(f"cancelled run {name}, but could not ask Kaggle about version "
                                f"{segment.kernel_version} ({exc}); {where}") from None
    known = KaggleStatus.read(seen[0]) if seen else None
    if known is not None and known.terminal:
        return f"Cancelled run {name}; its version {segment.kernel_version} had already ended ({known.value})."
    session = segment.session_id or _session_from_log(ctx, segment)
    if session is None:
        raise KaggleRunnerError(f"cancelled run {name}, but version {segment.kernel_version} has not reported its "
                                f"session id within {ctx.pace.status_visible:.0f}s, and Kaggle cancels only by it; "
                                f"{where}, or run `kaggle-runner cancel {name}` again")
    store.update_segment(name, segment.idx, session_id=session)
    segment.session_id = session
    problem = cancel_version(ctx, segment)
    if problem:
        raise KaggleRunnerError(f"cancelled run {name}, but Kaggle did not stop version {segment.kernel_version} "
                                f"({problem}); {where}")
    return f"Cancelled run {name} and its kernel version {segment.kernel_version}."


def _session_from_log(ctx: ChainContext, segment: Segment) -> str | None:
    """The session id from the kernel's session event, read from the version's log (the kernel prints it first),
    looking again until it shows or the status-visible window has passed."""
    def look() -> str | None:
        try:
            return session_in(events_in(ctx.gateway.log(segment.kernel_ref, segment.kernel_version or 0)))
        except KaggleApiError:
            return None

    try:
        return waits.poll(look, ctx.pace.poll, ctx.pace.max_poll, ctx.pace.status_visible)
    except waits.WaitTimedOut:
        return None
