# A stub training kernel with the real kernel's file contract, for tests of the chain's logic.
# render.py uses it in place of kernel_template/kernel.py when KAGGLE_RUNNER_TEST_KERNEL_SOURCE names this
# file; it is rendered below the same CONFIG block and pushed through the official client like the real one.
# It "trains" by counting: the model after step N is {"step": N, "weight": N * (N + 1) / 2}, so a resumed
# chain that skipped, repeated or restarted a step ends with a different weight than an uninterrupted one.
# Contract kept: the session event, no_gpu, chain_checkpoint (resume_missing), step_budget and time budget,
# SIGTERM, checkpoints with rotation in manifest.json, best_model.pt, run_state.json, training_history.json,
# final_model/, and JSON progress lines.
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

# The real kernel's contract (kernel_template/kernel.py declares it; the launcher reads the same literals).
from kaggle_runner.contract import (
    BEST_MODEL,
    CHECKPOINT_DIR,
    FINAL_MODEL_DIR,
    HISTORY,
    MANIFEST,
    RUN_STATE,
    STOP_REASONS,
)

STOP = {"signal": False}
MALFORMED = {"on": False}


def directives(config):
    """Test directives in sample_prompt, e.g. "stub: step=0.5 torn": the stub's only other input."""
    text = config.get("sample_prompt") or ""
    if not text.startswith("stub:"):
        return {}
    pairs = [item.partition("=") for item in text[5:].split()]
    return {key: value or True for key, _, value in pairs}


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def record(manifest, rel, **info):
    manifest["files"][rel] = {"sha256": sha256_of(rel), "size": os.path.getsize(rel), **info}
    write(MANIFEST, manifest)


def finish(status, reason, step, total, message="", resumed=None):
    assert reason in STOP_REASONS, reason
    malformed = MALFORMED["on"] and not resumed  # "global_step": "five", as a broken kernel could write it
    write(RUN_STATE, {"status": status, "reason": reason, "message": message,
                      "global_step": "five" if malformed else step,
                      "total_steps": total, "epoch": 1, "resumed_from": resumed,
                      "image": {"python": sys.version.split()[0], "build_date": os.environ.get("BUILD_DATE")}})
    emit("end", status=status, reason=reason, global_step=step)
    return 0 if reason in ("complete", "time_budget", "step_budget", "interrupted") else 1


def find_checkpoint(wanted):
    root = Path(os.environ.get("KAGGLE_RUNNER_INPUT_DIR", "/kaggle/input"))
    for path in sorted(root.rglob(wanted["file"])) if root.is_dir() else []:
        if path.is_file() and sha256_of(path) == wanted["sha256"]:
            return path
    return None


def main(config):
    started = time.time()
    wanted_behaviour = directives(config)
    step_seconds = float(wanted_behaviour.get("step", 0.05))
    MALFORMED["on"] = bool(wanted_behaviour.get("malformed"))
    signal.signal(signal.SIGTERM, lambda *_: STOP.update(signal=True))
    emit("session", container=os.environ.get("KAGGLE_CONTAINER_NAME"), python=sys.version.split()[0])
    total = config["max_steps"] or 40
    if not config.get("allow_cpu") and not os.environ.get("KAGGLE_RUNNER_EMULATED_GPU"):
        return finish("incomplete", "no_gpu", 0, total, "no CUDA device: this session has only a CPU")
    if config["dataset"] == "text-files" and "missing" in (config["text_files_path"] or ""):
        return finish("incomplete", "data_error", 0, total, f"text_files_path {config['text_files_path']!r} "
                      "matches no text files")
    step, weight, history, resumed = 0, 0, [], None
    wanted = config.get("chain_checkpoint")
    if wanted:
        path = find_checkpoint(wanted)
        if path is None:
            return finish("incomplete", "resume_missing", 0, total,
                          f"{wanted['file']} (step {wanted['global_step']}) is not among the inputs")
        state = json.loads(path.read_text())
        step, weight, history = state["step"], state["weight"], state["history"]
        resumed = {"file": wanted["file"], "sha256": wanted["sha256"], "global_step": step}
    emit("start", global_step=step, total_steps=total, epoch=1, resumed_from=resumed)
    manifest = {"kaggle_runner_manifest": 1, "files": {}}
    deadline = started + config["session_timeout_seconds"] - config["safety_margin_seconds"]
    if wanted_behaviour.get("stall"):  # a budget that ends before the first step
        deadline = started
    first = step
    while step < total:
        reason = ("interrupted" if STOP["signal"] else "time_budget" if time.time() >= deadline else
                  "step_budget" if config.get("segment_steps") and step - first >= config["segment_steps"] else None)
        if reason:
            break
        time.sleep(step_seconds)
        step += 1
        weight += step
        if step % config["log_steps"] == 0:
            emit("progress", global_step=step, total_steps=total, epoch=1, loss=1.0 / step, lr=0.001,
                 tokens_per_second=1000.0, eta_seconds=(total - step) * step_seconds)
            if wanted_behaviour.get("hostile"):  # values no store column or terminal should take as they are
                emit("progress", global_step=[1, 2], total_steps={"n": 5}, epoch="one", loss="x", lr=None,
                     tokens_per_second="fast", eta_seconds=1e300)
                emit("session", container="kernel-session-" + "9" * 400)
                print("\x1b]0;pwned\x07\x1b]52;c;ZXZpbA==\x07\x1b[2Jtitle and clipboard", flush=True)
            history.append(history_entry("train", step, history, resumed, started))
        if step % config["eval_steps"] == 0:
            history.append(history_entry("eval", step, history, resumed, started))
            write(HISTORY, history)
            record(manifest, HISTORY, kind="history")
            write(BEST_MODEL, {"step": step, "weight": weight})
            record(manifest, BEST_MODEL, kind="best", global_step=step)
        if step % config["save_steps"] == 0:
            save(manifest, step, weight, history, config["max_checkpoints"])
    else:
        reason = "complete"
    if reason != "complete":
        save(manifest, step, weight, history, config["max_checkpoints"])
        code = finish("incomplete", reason, step, total, f"stopped by {reason} at step {step}", resumed)
        if wanted_behaviour.get("torn"):  # a run_state.json cut off mid-write
            Path(RUN_STATE).write_text('{"status": "incompl')
        return code
    save(manifest, step, weight, history, config["max_checkpoints"])
    if wanted_behaviour.get("hostile"):  # manifest entries a careful launcher drops, and a 400-digit history step
        manifest["files"]["bogus.pt"] = {"sha256": "zz", "size": "big", "kind": "checkpoint", "global_step": {"n": 5}}
        manifest["files"]["odd.pt"] = {"sha256": "0" * 64, "size": 1, "kind": "checkpoint", "global_step": [1, 2]}
        write(MANIFEST, manifest)
        history.append({"kind": "eval", "step": 10**400, "val_loss": 10**400, "epoch": 1})
    write(f"{FINAL_MODEL_DIR}/config.json", {"step": step, "weight": weight})
    record(manifest, f"{FINAL_MODEL_DIR}/config.json", kind="final_model")
    for i in range(int(wanted_behaviour.get("files", 0))):  # many small outputs, as a sharded model has
        write(f"{FINAL_MODEL_DIR}/shard-{i:03d}.json", {"shard": i})
        record(manifest, f"{FINAL_MODEL_DIR}/shard-{i:03d}.json", kind="final_model")
    history.append({"kind": "sample", "step": step, "epoch": 1, "text": f"stub sample at step {step}: <&>"})
    write(HISTORY, history)
    record(manifest, HISTORY, kind="history")
    return finish("complete", "complete", step, total, resumed=resumed)


def history_entry(kind, step, history, resumed, started):
    """The kernel's kind-tagged history: "train" per log step, "eval" per evaluation (and "sample" at the end)."""
    segment = max((h.get("segment", 1) for h in history), default=1) + (1 if resumed and not any(
        h.get("step", 0) > resumed["global_step"] for h in history) else 0)
    entry = {"kind": kind, "step": step, "epoch": 1, "train_loss": 1.0 / step, "lr": 0.001 * (1 - step / 1000),
             "tokens_per_second": 1000.0 + 10 * step, "wall_time": time.time() - started, "segment": segment}
    if kind == "eval":
        entry.update(val_loss=1.2 / step, perplexity=2.718 ** (1.2 / step))
    return entry


def save(manifest, step, weight, history, keep):
    rel = f"{CHECKPOINT_DIR}/checkpoint_epoch1_step{step}.pt"
    if rel in manifest["files"]:
        return
    write(rel, {"step": step, "weight": weight, "history": history})
    record(manifest, rel, kind="checkpoint", global_step=step, epoch=1)
    ours = sorted((info["global_step"], r) for r, info in manifest["files"].items() if info["kind"] == "checkpoint")
    for _, stale in ours[:-keep]:
        os.unlink(stale)
        del manifest["files"][stale]
    write(MANIFEST, manifest)
    emit("checkpoint", path=rel, global_step=step)
