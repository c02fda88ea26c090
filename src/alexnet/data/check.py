"""`alexnet data check DIR`: decode every image of a dataset and list the ones that cannot be used."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .folder import find_classes, scan
from .images import DECODE_ERRORS, is_image_name, load_rgb


def problems_of_layout(root: Path) -> list[str]:
    """What would stop training at start: missing splits, empty class folders, classes only in val."""
    found = []
    classes = {}
    for split in ("train", "val"):
        try:
            classes[split] = find_classes(root / split)
            scan(root / split, classes[split])
        except DataError as e:
            found.append(str(e))
    if "train" in classes and "val" in classes:
        missing = sorted(set(classes["val"]) - set(classes["train"]))
        if missing:
            found.append(f"{root / 'val'} has classes that {root / 'train'} lacks: {', '.join(missing[:5])}")
    return found


def image_files(root: Path) -> list[Path]:
    return sorted(Path(d) / f for d, _, files in os.walk(root, followlinks=True) for f in files if is_image_name(f))


def unreadable(paths: list[Path], progress=None) -> list[tuple[Path, str]]:
    """(path, reason) for each file that does not decode fully into an RGB image."""
    bad = []
    for path in paths:
        try:
            load_rgb(path)
        except DECODE_ERRORS as e:
            bad.append((path, str(e) or type(e).__name__))
        if progress is not None:
            progress.update(bad=len(bad))
    if progress is not None:
        progress.close()
    return bad
