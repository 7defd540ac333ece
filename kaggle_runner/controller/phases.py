"""Each phase's handler, and what `status` says happens next: the one table the driver dispatches on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kaggle_runner.controller.concluding import conclude_segment, repush_segment
from kaggle_runner.controller.context import ChainContext, Wait
from kaggle_runner.controller.dataset_route import download_for_resume, start_next_segment, upload_for_resume
from kaggle_runner.controller.following import follow_segment, read_outputs
from kaggle_runner.controller.outputs_route import open_next_via_outputs
from kaggle_runner.controller.pushing import push_segment
from kaggle_runner.states import Phase
from kaggle_runner.store import Run, Segment


@dataclass(frozen=True)
class Step:
    handler: Callable[[ChainContext, Run, Segment], Wait | None]
    next_action: str  # what `status` says happens next


PHASES: dict[Phase, Step] = {
    Phase.PUSHING: Step(push_segment, "push the next kernel version"),
    Phase.RUNNING: Step(follow_segment, "wait for the kernel version to end"),
    Phase.ENDING: Step(read_outputs, "read the ended version's small outputs"),
    Phase.ENDED: Step(conclude_segment, "decide whether to resume"),
    Phase.ENDED_RESUME: Step(download_for_resume, "download the newest checkpoint"),
    Phase.RESUME_DOWNLOADED: Step(upload_for_resume, "upload it as a checkpoint dataset version"),
    Phase.RESUME_UPLOADED: Step(start_next_segment, "wait for the checkpoint dataset to be ready and settled, "
                                                    "then push"),
    Phase.OUTPUTS_SETTLING: Step(open_next_via_outputs, "wait until Kaggle can attach the version's outputs, then "
                                                       "push the next segment with them attached"),
    Phase.REPUSH: Step(repush_segment, "wait, then push the same resume again"),
}
