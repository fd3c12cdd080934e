"""mbrl: model-based reinforcement learning and planning in PyTorch."""

__version__ = "0.1.0"
