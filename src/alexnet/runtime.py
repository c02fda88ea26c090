"""Device choice, seeding and determinism."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} asks for CUDA, which is not available on this machine; "
                          "use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure(deterministic: bool, threads: int) -> int:
    """Set the thread count and, when asked, deterministic algorithms. Returns the thread count."""
    if deterministic:
        # Reductions split work by thread, so a fixed count is part of reproducibility.
        threads = threads or 1
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
