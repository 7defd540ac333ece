"""A run at a glance: loss curves across every segment, learning rate, throughput, samples, and the chain.

Writes a PNG (matplotlib, Agg backend, from the `report` extra) and a self-contained HTML page that embeds
it as base64 and loads nothing else. Reads outputs/RUN/training_history.json (fetched first if absent),
outputs/RUN/manifest.json (where the best weights are from) and the run store (segments, their status
and duration).

training_history.json is a list of entries tagged with "kind": "train" (per log step), "eval" (per
evaluation) or "sample" (generated text); entries without "kind" come from kernels before the tag and are
evaluations.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kaggle_runner import artifacts, untrusted
from kaggle_runner.errors import KaggleRunnerError

REPORT_EXTRA = "pip install 'kaggle-runner[report]'"
HISTORY_NAME = "training_history.json"


@dataclass
class History:
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)


def parse_history(entries) -> History:
    """Sort entries by kind; untagged ones (the format before "kind") are evaluations. Unknown kinds are skipped."""
    history = History()
    if not isinstance(entries, list):
        raise KaggleRunnerError(f"{HISTORY_NAME} is not a list of entries")
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kind = entry.get("kind", "eval")
        if kind == "train":
            history.train.append(entry)
        elif kind == "eval":
            history.eval.append(entry)
        elif kind == "sample" and isinstance(entry.get("text"), str):
            history.samples.append(entry)
    return history


def load_history(path: Path) -> History:
    try:
        return parse_history(json.loads(path.read_text()))
    except OSError as exc:
        raise KaggleRunnerError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: brackets nested deeper than a parser goes
        raise KaggleRunnerError(f"{path} is not valid JSON ({str(exc)[:100]}); fetch the run again") from None


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise KaggleRunnerError(f"the report draws its charts with matplotlib, which is not installed: "
                                f"{REPORT_EXTRA}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> float | None:
    """A step or a loss from the kernel's history as a float, or None when it is not a number; NaN and the
    infinities stay as NaN (a gap in a curve), and an integer too large for a float is not a number."""
    if isinstance(value, float) and not math.isfinite(value):
        return math.nan
    return untrusted.finite(value)


def _series(entries: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for entries with a numeric step and `key`; non-finite values stay as gaps (NaN)."""
    steps, values = [], []
    for entry in sorted(entries, key=lambda e: _number(e.get("step")) or 0):
        step, value = _number(entry.get("step")), _number(entry.get(key))
        if step is None or value is None:
            continue
        steps.append(step)
        values.append(value if math.isfinite(value) else math.nan)
    return steps, values


# -- the chain: segments, boundaries, durations ------------------------------------------------------------
def segment_rows(workspace: str | Path, name: str) -> tuple[dict, list[dict]]:
    """run_status's description and its segments, each with duration_seconds (from the store if status lacks it)."""
    from kaggle_runner.run_views import run_status
    from kaggle_runner.store import Store

    status = run_status(workspace, name)
    rows = [dict(s) for s in status["segments"]]
    if rows and any("duration_seconds" not in row for row in rows):
        stored = {s.idx: s for s in Store(workspace).segments(name)}
        for row in rows:
            s = stored.get(row["index"])
            start = (s.running_at or s.pushed_at) if s else None
            end = s.ended_at if s and s.ended_at else (time.time() if start and not status_final(status) else None)
            row.setdefault("duration_seconds", (end - start) if start and end else None)
            row.setdefault("started_at", start)
    return status, rows


def status_final(status: dict) -> bool:
    from kaggle_runner.states import FINAL_STATES

    return status.get("state") in FINAL_STATES


def segment_boundaries(rows: list[dict], history: History) -> list[tuple[float, int]]:
    """(global step, segment index) where each later segment began training.

    From the store: a segment that trained starts where the ones before it ended. Failing that (a run
    recorded elsewhere), from the history entries' "segment" field.
    """
    boundaries, reached = [], 0
    for row in rows:
        end = row.get("global_step") or 0
        if row["index"] > 1 and end > reached > 0:
            boundaries.append((float(reached), row["index"]))
        reached = max(reached, end)
    if boundaries:
        return boundaries
    previous = None
    for entry in sorted(history.train + history.eval, key=lambda e: _number(e.get("step")) or 0):
        segment, step = entry.get("segment"), _number(entry.get("step"))
        if isinstance(segment, int) and step is not None:
            if previous is not None and segment != previous[1]:
                boundaries.append((previous[0], segment))
            previous = (step, segment)
    return boundaries


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def best_weights(outputs: Path) -> dict | None:
    """Where best_model.pt is from (global_step, val_loss), as the kernel's manifest records it (checked)."""
    return artifacts.read_manifest(outputs)["files"].get(artifacts.BEST_MODEL)


# -- the chart ------------------------------------------------------------------------------------------------
def draw_chart(history: History, boundaries: list[tuple[float, int]], best: dict | None, title: str) -> bytes:
    """Loss (train per log step, validation per evaluation), learning rate and tokens/s on one step axis."""
    plt = _pyplot()
    figure, (loss_ax, lr_ax, speed_ax) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                                       gridspec_kw={"height_ratios": [3, 1.2, 1.2]})
    try:
        train_steps, train_loss = _series(history.train, "train_loss")
        if not train_steps:  # old histories: the train loss recorded at each evaluation
            train_steps, train_loss = _series(history.eval, "train_loss")
        val_steps, val_loss = _series(history.eval, "val_loss")
        if train_steps:
            loss_ax.plot(train_steps, train_loss, color="tab:blue", linewidth=1.2, label="train loss")
        if val_steps:
            loss_ax.plot(val_steps, val_loss, color="tab:orange", marker="o", markersize=4, linewidth=1.5,
                         label="validation loss")
        best_step, best_loss = _number((best or {}).get("global_step")), _number((best or {}).get("val_loss"))
        if best_step is not None and best_loss is None and best_step in val_steps:  # a manifest without val_loss
            best_loss = val_loss[val_steps.index(best_step)]
        if best_step is not None and best_loss is not None and math.isfinite(best_loss):
            loss_ax.plot([best_step], [best_loss], marker="*", markersize=14, color="tab:red", linestyle="none",
                         label=f"best weights (step {int(best_step)})")
        if not (train_steps or val_steps):
            loss_ax.text(0.5, 0.5, "no training history yet", transform=loss_ax.transAxes, ha="center",
                         va="center", color="gray")
        loss_ax.set_ylabel("loss")
        loss_ax.set_title(title)
        rate_source = history.train or history.eval
        lr_steps, lr = _series(rate_source, "lr")
        lr_ax.plot(lr_steps, lr, color="tab:green", linewidth=1.2)
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        speed_steps, speed = _series(rate_source, "tokens_per_second")
        speed_ax.plot(speed_steps, speed, color="tab:purple", linewidth=1.2)
        speed_ax.set_ylabel("tokens/s")
        speed_ax.set_xlabel("global step")
        for ax in (loss_ax, lr_ax, speed_ax):
            ax.grid(True, alpha=0.3)
            for step, _ in boundaries:
                ax.axvline(step, color="gray", linestyle="--", linewidth=1)
        for step, index in boundaries:
            loss_ax.annotate(f"segment {index}", xy=(step, 1), xycoords=("data", "axes fraction"),
                             xytext=(3, -12), textcoords="offset points", fontsize=8, color="gray")
        if loss_ax.get_legend_handles_labels()[0]:
            loss_ax.legend(loc="upper right")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()
    finally:
        plt.close(figure)


# -- the page ---------------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1040px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.meta { color: #555; } img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.92em; } th, td { padding: 0.3em 0.8em; text-align: left;
       border-bottom: 1px solid #e4e4e4; vertical-align: top; } th { background: #f4f4f4; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.6em; border-radius: 4px; margin: 0.2em 0 1em; }
code { background: #f2f2f2; padding: 0 0.2em; }
"""


def _fmt(value, digits: int = 4) -> str:
    number = _number(value)
    return "" if number is None else (f"{number:.{digits}f}" if not number.is_integer() else f"{int(number)}")


def render_html(status: dict, rows: list[dict], history: History, best: dict | None, png: bytes,
                outputs: Path, notice: str | None = None) -> str:
    e = html.escape
    name = status["name"]
    val_steps, val_loss = _series(history.eval, "val_loss")
    finite = [v for v in val_loss if not math.isnan(v)]
    summary = [
        f"state <b>{e(str(status['state']))}</b>" + (f" ({e(str(status['reason']))})" if status.get("reason") else ""),
        f"step {e(str(status.get('global_step')))}/{e(str(status.get('total_steps') or '?'))}",
        f"{len(rows)} segment{'s' if len(rows) != 1 else ''}",
        f"GPU time {float(status.get('gpu_hours') or 0):.2f} h",
    ]
    if finite:
        summary.append(f"best validation loss {min(finite):.4f}")
    if best:
        summary.append(f"best weights from step {e(_fmt(best.get('global_step')))}")
    table = ["<table><tr><th>segment</th><th>version</th><th>Kaggle status</th><th>phase</th><th>steps</th>"
             "<th>duration</th><th>note</th></tr>"]
    reached = 0
    for row in rows:
        end = row.get("global_step") or 0
        steps = f"{reached} → {end}" if end > reached else ("" if not end else str(end))
        reached = max(reached, end)
        table.append(
            f"<tr><td>{row['index']}</td><td>{e(str(row.get('kernel_version') or ''))}</td>"
            f"<td>{e(str(row.get('kaggle_status') or ''))}</td><td>{e(str(row.get('phase') or ''))}</td>"
            f"<td>{e(steps)}</td><td>{e(_duration(row.get('duration_seconds')))}</td>"
            f"<td>{e(str(row.get('failure_message') or ''))}</td></tr>")
    table.append("</table>")
    if history.samples:
        samples = "\n".join(
            f"<p class=meta>step {e(_fmt(s.get('step')))}, epoch {e(_fmt(s.get('epoch')))}</p>"
            f"<pre>{e(s['text'])}</pre>" for s in history.samples)
    else:
        samples = "<p class=meta>The kernel wrote no samples into this run's history.</p>"
    best_folder = outputs / "best_model"
    weights = (
        f"<p>The final weights are in <code>{e(str(outputs / 'final_model'))}</code>; the best (lowest validation "
        f"loss) in <code>{e(str(outputs / 'best_model.pt'))}</code>. "
        f"<code>kaggle-runner generate {e(name)} \"PROMPT\" --best</code> samples from them and writes "
        f"<code>{e(str(best_folder))}</code>, which <code>AutoModelForCausalLM.from_pretrained</code> loads.</p>")
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>kaggle-runner report: {e(name)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>Run {e(name)}</h1>
<p class=meta>kernel {e(str(status.get('kernel') or ''))}{' (local emulator)' if status.get('local') else ''};
report written {datetime.now():%Y-%m-%d %H:%M}</p>
<p>{' · '.join(summary)}</p>
{f'<p class=meta>{e(notice)}</p>' if notice else ''}
<img alt="loss, learning rate and tokens per second of run {e(name)} by global step"
     src="data:image/png;base64,{image}">
<h2>Segments</h2>
{chr(10).join(table)}
<h2>Samples</h2>
{samples}
<h2>Weights</h2>
{weights}
</body>
</html>
"""


def write_report(workspace: str | Path, name: str, html_path: str | Path | None = None,
                 outputs: str | Path | None = None, endpoint: str | None = None) -> tuple[Path | None, Path]:
    """Write the run's report page and chart; returns (html, png), or (None, png) when `html_path` names a .png:
    then the chart alone goes there. Fetches the outputs if no history is here; a run whose outputs cannot be
    fetched (it failed before writing any) is reported from what the chain read of it."""
    _pyplot()  # the missing extra is said before anything is fetched
    folder = Path(outputs) if outputs else Path("outputs") / name
    status, rows = segment_rows(workspace, name)  # an unknown run fails here, before any request
    history_path, notice = folder / HISTORY_NAME, None
    if not history_path.is_file():
        from kaggle_runner.launcher import fetch_run

        try:
            fetch_run(workspace, name, str(folder), endpoint=endpoint)
        except KaggleRunnerError as exc:
            notice = f"The outputs could not be fetched: {exc}. This report shows what the chain read."
    if not history_path.is_file():
        history_path = _history_the_chain_read(Path(workspace), name) or history_path
    history = load_history(history_path) if history_path.is_file() else History()
    target = Path(html_path) if html_path else folder / "report.html"
    png_only = target.suffix.lower() == ".png"
    png_file = target if png_only else target.with_suffix(".png")
    best = best_weights(folder)
    png = draw_chart(history, segment_boundaries(rows, history), best, f"Run {name}")
    png_file.parent.mkdir(parents=True, exist_ok=True)
    png_file.write_bytes(png)
    if png_only:
        return None, png_file
    target.write_text(render_html(status, rows, history, best, png, folder, notice), encoding="utf-8")
    return target, png_file


def _history_the_chain_read(workspace: Path, name: str) -> Path | None:
    """The newest training_history.json the chain downloaded while deciding (runs/NAME/segment-N/)."""
    found = [(int(p.parent.name.removeprefix("segment-")), p)
             for p in (workspace / "runs" / name).glob(f"segment-*/{HISTORY_NAME}")
             if p.parent.name.removeprefix("segment-").isdigit()]
    return max(found)[1] if found else None
