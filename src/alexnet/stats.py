"""`alexnet data stats`: a dataset's per-channel mean and standard deviation, for --mean and --std."""

from __future__ import annotations

import numpy as np

from .data.folder import find_classes, scan
from .data.images import load_rgb
from .progress import Progress
from pathlib import Path


def channel_stats(root: str | Path, split: str = "train", max_images: int = 0, seed: int = 0) -> dict:
    """Mean and std of the pixel values on a [0, 1] scale, over every pixel of the (sampled) images."""
    split_dir = Path(root) / split
    samples = scan(split_dir, find_classes(split_dir))
    if max_images and len(samples) > max_images:
        pick = np.random.default_rng(seed).choice(len(samples), max_images, replace=False)
        samples = [samples[i] for i in sorted(pick)]
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    progress = Progress(len(samples), "stats", every=max(1, len(samples) // 10))
    for path, _ in samples:
        a = np.asarray(load_rgb(path), dtype=np.float64).reshape(-1, 3) / 255.0
        total += a.sum(0)
        total_sq += (a * a).sum(0)
        count += a.shape[0]
        progress.update()
    progress.close()
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0))
    return {"mean": [round(float(m), 5) for m in mean], "std": [round(float(s), 5) for s in std],
            "images": len(samples)}
