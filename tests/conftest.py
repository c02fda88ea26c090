import os
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet.data.synthetic import CLASSES, make_image


def write_folder(root: Path, classes=3, train_per_class=8, val_per_class=4, size=72, seed=0) -> Path:
    """A real JPEG ImageFolder of generated shapes: root/{train,val}/<class>/*.jpg."""
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            (root / split / CLASSES[c]).mkdir(parents=True, exist_ok=True)
        n = 0
        i = 0
        while n < per * classes:
            if i % len(CLASSES) < classes:
                img, label = make_image(seed, split, i, size)
                img.save(root / split / CLASSES[label] / f"{i:05d}.jpg", quality=95)
                n += 1
            i += 1
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("tiny"))


def run_cli(*args, timeout=300, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process; a hang fails the test through the timeout."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "alexnet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"alexnet {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


# Small and quick settings for real runs of `alexnet train` on the tiny folder.
TINY = ["--resize", "72", "--crop", "64", "--fc-width", "32", "--batch-size", "8", "--workers", "0",
        "--epochs", "1", "--quiet"]
