"""Shared test set-up: small tensors run fastest (and most predictably) on one thread."""

import os

import torch

os.environ.setdefault("MUJOCO_GL", "egl")
torch.set_num_threads(1)
