"""What the user sees: progress lines, notes, transfer bars, the status table. Rich, on stderr/stdout."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

from rich import box
from rich.console import Console as RichConsole
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table


def _eta(seconds: float | None) -> str:
    return str(timedelta(seconds=int(seconds))) if seconds is not None and 0 <= seconds < 10**9 else "?"


class Console:
    """Output for commands: say() for results, note() for one-line warnings and retries, on stderr."""

    def __init__(self, quiet: bool = False):
        self.out = RichConsole(highlight=False, soft_wrap=True)
        self.err = RichConsole(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            self.out.print(message, markup=False)

    def note(self, message: str) -> None:
        self.err.print(message, style="yellow", markup=False)

    def raw(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def kernel_event(self, segment: int, version: int, event: dict) -> None:
        """One checked kernel event (logfollow.checked_event) as a line; fields it lacks are left out."""
        if self.quiet:
            return
        prefix = f"  [seg {segment} v{version}]"
        kind = event.get("event")
        if kind == "progress" and "global_step" in event:
            self.say(f"{prefix} step {event['global_step']}/{event.get('total_steps', '?')}  "
                     f"epoch {event.get('epoch', '?')}"
                     + (f"  loss {event['loss']:.4f}" if "loss" in event else "")
                     + (f"  {event['tokens_per_second']:,.0f} tok/s" if "tokens_per_second" in event else "")
                     + f"  ETA {_eta(event.get('eta_seconds'))}")
        elif kind == "eval" and "val_loss" in event:
            self.say(f"{prefix} eval step {event.get('step', '?')}: val loss {event['val_loss']:.4f}"
                     + (f", perplexity {event['perplexity']:.1f}" if "perplexity" in event else ""))
        elif kind == "start" and event.get("resumed_from"):
            self.say(f"{prefix} resumed at step {event.get('global_step', '?')} of {event.get('total_steps', '?')}")
        elif kind == "sample" and "text" in event:
            self.say(f"{prefix} sample: {event['text']!r}")
        elif kind == "oom" and "micro_batch_size" in event:
            self.note(f"{prefix} out of memory: micro-batch now {event['micro_batch_size']}")

    @contextlib.contextmanager
    def transfer(self, what: str, total_bytes: int) -> Iterator[Callable[[str, int], None]]:
        """A byte progress bar (size, rate, time left) on stderr; yields `update(name, bytes_done_so_far)`."""
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.err, transient=True, disable=self.quiet) as progress:
            task = progress.add_task(what, total=total_bytes)

            def update(name: str, done: int) -> None:
                progress.update(task, completed=done, description=f"{what} {name}")

            yield update


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _shown(value) -> str:
    """Unknown shows as a dash, never as Python's None."""
    return "-" if value is None or value == "" else str(value)


SHORT_REASON = 40  # characters of a run's reason the status table shows in its column


def print_status(result: dict | list[dict]) -> None:
    console = RichConsole(highlight=False)
    if isinstance(result, list):
        if not result:
            console.print("No runs yet. Start one with `kaggle-runner launch`.")
            return
        # Fit 80 columns: numbers never wrap; a long run name folds only where the terminal is too narrow.
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
        if any("workspace" in run for run in result):
            table.add_column("workspace", overflow="fold", min_width=12)
        longest = max(len(run["name"]) for run in result)
        table.add_column("run", overflow="fold", min_width=min(longest, max(12, console.width - 66)))
        for header in ("state", "seg", "ver", "kaggle", "step", "val loss"):
            table.add_column(header, no_wrap=True, min_width=len(header))
        table.add_column("reason", overflow="fold", min_width=10)
        below = []  # long reasons (the chain's say what to do) go under the table, whole, not folded in it
        for run in result:
            step = f"{run['global_step']}/{run['total_steps']}" if run["total_steps"] else str(run["global_step"])
            val = f"{run['val_loss']:.4f}" if run["val_loss"] is not None else ""
            where = [run["workspace"]] if "workspace" in run else []
            reason = run["reason"] or ""
            if len(reason) > SHORT_REASON:
                below.append(f"[{len(below) + 1}] {run['name']}: {reason}")
                reason = f"[{len(below)}]"
            table.add_row(*where, run["name"], run["state"], str(run["segment"]), str(run["kernel_version"] or ""),
                          run["kaggle_status"] or "", step, val, reason)
        console.print(table)
        for line in below:
            console.print(line, markup=False)
        return
    run = result
    lines = [
        f"Run {run['name']}: {run['state']}" + (f" ({run['reason']})" if run["reason"] else ""),
        f"  kernel {run['kernel']}" + ("  [local emulator]" if run["local"] else ""),
        f"  segment {run['segment']}, version {_shown(run['kernel_version'])}, Kaggle status "
        f"{_shown(run['kaggle_status'])}" + (f" ({run['live']})" if run.get("live") else ""),
        f"  step {run['global_step']}/{_shown(run['total_steps'])}, epoch {_shown(run['epoch'])}, "
        f"train loss {_number(run['train_loss'])}, val loss {_number(run['val_loss'])}",
        f"  checkpoint on hand: {run['checkpoint'] or 'none yet'}; GPU time {run['gpu_hours']:.2f} h",
        f"  next: {run['next_action']}" + (f" (driven by {run['driver']})" if run.get("driver") else ""),
    ]
    console.print("\n".join(lines), markup=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for header in ("segment", "version", "kaggle", "step", "phase"):
        table.add_column(header, no_wrap=True, min_width=len(header))
    table.add_column("checkpoint handed on", overflow="fold", min_width=12)
    for header in ("down", "up", "upload"):
        table.add_column(header, no_wrap=True, min_width=8)
    for s in run["segments"]:
        upload = f"{s['upload_seconds']:.1f} s" if s.get("upload_seconds") is not None else "-"
        table.add_row(str(s["index"]), _shown(s["kernel_version"]), _shown(s["kaggle_status"]),
                      _shown(s["global_step"]), s["phase"], Path(s["resume_from"] or "").name or "-",
                      f"{s['bytes_downloaded'] / 2**20:.1f} MiB", f"{s['bytes_uploaded'] / 2**20:.1f} MiB", upload)
    console.print(table)


def print_bench(result: dict) -> None:
    console = RichConsole(highlight=False)
    config = result["config"]
    shape = (f"n_embd {config['n_embd']} x {config['n_layer']} layers, {config['micro_batch_size']} x "
             f"{config['max_length']} tokens x {config['gradient_accumulation_steps']} accumulation")
    console.print(f"kaggle-runner bench on {result['device']} ({result.get('device_name', '')}), {config['dtype']}, "
                  f"{shape}", markup=False)
    mfu = "n/a (no known peak for this device)" if result["mfu"] is None else f"{result['mfu']:.1%}"
    console.print(f"  {result['tokens_per_second']:,.0f} tokens/s, {result['step_time_ms']:.1f} ms per optimizer "
                  f"step, peak memory {result['peak_memory_mb']:.0f} MiB, MFU {mfu}", markup=False)
    console.print(f"  FLOPs per token {result['flops_per_token']:.3g} ({result['flops_formula']}); "
                  f"measured {datetime.now():%Y-%m-%d %H:%M}", markup=False)
