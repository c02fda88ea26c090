"""`alexnet data stats`: a dataset's per-channel mean and standard deviation (for --mean and --std) and the
principal components of its RGB pixels (for --pca-eigval and --pca-eigvec)."""

from __future__ import annotations

import numpy as np

from .data.folder import find_classes, scan
from .data.images import load_rgb
from .progress import Progress
from pathlib import Path


def channel_stats(root: str | Path, split: str = "train", max_images: int = 0, seed: int = 0) -> dict:
    """Mean and std of the pixel values on a [0, 1] scale, over every pixel of the (sampled) images, and
    the eigenvalues (descending) and eigenvectors (the columns of `eigvec`, given row by row) of their
    3 x 3 covariance."""
    split_dir = Path(root) / split
    samples = scan(split_dir, find_classes(split_dir))
    if max_images and len(samples) > max_images:
        pick = np.random.default_rng(seed).choice(len(samples), max_images, replace=False)
        samples = [samples[i] for i in sorted(pick)]
    total = np.zeros(3)
    total_outer = np.zeros((3, 3))
    count = 0
    progress = Progress(len(samples), "stats", every=max(1, len(samples) // 10))
    for path, _ in samples:
        a = np.asarray(load_rgb(path), dtype=np.float64).reshape(-1, 3) / 255.0
        total += a.sum(0)
        total_outer += a.T @ a
        count += a.shape[0]
        progress.update()
    progress.close()
    mean = total / count
    cov = total_outer / count - np.outer(mean, mean)
    std = np.sqrt(np.maximum(np.diag(cov), 0))
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.maximum(eigval[order], 0), eigvec[:, order]
    eigvec *= np.where(eigvec.sum(axis=0) < 0, -1.0, 1.0)  # a sign per vector, so the output is stable
    return {"mean": [round(float(m), 5) for m in mean], "std": [round(float(s), 5) for s in std],
            "eigval": [round(float(v), 6) for v in eigval],
            "eigvec": [round(float(v), 5) for v in eigvec.ravel()], "images": len(samples)}
