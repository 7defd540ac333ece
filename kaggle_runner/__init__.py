"""kaggle-runner: train small GPT models on Kaggle's free GPUs from a laptop."""

__version__ = "0.1.0"
