"""The chain's controller, in rooms: one driver per run moves each segment through its phases.

    context.py        what every handler works with: ChainContext, ChainPace, Wait, the chain's datasets
    driver.py         the lease and heartbeat, the one loop that runs handlers and waits, read-only following
    phases.py         the table: each phase's handler and what `status` says comes next
    pushing.py        phase pushing: render and push exactly once; the policies for refused pushes
    following.py      phases running and ending: follow the version, then read its small outputs
    concluding.py     phases ended and repush: decide (chain.decide), push a resume again after a wait
    dataset_route.py  phases ended_resume, resume_downloaded, resume_uploaded: the checkpoint-dataset route
    transfers.py      downloads (verified against the manifest) and the fetch of every output

Each phase is recorded in the store before its side effect and left by a guarded move (kaggle_runner/states.py
declares every allowed one), so a launcher killed at any moment continues with `watch` without pushing twice,
losing a checkpoint, or uploading again what already landed. docs/chain.md draws the phases.
"""

from kaggle_runner.controller.concluding import quota_left_hours
from kaggle_runner.controller.context import ChainContext, ChainPace, Wait, config_of, look_at
from kaggle_runner.controller.driver import drive
from kaggle_runner.controller.following import cancel_version, look_at_small_outputs
from kaggle_runner.controller.phases import PHASES
from kaggle_runner.controller.transfers import fetch_outputs

__all__ = ["PHASES", "ChainContext", "ChainPace", "Wait", "cancel_version", "config_of", "drive", "fetch_outputs",
           "look_at", "look_at_small_outputs", "quota_left_hours"]
