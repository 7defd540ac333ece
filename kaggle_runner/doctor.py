"""`kaggle-runner doctor`: a cheap preflight on a real account, before the first GPU chain.

It costs no GPU quota: the probe is a tiny CPU kernel (`enable_gpu` false) that reports what it sees.
It checks the credentials and the quota, measures how long a new version's status stays invisible and how
long Kaggle keeps attaching the previous version of a dataset after a new one is ready (the pin delay),
and records the image's versions, internet access, the dataset mount layout and the session variable.
What it measured goes to `<workspace>/doctor.json`, where the launcher reads `pin_delay_seconds` to size
the settle time before a resume push (controller.settle_seconds).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from kaggle_runner import artifacts, waits
from kaggle_runner.dataset_readiness import wait_for_dataset
from kaggle_runner.display import Console
from kaggle_runner.doctor_probe import (
    DATA_SLUG,
    PROBE_OUTPUT,
    PROBE_SLUG,
    PROBE_TITLE,
    SECOND_SLUG,
    SECOND_TITLE,
    report_in_log,
    write_probe,
    write_probe_dataset,
)
from kaggle_runner.errors import KaggleRunnerError
from kaggle_runner.kaggle_api import KaggleApiError, KaggleGateway, PushRefused, PushResult, SourcesNotAttached
from kaggle_runner.states import KaggleStatus

MAX_PUSHES = 3


@dataclass(frozen=True)
class ProbePace:
    """How long to wait for what: minutes against Kaggle, seconds against an emulator (about x0.05)."""

    poll: float  # first interval between status polls
    max_poll: float
    probe_timeout: float  # a probe version must end within this
    session_timeout: int  # the push's session limit for the probe
    dataset_timeout: float  # the probe dataset must say ready within this
    output_wait: float  # the output listing lags the end by up to this
    repush_waits: tuple[float, ...]  # before push 2, before push 3, and the margin when none saw the new data

    @classmethod
    def for_target(cls, kaggle: bool) -> ProbePace:
        if kaggle:
            return cls(poll=2.0, max_poll=20.0, probe_timeout=600.0, session_timeout=900, dataset_timeout=600.0,
                       output_wait=300.0, repush_waits=(30.0, 90.0, 180.0))
        return cls(poll=0.2, max_poll=1.0, probe_timeout=120.0, session_timeout=300, dataset_timeout=60.0,
                   output_wait=30.0, repush_waits=(1.5, 4.5, 9.0))


@dataclass
class Row:
    check: str
    result: str
    status: str  # ok | warn | fail | skip
    todo: str = ""


# -- steps ---------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """One probe kernel: its ref and title, and the newest version this doctor knows of."""

    ref: str
    title: str
    known_version: int | None = None
    outputs_nonce: str | None = None  # what its newest COMPLETE version wrote to its outputs
    ended_at: float | None = None  # when that version was seen ended


@dataclass(frozen=True)
class ProbeRun:
    version: int
    invisible_seconds: float  # how long its status stayed invisible after the push
    attached: bool  # Kaggle attached every source it was asked to (none listed invalid)
    status: str
    message: str | None
    report: dict | None


class Doctor:
    def __init__(self, gateway: KaggleGateway, workspace: Path, console: Console, pace: ProbePace):
        self.gateway, self.workspace, self.console, self.pace = gateway, workspace, console, pace
        self.folder = workspace / "doctor"
        self.rows: list[Row] = []
        self.measured: dict[str, Any] = {}
        self.first = self.second = Probe("", PROBE_TITLE)
        self.data_ref = ""
        self.internet_asked = True

    def row(self, check: str, result: str, status: str, todo: str = "") -> None:
        self.rows.append(Row(check, result, status, todo))

    def credentials(self) -> None:
        username = self.gateway.username
        if not username:
            raise KaggleRunnerError("the Kaggle client did not report a username for these credentials")
        self.first = Probe(f"{username}/{PROBE_SLUG}", PROBE_TITLE)
        self.second = Probe(f"{username}/{SECOND_SLUG}", SECOND_TITLE)
        self.data_ref = f"{username}/{DATA_SLUG}"
        current = self.gateway.current_version(self.first.ref, pushed_before=False)  # the first request
        self.first.known_version = current[0] if current else None
        current = self.gateway.current_version(self.second.ref, pushed_before=False)
        self.second.known_version = current[0] if current else None
        self.measured["username"] = username
        self.row("credentials", f"accepted for {username}", "ok")

    def quota(self) -> None:
        try:
            quota = self.gateway.quota()
        except KaggleApiError as exc:
            self.row("GPU quota", f"could not be read ({exc})", "warn",
                     "launch checks it again; `kaggle-runner quota` shows it")
            return
        used, total = quota["used_seconds"], quota["total_seconds"]
        if used is None or total is None:
            self.row("GPU quota", "unknown (Kaggle left it out)", "warn", "see https://www.kaggle.com/settings")
            return
        left = max(0.0, total - used)
        self.measured["gpu_quota_left_hours"] = round(left / 3600, 2)
        self.row("GPU quota", f"{left / 3600:.1f} h left of {total / 3600:.1f} h this week", "ok" if left else "warn",
                 "" if left else f"wait for the weekly reset ({quota.get('refresh') or 'Saturday 00:00 UTC'})")

    def upload_nonce(self) -> tuple[str, float]:
        """A new version of the probe dataset holding a fresh nonce; (nonce, when it was reported ready)."""
        nonce = secrets.token_hex(16)
        folder = write_probe_dataset(self.folder / "dataset", self.data_ref, nonce)
        before = self.gateway.dataset_version(self.data_ref)
        self.console.say(f"Uploading a fresh nonce to the private dataset {self.data_ref}")
        if before is None:
            try:
                self.gateway.create_dataset(folder)
            except KaggleApiError:  # it exists but was not visible yet: version it instead
                before = self.gateway.dataset_version(self.data_ref)
                if before is None:
                    raise
                self.gateway.create_dataset_version(folder, "kaggle-runner doctor probe")
        else:
            self.gateway.create_dataset_version(folder, "kaggle-runner doctor probe")
        wait_for_dataset(self.gateway, self.data_ref, before or 0, self.pace.dataset_timeout, self.console.note,
                         "try `kaggle-runner doctor` again later", self.pace.poll, self.pace.max_poll)
        return nonce, time.time()

    def run(self, probe: Probe, dataset: str | None = None, kernels: tuple[str, ...] = ()) -> ProbeRun:
        """Push `probe` once (a fresh outputs nonce; the sources asked for), wait for its end and read its report.
        Falls back to no internet when Kaggle refuses internet for this account."""
        nonce = secrets.token_hex(16)

        def push(internet: bool) -> tuple[PushResult, bool]:
            folder = write_probe(self.folder / probe.ref.split("/")[1], probe.ref, dataset, internet, list(kernels),
                                 nonce, probe.title)
            try:
                return self.gateway.push(folder, self.pace.session_timeout, probe.known_version), True
            except SourcesNotAttached as exc:
                if exc.landed is None:
                    raise
                return exc.landed, False  # a version runs without the sources Kaggle would not attach

        try:
            result, attached = push(self.internet_asked)
        except PushRefused as exc:
            words = str(exc).lower()
            if not self.internet_asked or not any(w in words for w in ("internet", "phone", "verif")):
                raise
            self.console.note(f"note: {exc}; pushing the probe again without internet")
            self.internet_asked = False
            result, attached = push(False)
        probe.known_version = result.version
        pushed = time.time()
        self.console.say(f"Pushed the CPU probe {probe.ref} version {result.version}")
        try:
            self._poll(lambda: self.gateway.status(probe.ref, result.version), self.pace.probe_timeout)
        except waits.WaitTimedOut:
            raise KaggleRunnerError(f"Kaggle showed no status for {probe.ref} v{result.version} in "
                                    f"{self.pace.probe_timeout:.0f}s; see https://www.kaggle.com/code/"
                                    f"{probe.ref}") from None
        invisible = time.time() - pushed
        status, message = self.wait_for_end(probe, result.version)
        report = self.report(probe, result.version)
        if status == KaggleStatus.COMPLETE:
            probe.outputs_nonce, probe.ended_at = nonce, time.time()
        return ProbeRun(result.version, invisible, attached, status, message, report)

    def _poll(self, look, timeout: float, factor: float = 1.5):
        return waits.poll(look, self.pace.poll, self.pace.max_poll, timeout, factor=factor)

    def wait_for_end(self, probe: Probe, version: int) -> tuple[str, str | None]:
        last: list[tuple[str, str | None] | None] = [None]

        def ended() -> tuple[str, str | None] | None:
            last[0] = answer = self.gateway.status(probe.ref, version)
            known = KaggleStatus.read(answer[0]) if answer else None
            return answer if known is not None and known.terminal else None

        try:
            return self._poll(ended, self.pace.probe_timeout)
        except waits.WaitTimedOut:
            raise KaggleRunnerError(f"the probe {probe.ref} v{version} is still "
                                    f"{last[0][0] if last[0] else 'invisible'} after {self.pace.probe_timeout:.0f}s; "
                                    f"stop it at https://www.kaggle.com/code/{probe.ref}") from None

    def report(self, probe: Probe, version: int) -> dict | None:
        """The probe's report: probe.json from the outputs, else its JSON line in the log; the listing lags."""
        target = self.folder / f"output-{probe.ref.split('/')[1]}-v{version}"

        def look() -> dict | None:
            try:
                files, log = self.gateway.list_output(probe.ref, version)
                if PROBE_OUTPUT in {f.name for f in files}:
                    self.gateway.download(probe.ref, version, target, artifacts.exact_pattern([PROBE_OUTPUT]),
                                          force=True)
                    found = artifacts.read_json_file(target / PROBE_OUTPUT)
                    if isinstance(found, dict):
                        return found
                return report_in_log(log)
            except KaggleApiError as exc:
                if not exc.transient:
                    raise
                return None

        try:
            return self._poll(look, self.pace.output_wait, factor=2)
        except waits.WaitTimedOut:
            try:
                return report_in_log(self.gateway.log(probe.ref, version))
            except KaggleApiError:
                return None

    def _failed(self, probe: Probe, run: ProbeRun) -> bool:
        if run.status == KaggleStatus.COMPLETE and run.report is not None:
            return False
        self.row("probe kernel", f"{probe.ref} v{run.version} ended {run.status}"
                 + (f": {run.message}" if run.message else "") + ("" if run.report else "; it left no report"),
                 "fail", f"read its log: https://www.kaggle.com/code/{probe.ref}")
        return True

    def probe(self) -> dict | None:
        """Upload a nonce, push right after, push again (waiting longer) until a probe sees it."""
        nonce, ready_at = self.upload_nonce()
        invisible: list[float] = []
        last: dict | None = None
        pin: tuple[int, float, bool] | None = None
        failed = False
        for attempt in range(1, MAX_PUSHES + 1):
            pushed_at = time.time()
            run = self.run(self.first, dataset=self.data_ref)
            invisible.append(run.invisible_seconds)
            if self._failed(self.first, run):
                failed = True
                break
            last = found = run.report or {}
            if found.get("nonce") == nonce:
                pin = (attempt, pushed_at - ready_at, True)
                break
            what = "the previous version" if found.get("nonce") else "no version"
            if attempt == MAX_PUSHES:
                pin = (attempt, pushed_at - ready_at + self.pace.repush_waits[-1], False)
                self.console.say(f"Probe v{run.version} saw {what} of {self.data_ref} (Kaggle pinned it at push)")
            else:
                wait = self.pace.repush_waits[attempt - 1]
                self.console.say(f"Probe v{run.version} saw {what} of {self.data_ref} (Kaggle pinned it at push); "
                                 f"pushing again in {wait:.0f}s")
                waits.sleep(wait)
        if invisible:
            self.measured["status_invisible_seconds"] = round(max(invisible), 1)
        if last is not None and not failed:
            self.row("probe kernel", f"{len(invisible)} CPU version(s) of {self.first.ref} ended COMPLETE "
                     "(no GPU quota used)", "ok")
        if invisible:
            self.row("status after push", f"invisible (Kaggle: \"No runs found\") for up to {max(invisible):.1f}s",
                     "ok", "nothing: launch treats this window as \"not yet\"")
        if pin is not None:
            self.pin(*pin)
        else:
            self.row("dataset pinning", "not measured", "skip", "run `kaggle-runner doctor` again")
        return last

    def probe_outputs(self) -> None:
        """Whether a second kernel can attach the first probe's newest outputs, how long after its end, and
        whether a kernel can attach its own: what the outputs route needs (resume_via)."""
        if self.first.outputs_nonce is None or self.first.ended_at is None:
            for check in ("outputs to another kernel", "outputs to itself"):
                self.row(check, "not measured (no probe ended COMPLETE)", "skip")
            return
        other = None
        for attempt in range(1, MAX_PUSHES + 1):
            pushed_at = time.time()
            run = self.run(self.second, kernels=(self.first.ref,))
            if self._failed(self.second, run):
                break
            seen = ((run.report or {}).get("kernel_sources_seen") or {}).get(self.first.ref) or {}
            if run.attached and seen.get("nonce") == self.first.outputs_nonce:
                other = (attempt, pushed_at - self.first.ended_at)
                self.measured["outputs_mount_layout"] = seen.get("layout")
                break
            if attempt < MAX_PUSHES:
                wait = self.pace.repush_waits[attempt - 1]
                self.console.say(f"Probe {self.second.ref} v{run.version} did not see the newest outputs of "
                                 f"{self.first.ref}; pushing again in {wait:.0f}s")
                waits.sleep(wait)
        self.measured["outputs_other_attach"] = other is not None
        if other is not None:
            delay = round(max(0.0, other[1]), 1)
            self.measured["outputs_attach_delay_seconds"] = delay
            self.row("outputs to another kernel", f"{self.second.ref} read the newest outputs of {self.first.ref} "
                     f"{delay:.0f}s after it ended (push {other[0]} of {MAX_PUSHES})", "ok",
                     "nothing: launch resumes through Kaggle's outputs (resume_via = \"auto\"), waiting at least "
                     f"{delay:.0f}s after each version (or outputs_settle_seconds, if longer)")
        else:
            self.row("outputs to another kernel", f"Kaggle did not attach {self.first.ref}'s newest outputs to "
                     f"{self.second.ref} in {MAX_PUSHES} pushes", "warn",
                     "launch resumes through the checkpoint dataset instead (resume_via = \"auto\")")
        previous = self.first.outputs_nonce
        run = self.run(self.first, kernels=(self.first.ref,))
        seen = ((run.report or {}).get("kernel_sources_seen") or {}).get(self.first.ref) or {}
        itself = run.attached and run.status == KaggleStatus.COMPLETE and seen.get("nonce") == previous
        self.measured["outputs_self_attach"] = itself
        self.row("outputs to itself", f"a kernel {'can' if itself else 'cannot'} attach its own newest outputs",
                 "ok", "nothing: the outputs route takes turns between two kernels, <slug> and <slug>-b, so a "
                 "push that misses its checkpoint never hides it")

    def pin(self, pushes: int, delay: float, exact: bool) -> None:
        delay = round(max(0.0, delay), 1)
        self.measured["pin_delay_seconds"] = delay
        self.measured["pin_delay_exact"] = exact
        if exact and pushes == 1:
            self.row("dataset pinning", "the push right after the upload saw the new version", "ok")
        elif exact:
            self.row("dataset pinning", f"Kaggle attached the old version; a push {delay:.0f}s after the new one was "
                     f"ready saw it (push {pushes} of {MAX_PUSHES}; an upper bound)", "warn",
                     f"nothing: launch lets each checkpoint upload settle at least {delay:.0f}s "
                     "(or dataset_settle_seconds, if longer)")
        else:
            self.row("dataset pinning", f"{MAX_PUSHES} pushes, the last {delay - self.pace.repush_waits[-1]:.0f}s "
                     "after ready, all saw an older version", "warn",
                     f"launch now waits {delay:.0f}s after an upload; run `kaggle-runner doctor` again later")

    def kernel_rows(self, found: dict | None) -> None:
        if found is None:
            for check in ("dataset mount", "image versions", "internet", "session variable"):
                self.row(check, "not measured (the probe gave no report)", "skip")
            return
        layout = found.get("mount_layout")
        self.measured["mount_layout"] = layout if layout in ("datasets", "slug") else None
        places = {"datasets": "<input>/datasets/<owner>/<slug>/", "slug": "<input>/<slug>/"}
        self.row("dataset mount", places.get(layout, f"not found ({found.get('mount_path') or 'nothing mounted'})"),
                 "ok" if layout in places else "warn",
                 "" if layout in places else "the kernel searches the whole input root; report this layout")
        versions = {name: found.get(name) for name in ("python", "torch", "transformers", "datasets")}
        self.measured["versions"] = versions
        missing = [name for name in ("torch", "transformers", "datasets") if not versions[name]]
        self.row("image versions", ", ".join(f"{k} {v or 'absent'}" for k, v in versions.items()),
                 "warn" if missing else "ok",
                 f"the kernel needs {', '.join(missing)}; pip-install it in the kernel or wait for Kaggle's image"
                 if missing else "")
        online = bool(found.get("internet"))
        self.measured["internet"] = online
        self.row("internet", "yes" if online else f"no ({found.get('internet_error') or 'not allowed'})",
                 "ok" if online else "warn",
                 "" if online else "verify your phone number at https://www.kaggle.com/settings to allow internet in "
                 "kernels; without it, attach data and tokenizers as Kaggle datasets and set enable_internet = false")
        session = bool(found.get("session_variable"))
        self.measured["session_variable"] = session
        self.row("session variable", f"KAGGLE_CONTAINER_NAME {'present' if session else 'absent'}",
                 "ok" if session else "warn",
                 "" if session else "`kaggle-runner cancel` may not reach a running version: stop it on its page")


def run_doctor(workspace: str | Path, local: bool = False, endpoint: str | None = None,
               console: Console | None = None) -> dict:
    """Run every check (a few minutes against Kaggle, seconds locally); save and return what was measured."""
    from kaggle_runner.connect import gateway_for  # the one way commands connect, --local included

    console = console or Console()
    workspace = Path(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    gateway = gateway_for(workspace, local, endpoint, console.note)
    doctor = Doctor(gateway, workspace, console, ProbePace.for_target(kaggle=not local and not endpoint))
    doctor.credentials()
    doctor.quota()
    found = doctor.probe()
    doctor.kernel_rows(found)
    doctor.probe_outputs()
    measured = {
        "pin_delay_seconds": None, "pin_delay_exact": None, "status_invisible_seconds": None, "mount_layout": None,
        "versions": None, "internet": None, "session_variable": None, "outputs_other_attach": None,
        "outputs_self_attach": None, "outputs_attach_delay_seconds": None, "outputs_mount_layout": None,
        **doctor.measured,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "endpoint": "local emulator" if local else (endpoint or gateway.endpoint), "local": local,
    }
    path = workspace / "doctor.json"
    path.write_text(json.dumps(measured, indent=2) + "\n")
    return {**measured, "saved_to": str(path), "ok": all(r.status != "fail" for r in doctor.rows),
            "checks": [vars(r) for r in doctor.rows]}


def print_report(result: dict, console: Console | None = None) -> None:
    out = (console or Console()).out
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("check", no_wrap=True)
    table.add_column("result", overflow="fold")
    table.add_column("what to do", overflow="fold")
    marks = {"ok": "ok", "warn": "!", "fail": "FAIL", "skip": "-"}
    for row in result["checks"]:
        table.add_row(f"{marks.get(row['status'], '')} {row['check']}", row["result"], row["todo"])
    out.print(table)
    if result.get("local"):
        use = "`launch --local` does not use it (real Kaggle runs do)"
    elif result.get("outputs_other_attach"):
        use = ("launch resumes through Kaggle's outputs (resume_via = \"auto\"), waiting at least "
               f"{result['outputs_attach_delay_seconds']}s after each version before the next push")
    else:
        use = ("launch resumes through the checkpoint dataset, letting each upload settle at least "
               f"pin_delay_seconds ({result['pin_delay_seconds']}) before the next push")
    out.print(f"Saved to {result['saved_to']}; {use}.", markup=False)
