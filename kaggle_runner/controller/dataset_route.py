"""The checkpoint-dataset route: phases `ended_resume`, `resume_downloaded` and `resume_uploaded`.

The newest verified checkpoint and best_model.pt come down from the ended version's outputs, go up as a new
version of the chain's checkpoint dataset (`<user>/<slug>-ckpt`), and once Kaggle reports that version ready
and it has settled (Kaggle attaches the version mountable at push time), the next segment opens, naming the
exact file and sha256 it must resume from. The segment's token arrays, if it had to tokenize, go up once as the
chain's token dataset. Each step is recorded before its side effect, so a killed launcher never uploads twice.
"""

from __future__ import annotations

import time
from pathlib import Path

from kaggle_runner import artifacts
from kaggle_runner.controller.concluding import settle_seconds
from kaggle_runner.controller.context import (
    ChainContext,
    Wait,
    config_of,
    end_run,
    kill_point,
    still_driving,
    token_dataset_ref,
)
from kaggle_runner.controller.transfers import download_verified
from kaggle_runner.dataset_readiness import DatasetLook, look_at_dataset, not_ready
from kaggle_runner.kaggle_api import DatasetSlugTaken, KaggleApiError
from kaggle_runner.states import Phase, RunState
from kaggle_runner.store import Run, Segment

# A checkpoint version that failed processing, or never became ready, is uploaded again this many times at
# most; then the chain stops and says so. Each try costs an upload, never GPU time.
MAX_CHECKPOINT_REUPLOADS = 2


def handoff(ctx: ChainContext, run: Run, segment: Segment) -> Segment:
    """The segment whose version's outputs this resume hands on: this one, or (when the outputs route did not
    attach a checkpoint twice) the one whose outputs hold it."""
    if segment.handoff_segment is None or segment.handoff_segment == segment.idx:
        return segment
    return ctx.store.segments(run.name)[segment.handoff_segment - 1]


def download_for_resume(ctx: ChainContext, run: Run, segment: Segment) -> Wait | None:
    """Only what resuming needs: the newest checkpoint that verifies, and best_model.pt."""
    source = handoff(ctx, run, segment)
    folder = ctx.segment_dir(source.idx)
    manifest = artifacts.read_manifest(folder)
    moved = 0
    for rel in artifacts.checkpoints_newest_first(manifest):
        ok, size = download_verified(ctx, source, folder, rel, manifest["files"][rel])
        moved += size
        if ok:
            break
        ctx.console.note(f"note: {rel} does not match its checksum; trying the previous checkpoint")
    else:
        end_run(ctx, run, segment, Phase.ENDED_RESUME, RunState.FAILED,
                f"no checkpoint of the last segment verified; see `kaggle-runner logs {run.name}`")
        return None
    kill_point(ctx.store, "mid_download")
    best = manifest["files"].get(artifacts.BEST_MODEL)
    wanted = [artifacts.BEST_MODEL] if best else []
    tokens = artifacts.token_files(manifest)
    if tokens and not _token_dataset_holds(ctx, run, tokens):
        wanted += tokens  # this segment tokenized: its arrays, for the chain's token dataset
    if wanted:
        moved += ctx.gateway.download(source.kernel_ref, source.kernel_version or 0, folder,
                                      artifacts.exact_pattern(wanted))
    info = manifest["files"][rel]
    best_sha = best["sha256"] if best and artifacts.verified(folder, artifacts.BEST_MODEL, best) else None
    ctx.store.transition(run.name, segment.idx, Phase.ENDED_RESUME, Phase.RESUME_DOWNLOADED, resume_from=rel,
                         resume_sha256=info["sha256"], resume_step=info.get("global_step"), best_sha256=best_sha,
                         bytes_downloaded=segment.bytes_downloaded + moved)
    return None


def _token_dataset_holds(ctx: ChainContext, run: Run, tokens: list[str]) -> bool | None:
    """Whether the chain's token dataset already has these arrays (by name: the name is their fingerprint);
    None when there is no such dataset yet. True too when Kaggle cannot say: the arrays are an optional
    cache, never worth failing a resume."""
    ref = token_dataset_ref(run)
    try:
        if ctx.gateway.dataset_version(ref) is None:
            return None
        held = ctx.gateway.dataset_files(ref)
    except KaggleApiError as exc:
        ctx.console.note(f"note: not caching tokens ({exc})")
        return True
    return held is not None and {Path(rel).name for rel in tokens} <= held


def upload_tokens(ctx: ChainContext, run: Run, segment: Segment) -> int:
    """The token arrays this segment wrote (it tokenized: no attached arrays matched its tokenizer and corpus)
    as the chain's token dataset: created, or a new version when the dataset holds other arrays (an earlier
    chain's, of another corpus). Arrays already there are not uploaded again."""
    source = ctx.segment_dir(handoff(ctx, run, segment).idx)
    tokens = [rel for rel in artifacts.token_files(artifacts.read_manifest(source))
              if (path := artifacts.confined(source, rel)) is not None and path.exists()]
    held = _token_dataset_holds(ctx, run, tokens) if tokens else True
    if held:
        return 0
    ref, exists = token_dataset_ref(run), held is not None
    folder = ctx.run_dir() / "token-dataset"
    try:
        size = artifacts.build_flat_dataset(source, folder, tokens, ref,
                                            artifacts.dataset_title(config_of(run).slug, "tokens"),
                                            "Token arrays of a kaggle-runner chain, so segments skip tokenizing.")
    except artifacts.ArtifactError as exc:
        ctx.console.note(f"note: not caching tokens ({exc})")
        return 0
    ctx.console.say(f"Uploading the token arrays ({size / 2**20:.1f} MiB) to dataset {ref}"
                    + (" as a new version (it holds other arrays)" if exists else ""))
    try:
        if exists:
            ctx.gateway.create_dataset_version(folder, f"{run.name}: token arrays of its corpus")
        else:
            ctx.gateway.create_dataset(folder)
    except KaggleApiError as exc:
        ctx.console.note(f"note: not caching tokens ({exc})")
        return 0
    return size


def upload_for_resume(ctx: ChainContext, run: Run, segment: Segment) -> Wait | None:
    config = config_of(run)
    token_bytes = upload_tokens(ctx, run, segment)
    folder = ctx.run_dir() / "checkpoint-dataset"
    ref = run.checkpoint_dataset_ref
    size = artifacts.build_resume_dataset(ctx.segment_dir(handoff(ctx, run, segment).idx), folder,
                                          segment.resume_from or "", ref,
                                          artifacts.dataset_title(config.checkpoint_dataset_slug))
    current = ctx.gateway.dataset_version(ref)
    if segment.checkpoint_version_before is None:
        segment.checkpoint_version_before = current or 0
        ctx.store.update_segment(run.name, segment.idx, checkpoint_version_before=segment.checkpoint_version_before)
    elif (current or 0) > segment.checkpoint_version_before:
        ctx.console.note("note: the checkpoint upload had landed before an interruption; not uploading again")
        ctx.store.transition(run.name, segment.idx, Phase.RESUME_DOWNLOADED, Phase.RESUME_UPLOADED)
        return None
    # Older versions go only once this segment proved it resumed from the newest one: until then the older
    # checkpoint may be the only one a session can mount. Nor on a repeated upload: the one before it failed,
    # and this one might too.
    delete_old = bool(segment.resume_proven) and not segment.checkpoint_reuploads
    ctx.console.say(f"Uploading {Path(segment.resume_from or '').name} and best_model.pt ({size / 2**20:.1f} MiB) "
                    f"to dataset {ref}")
    kill_point(ctx.store, "before_upload")
    still_driving(ctx)
    started = time.time()
    if current is None and segment.checkpoint_version_before == 0:
        try:
            ctx.gateway.create_dataset(folder)
        except DatasetSlugTaken:
            # It did not exist when this segment first looked: this segment's create landed before an
            # interruption, and Kaggle does not show the new dataset yet.
            ctx.console.note("note: the checkpoint upload had landed before an interruption; not uploading again")
            ctx.store.transition(run.name, segment.idx, Phase.RESUME_DOWNLOADED, Phase.RESUME_UPLOADED)
            return None
    else:
        try:
            ctx.gateway.create_dataset_version(folder, f"{run.name} segment {segment.idx}: {segment.resume_from}",
                                               delete_old_versions=delete_old)
        except KaggleApiError as exc:
            first_upload = not any(s.checkpoint_version for s in ctx.store.segments(run.name) if s.idx < segment.idx)
            if not (exc.status == 403 and current == 1 and segment.checkpoint_reuploads and first_upload):
                raise
            # Kaggle refuses a second version while the first still processes (kagglehub PR #182). That first
            # version holds this very checkpoint: wait for it again, a wait the re-upload count bounds.
            ctx.console.note(f"note: Kaggle refuses a new version of {ref} while its first one is "
                             "still processing; waiting for that one instead")
            ctx.store.transition(run.name, segment.idx, Phase.RESUME_DOWNLOADED, Phase.RESUME_UPLOADED,
                                 checkpoint_version_before=0)
            return None
    took = time.time() - started
    kill_point(ctx.store, "after_upload")
    ctx.console.say(f"Uploaded {size / 2**20:.1f} MiB in {took:.1f}s ({size / 2**20 / max(took, 1e-3):.1f} MiB/s)")
    ctx.store.transition(run.name, segment.idx, Phase.RESUME_DOWNLOADED, Phase.RESUME_UPLOADED,
                         bytes_uploaded=size + token_bytes, upload_seconds=round(took, 3))
    return None


def start_next_segment(ctx: ChainContext, run: Run, segment: Segment) -> Wait | None:
    """Once the new checkpoint version is ready and settled (Kaggle pins versions at push), open the next
    segment, naming the exact checkpoint it must resume from. A version that failed processing, or never became
    ready, is uploaded again (MAX_CHECKPOINT_REUPLOADS times at most)."""
    now = time.time()
    since = segment.waiting_since
    if since is None:
        since = now
        ctx.store.update_segment(run.name, segment.idx, waiting_since=since)
    late = now - since > ctx.pace.dataset_ready
    ref = run.checkpoint_dataset_ref
    look = look_at_dataset(ctx.gateway, ref, segment.checkpoint_version_before or 0)
    if look.trouble:
        ctx.note_once(f"trouble-{segment.idx}", f"note: {look.trouble}; still waiting for dataset {ref}")
    if look.failed or (late and not look.ready):
        _upload_again(ctx, run, segment, look, now - since)
        return None
    if not look.ready:
        return Wait(f"Kaggle is processing checkpoint dataset {ref}")
    tokens = look_at_dataset(ctx.gateway, token_dataset_ref(run), None)
    if not (tokens.absent or tokens.ready or tokens.failed):  # optional: segments tokenize on their own
        if not late:
            return Wait(f"Kaggle is processing token dataset {token_dataset_ref(run)}")
        problem = not_ready(tokens, token_dataset_ref(run), now - since, "segments tokenize on their own")
        ctx.note_once(f"tokens-{segment.idx}", f"note: {problem}")
    if segment.checkpoint_version is None:
        settle = settle_seconds(ctx, run)
        # The end of the settle is recorded before waiting: a launcher killed meanwhile waits only the rest.
        segment.next_try_at = now + settle
        ctx.store.update_segment(run.name, segment.idx, checkpoint_version=look.version,
                                 next_try_at=segment.next_try_at)
        if settle:
            ctx.console.say(f"Dataset ready; letting it settle {settle:.0f}s before pushing (Kaggle attaches the "
                            "version that is mountable at push time)")
        ctx.first_time(f"settle-{segment.idx}")
        kill_point(ctx.store, "mid_settle")
    elif segment.next_try_at is not None and now < segment.next_try_at and ctx.first_time(f"settle-{segment.idx}"):
        ctx.console.say(f"Dataset ready; letting it settle {segment.next_try_at - now:.0f}s more (the settle was "
                        "interrupted)")
    if segment.next_try_at is not None and time.time() < segment.next_try_at:
        return Wait("letting the checkpoint dataset settle", until=segment.next_try_at)
    ctx.store.advance_segment(run.name, segment.idx, Phase.RESUME_UPLOADED, Segment(
        run=run.name, idx=segment.idx + 1, phase=Phase.PUSHING, kernel_ref=segment.kernel_ref,
        resume_from=segment.resume_from, resume_sha256=segment.resume_sha256, resume_step=segment.resume_step,
        best_sha256=segment.best_sha256, resume_via="dataset"))
    ctx.store.set_state(run.name, RunState.RUNNING, "")
    return None


def _upload_again(ctx: ChainContext, run: Run, segment: Segment, look: DatasetLook, waited: float) -> None:
    """Back to `resume_downloaded` to upload the checkpoint as a newer version, or stop once that was tried
    MAX_CHECKPOINT_REUPLOADS times. Either way the next wait is for a version above the one that let us down."""
    seen = max(look.version or 0, segment.checkpoint_version_before or 0)
    what = "failed processing" if look.failed else f"was still {look.status or 'not visible'}"
    if segment.checkpoint_reuploads >= MAX_CHECKPOINT_REUPLOADS:
        # `resume` downloads and uploads afresh: forget this resume's upload bookkeeping, with the stop itself.
        end_run(ctx, run, segment, Phase.RESUME_UPLOADED, RunState.STOPPED,
                f"the checkpoint dataset {run.checkpoint_dataset_ref} did not become ready after "
                f"{segment.checkpoint_reuploads + 1} tries (version {look.version} {what}); look at "
                f"https://www.kaggle.com/datasets/{run.checkpoint_dataset_ref}, then `kaggle-runner resume "
                f"{run.name}` uploads it again", checkpoint_version_before=None, checkpoint_version=None,
                checkpoint_reuploads=0)
        return
    ctx.console.note(f"note: checkpoint dataset {run.checkpoint_dataset_ref} version {look.version} {what}; "
                     f"uploading it again ({segment.checkpoint_reuploads + 1} of {MAX_CHECKPOINT_REUPLOADS})")
    ctx.store.transition(run.name, segment.idx, Phase.RESUME_UPLOADED, Phase.RESUME_DOWNLOADED,
                         checkpoint_version_before=seen, checkpoint_version=None,
                         checkpoint_reuploads=segment.checkpoint_reuploads + 1)
