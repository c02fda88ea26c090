"""`alexnet data check DIR`: decode every image of a dataset and list the ones that cannot be used."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..errors import DataError
from .folder import check_val_classes, extension_of, find_classes, held_out, scan, val_dir_of
from .images import DECODE_ERRORS, is_image_name, load_rgb, reason


def problems_of_layout(root: Path, val_dir: str | None = None, val_fraction: float = 0.0,
                       split_seed: int = 0) -> list[str]:
    """What would stop training at start: missing splits, empty class folders, classes only in the validation
    split (folder.val_dir_of's; with `val_fraction`, the share of folder.pool_dir's classes that
    `split_seed` holds out)."""
    found = []
    classes = {}
    if val_fraction:
        try:
            held_out(root, val_fraction, split_seed)
        except DataError as e:
            found.append(str(e))
        return found
    try:
        val = val_dir_of(root, val_dir)
    except DataError as e:
        found.append(str(e))
        val = None
    for split in ("train", val):
        if split is None:
            continue
        try:
            classes[split] = find_classes(root / split)
            scan(root / split, classes[split])
        except DataError as e:
            found.append(str(e))
    if "train" in classes and val in classes:
        try:
            check_val_classes(root, val, classes["train"])
        except DataError as e:
            found.append(str(e))
    return found


def image_files(root: Path) -> tuple[list[Path], Counter]:
    """The image files under `root` (sorted), and how many other files each extension names (hidden files
    and folders aside): files that training leaves out, which a folder of .heic or .avif photos would lose."""
    images, others = [], Counter()
    for d, _, files in os.walk(root, followlinks=True):
        hidden = any(part.startswith(".") for part in Path(d).relative_to(root).parts)
        for f in files:
            if is_image_name(f):
                images.append(Path(d) / f)
            elif not (hidden or f.startswith(".")):
                others[extension_of(f)] += 1
    return sorted(images), others


def unreadable(paths: list[Path], progress=None) -> list[tuple[Path, str]]:
    """(path, reason) for each file that does not decode fully into an RGB image."""
    bad = []
    for path in paths:
        try:
            load_rgb(path)
        except DECODE_ERRORS as e:
            bad.append((path, reason(e)))
        if progress is not None:
            progress.update(bad=len(bad))
    if progress is not None:
        progress.close()
    return bad
