"""A local Kaggle API that the unmodified official client drives, and that really runs kernels.

routes (server.py) -> handlers (handlers.py) -> backend state and rules (state.py, runner.py) -> errors.
"""
