"""The resume chain's own cost, measured with the emulator: time from a segment's end to the next push, and
bytes moved per resume (against what downloading every rotated checkpoint would move).

    python benchmarks/chain_cost.py [--set KEY=VALUE ...]

The emulator adds no simulated delay here (dataset readiness 0 s), so the time is the launcher's own work
plus its polling interval (1 s against an emulator): reading the outputs, downloading, uploading, waiting
for the dataset, rendering and pushing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from kaggle_runner.artifacts import read_manifest
from kaggle_runner.display import Console
from kaggle_runner.emulator.server import EmulatorServer
from kaggle_runner.launcher import launch
from kaggle_runner.store import Store

CHAIN = ["session_timeout_seconds=18", "safety_margin_seconds=2", "min_quota_hours=0", "max_segments=10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "kaggle-runner.toml").write_text(
            (Path(__file__).parent.parent / "kaggle_runner/presets/tiny.toml").read_text())
        os.environ.update(KAGGLE_USERNAME="bench", KAGGLE_KEY="bench-key")
        with EmulatorServer(root / "emu", username="bench", key="bench-key") as emulator:
            os.chdir(root)
            launch("kaggle-runner.toml", overrides=[*CHAIN, *args.overrides], name="cost", endpoint=emulator.url,
                   workspace=root / "ws", console=Console(quiet=True))
            segments = Store(root / "ws").segments("cost")
            versions = emulator.backend.get_kernel("bench", "kaggle-runner-tiny").versions
            gaps, moved, all_checkpoints = [], [], []
            for segment, following in zip(segments, segments[1:], strict=False):
                ended = versions[segment.kernel_version - 1].ended_at
                gaps.append(following.pushed_at - ended)
                moved.append((segment.bytes_downloaded, segment.bytes_uploaded))
                manifest = read_manifest(root / "ws/runs/cost" / f"segment-{segment.idx}")
                all_checkpoints.append(sum(info["size"] for info in manifest["files"].values()))
    print(json.dumps({
        "segments": len(segments), "resumes": len(gaps),
        "seconds_end_to_next_push": [round(g, 2) for g in gaps],
        "median_seconds_end_to_next_push": round(statistics.median(gaps), 2) if gaps else None,
        "bytes_downloaded_per_resume": [d for d, _ in moved], "bytes_uploaded_per_resume": [u for _, u in moved],
        "bytes_of_all_listed_checkpoints_and_best": all_checkpoints,
    }))


if __name__ == "__main__":
    main()
