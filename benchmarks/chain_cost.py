"""What a resume costs, for both routes: bytes through the launcher's machine, seconds from a version's end to the
next push, and the idle gap between sessions (one version's end to the next one's start).

    python benchmarks/chain_cost.py [--set KEY=VALUE ...] [--uplink-mbit 20] [--downlink-mbit 100]

The tiny preset runs for real against the emulator (its default, Kaggle-like windows, scaled to seconds), once
per route. The seed and finetune shapes cannot train here: their rows are derived from their checkpoint sizes
(a checkpoint holds the weights and AdamW's two fp32 moments; best_model.pt the weights), a home connection
(20 Mbit/s up, 100 Mbit/s down by default), and the defaults the launcher waits by (dataset_settle_seconds and
outputs_settle_seconds, 180 s each; doctor's measurements replace them on a real account).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from kaggle_runner.config import load_preset
from kaggle_runner.display import Console
from kaggle_runner.emulator.server import EmulatorServer
from kaggle_runner.launcher import launch
from kaggle_runner.store import Store

CHAIN = ["min_quota_hours=0", "max_segments=10"]
SMALL_FILES_BYTES = 64 * 1024  # manifest, run_state.json and history of a long run: a generous bound
SHAPES = {"seed": 19_327_488, "finetune": 134_515_008}  # parameters (finetune: SmolLM2-135M's)


def measure(route: str, overrides: list[str]) -> dict:
    """One tiny chain through `route` against the emulator; the figures of each resume."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "kaggle-runner.toml").write_text(
            (Path(__file__).parent.parent / "kaggle_runner/presets/tiny.toml").read_text())
        os.environ.update(KAGGLE_USERNAME="bench", KAGGLE_KEY="bench-key")
        with EmulatorServer(root / "emu", username="bench", key="bench-key") as emulator:
            os.chdir(root)
            launch("kaggle-runner.toml", overrides=[*CHAIN, f"resume_via={route}", *overrides], name="cost",
                   endpoint=emulator.url, workspace=root / "ws", console=Console(quiet=True))
            segments = Store(root / "ws").segments("cost")
            versions = {(k.owner + "/" + k.slug, v.number): v for k in emulator.backend.kernels.values()
                        for v in k.versions}
            ends, gaps, moved = [], [], []
            for segment, following in zip(segments, segments[1:], strict=False):
                ended = versions[(segment.kernel_ref, segment.kernel_version)]
                started = versions[(following.kernel_ref, following.kernel_version)]
                ends.append(following.pushed_at - ended.ended_at)
                gaps.append(started.started_at - ended.ended_at)
                moved.append(segment.bytes_downloaded + segment.bytes_uploaded)
            os.chdir(Path(__file__).parent)
    return {"segments": len(segments), "resumes": len(ends), "bytes_through_laptop_per_resume": moved,
            "median_seconds_end_to_next_push": round(statistics.median(ends), 2) if ends else None,
            "median_idle_gap_seconds": round(statistics.median(gaps), 2) if gaps else None}


def derived(parameters: int, uplink_mbit: float, downlink_mbit: float) -> dict:
    """A resume of a model this size on Kaggle, per route, from its checkpoint size and the default waits."""
    weights = 4 * parameters
    checkpoint, best = 3 * weights, weights
    down, up = (checkpoint + best) / (downlink_mbit * 1e6 / 8), (checkpoint + best) / (uplink_mbit * 1e6 / 8)
    settle = 180.0
    return {
        "checkpoint_bytes": checkpoint, "best_model_bytes": best,
        "dataset": {"bytes_through_laptop_per_resume": 2 * (checkpoint + best) + SMALL_FILES_BYTES,
                    "seconds_end_to_next_push": round(down + up + settle),
                    "idle_gap_seconds_at_least": round(down + up + settle)},  # + Kaggle's processing, the queue
        "outputs": {"bytes_through_laptop_per_resume": SMALL_FILES_BYTES, "seconds_end_to_next_push": settle,
                    "idle_gap_seconds_at_least": settle},  # + the queue
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--uplink-mbit", type=float, default=20.0)
    parser.add_argument("--downlink-mbit", type=float, default=100.0)
    args = parser.parse_args()
    tiny = load_preset("tiny")
    result = {
        "tiny (measured against the emulator)": {route: measure(route, args.overrides)
                                                 for route in ("dataset", "outputs")},
        "tiny parameters": tiny.parameters_from_scratch(),
        **{f"{shape} (derived, {args.uplink_mbit:g}/{args.downlink_mbit:g} Mbit/s up/down)":
           derived(parameters, args.uplink_mbit, args.downlink_mbit) for shape, parameters in SHAPES.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
