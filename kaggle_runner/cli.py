"""The command line. Thin: each command parses options, calls one library function, prints the result.

Library errors (KaggleRunnerError) become one-line messages and a non-zero exit; nothing here decides
anything a test would need to reach through the CLI.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from kaggle_runner import __version__
from kaggle_runner.errors import KaggleRunnerError

DEFAULT_CONFIG = "kaggle-runner.toml"


def handle_errors(fn):
    """Turn library errors into `Error: <one line>` and exit 1; Ctrl-C into a short note and exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KaggleRunnerError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a full or read-only disk anywhere: what failed and where, in one line
            where = f" ({exc.filename})" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}; free space or check the folder's "
                                       "permissions, then run the command again") from None
        except KeyboardInterrupt:
            from kaggle_runner.launcher import CURRENT_RUN

            name = CURRENT_RUN.get("name")
            if fn.__name__ == "logs":
                click.echo("\nStopped following the log; the run goes on.", err=True)
            elif name:
                click.echo(f"\nInterrupted. The run's state is saved; `kaggle-runner watch {name}` picks it up.",
                           err=True)
            else:
                click.echo("\nInterrupted.", err=True)
            sys.exit(130)

    return wrapper


def config_option(fn):
    return click.option("-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
                        type=click.Path(dir_okay=False), help="The run configuration (TOML).")(fn)


def set_option(fn):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override one configuration key, e.g. --set epochs=5 (repeatable).")(fn)


def workspace_option(fn):
    return click.option("--workspace", type=click.Path(file_okay=False), default=".kaggle-runner",
                        show_default=True, envvar="KAGGLE_RUNNER_WORKSPACE",
                        help="Where runs are recorded (SQLite) and the local emulator keeps its data.")(fn)


def notify_option(fn):
    return click.option("--notify", "notify_url", metavar="URL",
                        help="POST to this URL when a segment starts and when the chain completes, stops or fails "
                             "(or set notify_url in the config).")(fn)


def chain_exit(run, detached: bool = False) -> None:
    """0 only when training completed (or, detached, the push landed); see docs/chain.md, "Exit codes"."""
    from kaggle_runner.launcher import exit_code

    code = exit_code(run, detached)
    if code:
        sys.exit(code)


def endpoint_option(fn):
    """The endpoint this command may send credentials to; a run recorded against another is refused."""
    return click.option("--endpoint", envvar="KAGGLE_RUNNER_API_ENDPOINT", metavar="URL",
                        help="The Kaggle API host the run was launched against, if not api.kaggle.com "
                             "(credentials go only where you say, never where the run store says).")(fn)


def endpoint_options(fn):
    fn = click.option("--endpoint", envvar="KAGGLE_RUNNER_API_ENDPOINT", metavar="URL",
                      help="Talk to this Kaggle API host instead of api.kaggle.com (e.g. an emulator).")(fn)
    return click.option("--local", is_flag=True,
                        help="Use the local Kaggle emulator (started in the background on first use): "
                             "no Kaggle account, kernels run on this machine's CPU.")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kaggle-runner")
def cli() -> None:
    """Train small GPT models on Kaggle's free GPUs from your laptop.

    kaggle-runner renders a self-contained training kernel, pushes it to Kaggle, follows it, and when
    a session ends before training does, resumes it in a new session from the last checkpoint, until
    the model is trained. Start with `kaggle-runner init --preset tiny` and
    `kaggle-runner launch --local`.
    """


@cli.command()
@click.option("--preset", type=click.Choice(["tiny", "seed", "finetune", "script"]), default="seed",
              show_default=True,
              help="tiny: trains on a CPU in a minute; seed: the seed notebook's model on WikiText-103; finetune: "
                   "a pretrained model (SmolLM2-135M) fine-tuned on your text; script: your own training script, "
                   "chained (writes an example train.py if there is none; docs/script.md).")
@click.option("-o", "--output", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the configuration.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@handle_errors
def init(preset: str, output: str, force: bool) -> None:
    """Write a commented kaggle-runner.toml from a preset."""
    from kaggle_runner.workspace import write_preset

    path = write_preset(preset, Path(output), force=force)
    click.echo(f"Wrote {path} (preset {preset}). Next: kaggle-runner launch -c {path}"
               + (" --local" if preset in ("tiny", "script") else ""))


@cli.command()
@config_option
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The kernel folder to write (code file + kernel-metadata.json).")
@click.option("--username", default=None, help="Kaggle user that owns the kernel [default: from credentials].")
@set_option
@handle_errors
def render(config_path: str, out_dir: str, username: str | None, overrides: tuple[str, ...]) -> None:
    """Validate the configuration and write the kernel folder, ready for `kaggle kernels push`."""
    from kaggle_runner.workspace import render_to_folder

    rendered = render_to_folder(config_path, out_dir, overrides, username)
    click.echo(f"Wrote {rendered.code_file} and {rendered.metadata_file} (kernel {rendered.metadata['id']}).")


@cli.command()
@config_option
@click.option("--name", help="A name for the run [default: the slug and a timestamp].")
@set_option
@click.option("--detach", is_flag=True, help="Return after the first push; follow later with `watch RUN`.")
@click.option("--max-segments", type=click.IntRange(min=1), help="Allow this many segments (max_segments).")
@notify_option
@endpoint_options
@workspace_option
@handle_errors
def launch(config_path, name, overrides, detach, max_segments, notify_url, local, endpoint, workspace) -> None:
    """Push the kernel and follow it until the model is trained, resuming across sessions.

    Exits 0 when training completed (with --detach: when the push landed), 3 when the chain failed,
    4 when it stopped (a guardrail), 5 when it was cancelled, 1 for any other error.
    """
    from kaggle_runner.launcher import launch as launch_run

    run = launch_run(config_path, overrides=overrides, name=name, detach=detach, local=local, endpoint=endpoint,
                     workspace=workspace, max_segments=max_segments, notify_url=notify_url)
    chain_exit(run, detach)


@cli.command()
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "every", is_flag=True, help="Runs of every workspace you launched from.")
@endpoint_option
@workspace_option
@handle_errors
def status(run: str | None, as_json: bool, every: bool, endpoint: str | None, workspace: str) -> None:
    """All runs as a table, or one run in detail (asking Kaggle when no process drives it)."""
    from kaggle_runner.run_views import all_status, run_status

    if every:
        result = all_status()
    elif run is None and not (Path(workspace) / "runs.sqlite").exists():
        click.echo("[]" if as_json else f"No runs here: {workspace} does not exist in {Path.cwd()}. Runs live in "
                   "the folder you launched them from (or --workspace); `kaggle-runner status --all` lists them all.")
        return
    else:
        result = run_status(workspace, run, refresh=run is not None, endpoint=endpoint)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        from kaggle_runner.display import print_status

        print_status(result)


@cli.command()
@click.argument("run")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              help="Where to put the outputs [default: outputs/RUN].")
@endpoint_option
@workspace_option
@handle_errors
def fetch(run: str, out_dir: str | None, endpoint: str | None, workspace: str) -> None:
    """Download a run's outputs, verified against the kernel's checksums; resumable."""
    from kaggle_runner.launcher import fetch_run

    target = fetch_run(workspace, run, out_dir, endpoint=endpoint)
    click.echo(f"Outputs of {run} are in {target}")


@cli.command()
@click.argument("run")
@click.option("--follow", "-f", is_flag=True, help="Stream the log of the running version until it ends.")
@click.option("--segment", type=int, help="The log of segment N instead of the latest.")
@click.option("--all", "every", is_flag=True, help="The logs of every segment, in order.")
@click.option("--raw", is_flag=True, help="Keep the JSON event lines the launcher reads.")
@endpoint_option
@workspace_option
@handle_errors
def logs(run: str, follow: bool, segment: int | None, every: bool, raw: bool, endpoint: str | None,
         workspace: str) -> None:
    """Print the log of a run's current kernel version (or of one segment, or of all).

    Terminal control sequences a kernel printed are stripped; its JSON event lines are left out unless --raw.
    """
    from kaggle_runner.run_views import print_logs

    print_logs(workspace, run, follow=follow, segment=segment, every=every, raw=raw, endpoint=endpoint)


@cli.command()
@click.argument("run")
@endpoint_option
@workspace_option
@handle_errors
def cancel(run: str, endpoint: str | None, workspace: str) -> None:
    """Stop a run: cancel its running kernel version and end its chain."""
    from kaggle_runner.launcher import cancel_run

    click.echo(cancel_run(workspace, run, endpoint=endpoint))


@cli.command()
@click.argument("run", required=False)
@click.option("--finished", is_flag=True, help="Every finished run not cleaned yet.")
@click.option("--on-kaggle", is_flag=True,
              help="Also empty the runs' checkpoint and token datasets on Kaggle (their old versions deleted). "
                   "Never done without it; a --local run's emulator copies always go.")
@endpoint_option
@workspace_option
@handle_errors
def clean(run: str | None, finished: bool, on_kaggle: bool, endpoint: str | None, workspace: str) -> None:
    """Give back the disk a finished run holds: the launcher's working copies (outputs/RUN stays) and, for a
    --local run, the emulator's copies of its kernels and datasets."""
    from kaggle_runner.clean import clean as clean_runs

    for line in clean_runs(workspace, run, finished, on_kaggle, endpoint).lines:
        click.echo(line)


@cli.command()
@click.argument("run", required=False)
@click.option("--all", "every", is_flag=True, help="Drive every unfinished run of the workspace in this process.")
@click.option("--once", is_flag=True, help="One pass: move every run as far as it can go now, then exit (for cron, "
                                           "a timer or CI; exit 6: something is still in flight).")
@notify_option
@endpoint_option
@workspace_option
@handle_errors
def watch(run: str | None, every: bool, once: bool, notify_url: str | None, endpoint: str | None,
          workspace: str) -> None:
    """Follow a run and drive its resume chain (what launch does after its first push).

    With --all, every unfinished run of the workspace (each still has one driver). With --once, one pass that
    never waits for a session to end: safe every few minutes from cron or a systemd timer, overlapping itself,
    after any gap (`kaggle-runner service cron` prints the line). Exit codes as for launch; with --all the
    worst of its runs, and 6 while any run is still in flight (or driven by another process).
    """
    from kaggle_runner.launcher import exit_code, watch_all, watch_run

    if every == bool(run):
        raise click.UsageError("name one RUN, or pass --all")
    if run:
        chain_exit(watch_run(workspace, run, notify_url=notify_url, once=once, endpoint=endpoint))
        return
    codes = [exit_code(r) for r in watch_all(workspace, notify_url=notify_url, once=once, endpoint=endpoint)]
    worst = max(codes, default=0)  # EXIT_STILL_RUNNING (6): a run is still in flight
    if worst:
        sys.exit(worst)


@cli.command()
@click.argument("kind", type=click.Choice(["cron", "systemd", "launchd"]))
@click.option("--resident", is_flag=True, help="Keep `watch --all` running instead of a pass every few minutes "
                                               "(systemd and launchd).")
@click.option("--every", default=5, show_default=True, type=int, help="Minutes between passes.")
@workspace_option
@handle_errors
def service(kind: str, resident: bool, every: int, workspace: str) -> None:
    """Print a crontab line, a systemd user timer, or a launchd agent that keeps every chain going.

    Each runs `kaggle-runner watch --all --once` every few minutes: a laptop that sleeps only delays the next
    pass. --resident prints a unit or agent that keeps `watch --all` running instead.
    """
    from kaggle_runner.service import service_file

    click.echo(service_file(kind, workspace, resident=resident, every=every), nl=False)


@cli.command()
@click.argument("run")
@click.option("--max-segments", type=int, help="Allow this many segments in all (raises the limit).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="Take the run's configuration from this file (keys an exact resume needs may not change).")
@set_option
@notify_option
@endpoint_option
@workspace_option
@handle_errors
def resume(run: str, max_segments: int | None, config_path: str | None, overrides: tuple[str, ...],
           notify_url: str | None, endpoint: str | None, workspace: str) -> None:
    """Restart a stopped or failed chain from its newest checkpoint, then follow it.

    Fix what stopped it with -c FILE or --set KEY=VALUE (validated, and the kernel rendered again); keys that
    decide the model, the data or the kernel are refused with the reason. Exit codes as for launch.
    """
    from kaggle_runner.launcher import resume_run

    chain_exit(resume_run(workspace, run, max_segments=max_segments, config_path=config_path, overrides=overrides,
                          notify_url=notify_url, endpoint=endpoint))


@cli.command()
@endpoint_options
@workspace_option
@handle_errors
def quota(local: bool, endpoint: str | None, workspace: str) -> None:
    """GPU hours used and left this week."""
    from kaggle_runner.run_views import quota_summary

    click.echo(quota_summary(workspace, local=local, endpoint=endpoint))


@cli.command()
@endpoint_options
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print what was measured as JSON instead of a table.")
@handle_errors
def doctor(local: bool, endpoint: str | None, workspace: str, as_json: bool) -> None:
    """Check an account before the first GPU chain, on CPU kernels only (no GPU quota, a few minutes).

    Checks credentials and quota, pushes a tiny CPU probe kernel, measures how long Kaggle keeps attaching
    a dataset's previous version after a new one is ready, and records the image's versions, internet
    access and mount layout in WORKSPACE/doctor.json, which launch uses.
    """
    from kaggle_runner.display import Console
    from kaggle_runner.doctor import print_report, run_doctor

    console = Console(quiet=as_json)
    result = run_doctor(workspace, local=local, endpoint=endpoint, console=console)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_report(result, console)
    if not result["ok"]:
        sys.exit(1)


@cli.group()
def emulator() -> None:
    """The local Kaggle emulator: Kaggle's API on this machine, running kernels for real on the CPU."""


@emulator.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8555, show_default=True, type=int, help="Port; 0 picks a free one.")
@click.option("--data-dir", default=".kaggle-runner/emulator", show_default=True,
              type=click.Path(file_okay=False), help="Where kernels, datasets and outputs are kept.")
@click.option("--username", default="local", show_default=True, help="The account the emulator accepts.")
@click.option("--key", envvar="KAGGLE_RUNNER_EMULATOR_KEY", default=None,
              help="The API key it accepts (or KAGGLE_RUNNER_EMULATOR_KEY) [default: a random key kept 0600 in "
                   "DATA_DIR/emulator-key].")
@click.option("--session-limit", type=float, default=None,
              help="Seconds a version may run when the push sets no timeout [default: 12 h].")
@click.option("--dataset-delay", type=float, default=0.0, show_default=True,
              help="Seconds before a new dataset version reports ready.")
@click.option("--kind", is_flag=True,
              help="Turn every Kaggle-realism behaviour off (no 404 windows, lags, pinning, rate limit or "
                   "refusals) for debugging; see docs/emulator.md.")
@click.option("--idle-exit", type=click.FloatRange(min=1), default=None,
              help="Exit after this many seconds without a request while no version runs or waits "
                   "[default: serve until stopped].")
@click.option("--ready-file", type=click.Path(dir_okay=False), hidden=True)
@handle_errors
def emulator_serve(host, port, data_dir, username, key, session_limit, dataset_delay, kind, idle_exit,
                   ready_file) -> None:
    """Serve the emulator in the foreground until Ctrl-C (SIGTERM also stops it)."""
    from kaggle_runner.emulator.realism import Realism
    from kaggle_runner.emulator.server import data_dir_key, serve_forever

    if not key:
        key, path = data_dir_key(Path(data_dir))
        click.echo(f"The emulator's API key is in {path} (user {username}).")
    serve_forever(host=host, port=port, data_dir=Path(data_dir), username=username, key=key,
                  session_limit=session_limit, dataset_delay=dataset_delay,
                  ready_file=Path(ready_file) if ready_file else None, realism=Realism.off() if kind else None,
                  idle_exit=idle_exit)


@emulator.command("stop")
@workspace_option
@handle_errors
def emulator_stop(workspace: str) -> None:
    """Stop the background emulator that --local started for this workspace."""
    from kaggle_runner.local import stop_background_emulator

    click.echo(stop_background_emulator(Path(workspace)))


@cli.command()
@click.option("--preset", type=click.Choice(["tiny", "seed", "finetune"]), default="tiny", show_default=True,
              help="The model shape to time, unless -c names a configuration.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="Time this configuration's shape instead of a preset's.")
@set_option
@click.option("--steps", default=20, show_default=True, type=int, help="Optimizer steps to time.")
@click.option("--warmup", default=3, show_default=True, type=int, help="Steps before timing starts.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              show_default=True, help="Override the precision key: float16 runs a T4's fp16 + GradScaler path "
              "on a newer GPU (or, slowly, on a CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
@handle_errors
def bench(preset, config_path, overrides, steps, warmup, device, dtype, as_json) -> None:
    """Time the kernel's own training step: tokens/s, step time, peak memory, MFU."""
    from kaggle_runner.bench import run_benchmark

    result = run_benchmark(preset=preset, config_path=config_path, overrides=overrides, steps=steps,
                           warmup=warmup, device=device, dtype=dtype)
    if as_json:
        click.echo(json.dumps(result))
    else:
        from kaggle_runner.display import print_bench

        print_bench(result)


def outputs_option(fn):
    return click.option("--outputs", type=click.Path(file_okay=False),
                        help="Where the run's outputs are, or go when fetched [default: outputs/RUN].")(fn)


@cli.command()
@click.argument("run")
@click.argument("prompt")
@click.option("--tokens", default=100, show_default=True, type=click.IntRange(min=1),
              help="New tokens to write (capped to fit the model's context).")
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0),
              help="Sampling temperature; 0 always takes the likeliest token.")
@click.option("--top-k", default=40, show_default=True, type=click.IntRange(min=0),
              help="Sample among the k likeliest tokens; 0 for all.")
@click.option("--seed", type=int, help="Seed the sampler: the same seed writes the same text.")
@click.option("--best", is_flag=True, help="Use the best weights (lowest validation loss) instead of the final ones.")
@outputs_option
@endpoint_option
@workspace_option
@handle_errors
def generate(run, prompt, tokens, temperature, top_k, seed, best, outputs, endpoint, workspace) -> None:
    """Continue PROMPT with a run's trained model, on this machine's CPU (fetches the outputs if needed)."""
    from kaggle_runner.generate import generate as generate_text

    result = generate_text(workspace, run, prompt, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed,
                           best=best, outputs=outputs, endpoint=endpoint)
    for note in result.notes:
        click.echo(note, err=True)
    click.echo(result.text)


@cli.command()
@click.argument("run")
@click.option("-o", "--output", "html_path", type=click.Path(dir_okay=False),
              help="The HTML page to write, the PNG beside it; a path ending in .png gets the chart alone "
                   "[default: outputs/RUN/report.html].")
@outputs_option
@endpoint_option
@workspace_option
@handle_errors
def report(run: str, html_path: str | None, outputs: str | None, endpoint: str | None, workspace: str) -> None:
    """A run at a glance: loss curves across segments, learning rate, tokens/s, samples, segment table."""
    from kaggle_runner.report import write_report

    page, chart = write_report(workspace, run, html_path, outputs, endpoint)
    click.echo(f"Wrote {page} and {chart}" if page else f"Wrote {chart}")


def main() -> None:
    cli(prog_name="kaggle-runner")


if __name__ == "__main__":
    main()

