"""Errors the CLI shows as one line: what is wrong and how to fix it."""


class KaggleRunnerError(Exception):
    """Base of every error a user can act on; the CLI prints it without a traceback."""
