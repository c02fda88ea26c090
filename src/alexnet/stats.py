"""`alexnet data stats`: a dataset's per-channel mean and standard deviation (for --mean and --std) and the
principal components of its RGB pixels (for --pca-eigval and --pca-eigvec)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import packed
from .data.folder import find_classes, not_a_data_folder, scan
from .data.images import DECODE_ERRORS, load_rgb, reason
from .errors import DataError
from .progress import Progress


def split_to_measure(folder: str | Path, split: str | None) -> tuple[Path, str]:
    """The (root, split) that `alexnet data stats DIR [--split NAME]` measures: DIR/NAME (default train),
    or DIR itself where DIR is a split folder (its class folders hold the images) and no --split is given."""
    root = Path(folder)
    if not root.is_dir():
        raise not_a_data_folder(root)
    if packed.is_packed(root):
        raise DataError(f"{root} is a packed dataset: data stats measures the images themselves; give the image "
                        f"folder it was packed from")
    if (root / (split or "train")).is_dir():
        return root, split or "train"
    folders = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
    if split is not None:
        raise DataError(f"{root} has no split folder {split!r} (its folders: {', '.join(folders) or 'none'}); give "
                        f"one of them with --split")
    return root.parent, root.name  # a split folder given itself


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
    unreadable = []
    for path, _ in samples:
        try:
            image = load_rgb(path)
        except DECODE_ERRORS as e:
            unreadable.append((path, reason(e)))
            progress.update()
            continue
        a = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        total += a.sum(0)
        total_outer += a.T @ a
        count += a.shape[0]
        progress.update()
    progress.close()
    if not count:
        raise DataError(f"{split_dir}: none of its {len(samples)} image files could be read"
                        + (f" (the first: {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""))
    mean = total / count
    cov = total_outer / count - np.outer(mean, mean)
    std = np.sqrt(np.maximum(np.diag(cov), 0))
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.maximum(eigval[order], 0), eigvec[:, order]
    eigvec *= np.where(eigvec.sum(axis=0) < 0, -1.0, 1.0)  # a sign per vector, so the output is stable
    return {"mean": [round(float(m), 5) for m in mean], "std": [round(float(s), 5) for s in std],
            "eigval": [round(float(v), 6) for v in eigval],
            "eigvec": [round(float(v), 5) for v in eigvec.ravel()], "images": len(samples) - len(unreadable),
            "unreadable": unreadable}
