"""Errors the CLI shows as one line: what is wrong and how to fix it."""


class KaggleRunnerError(Exception):
    """Base of every error a user can act on; the CLI prints it without a traceback."""


class NotImplementedYet(KaggleRunnerError):
    def __init__(self, command: str):
        super().__init__(f"`kaggle-runner {command}` is not implemented yet")
