"""The background emulator that --local starts for a workspace."""

from kaggle_runner.errors import NotImplementedYet


def stop_background_emulator(*_args, **_kwargs):
    raise NotImplementedYet("emulator stop")
