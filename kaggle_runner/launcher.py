"""Runs, chains and their commands (launch, watch, resume, status, fetch, logs, cancel, quota)."""

from kaggle_runner.errors import NotImplementedYet


def launch(*_args, **_kwargs):
    raise NotImplementedYet("launch")


def watch_run(*_args, **_kwargs):
    raise NotImplementedYet("watch")


def resume_run(*_args, **_kwargs):
    raise NotImplementedYet("resume")


def run_status(*_args, **_kwargs):
    raise NotImplementedYet("status")


def fetch_run(*_args, **_kwargs):
    raise NotImplementedYet("fetch")


def print_logs(*_args, **_kwargs):
    raise NotImplementedYet("logs")


def cancel_run(*_args, **_kwargs):
    raise NotImplementedYet("cancel")


def quota_summary(*_args, **_kwargs):
    raise NotImplementedYet("quota")
