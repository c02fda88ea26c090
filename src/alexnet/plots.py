"""Figures: training curves of one or more runs (`alexnet plot`) and confusion matrices (`alexnet eval
--confusion`). Built on matplotlib's Figure without pyplot, so no display or GUI backend is involved."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .checkpoint import atomic_path
from .errors import ConfigError
from .logs import by_epoch

PANELS = [("train loss", "train_loss"), ("val loss", "val_loss"), ("val top-1", "val_acc1"),
          ("val top-5", "val_acc5"), ("learning rate", "lr"), ("images / s (training)", "images_per_sec")]


def matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "drawing figures needs matplotlib: pip install 'alexnet[plot]'"
    return None


def _need_matplotlib() -> None:
    missing = matplotlib_missing()
    if missing:
        raise ConfigError(missing)


def load_runs(folders) -> list[tuple[str, list[dict]]]:
    """(name, epochs) of each run folder, from its metrics.jsonl; the name is the folder's, or its path when
    two folders share a name. A resumed run that repeated an epoch keeps the epoch's last line."""
    paths = [Path(f).parent if Path(f).name == "metrics.jsonl" and Path(f).is_file() else Path(f) for f in folders]
    names = [p.resolve().name for p in paths]
    runs = []
    for p, name in zip(paths, names):
        metrics = p / "metrics.jsonl"
        if not p.exists():
            raise ConfigError(f"{p} does not exist (give the run folders of alexnet train, the --out folders)")
        if not metrics.is_file():
            raise ConfigError(f"{p} has no metrics.jsonl (give the run folders of alexnet train, the --out folders)")
        history = []
        text = metrics.read_text()
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                m = json.loads(line)
                history.append({**m, "epoch": int(m["epoch"])})
            except (ValueError, KeyError, TypeError):
                if n == len(lines) and not text.endswith("\n"):  # a line being written, or cut by a crash
                    print(f"{metrics}: its last line is cut short, left out", file=sys.stderr)
                    continue
                raise ConfigError(f"{metrics} line {n} is not a metrics record") from None
        if not history:
            raise ConfigError(f"{metrics} has no finished epoch yet")
        runs.append((name if names.count(name) == 1 else str(p), by_epoch(history)))
    return runs


def training_curves(runs: list[tuple[str, list[dict]]]):
    """One panel per metric against the epoch; one line per run on every panel; a legend of run names."""
    _need_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (title, key) in zip(axes, PANELS):
        for name, epochs in runs:
            epochs = [m for m in epochs if key in m]  # a line through the validated epochs (--val-every)
            ax.plot([m["epoch"] for m in epochs], [m[key] for m in epochs], marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key in ("val_acc1", "val_acc5"):
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if runs and all(m.get("lr", 0) > 0 for _, epochs in runs for m in epochs):
        axes[4].set_yscale("log")
    # The lines and names given explicitly: matplotlib would drop labels that start with "_".
    fig.legend(axes[0].get_lines(), [name for name, _ in runs], loc="outside upper center",
               ncols=max(min(len(runs), 4), 1), title="run")
    return fig


def confusion_figure(matrix, classes: list[str], title: str = ""):
    """Rows: true class; columns: predicted class; each cell the count, shaded by the row's share."""
    _need_matplotlib()
    from matplotlib.figure import Figure
    import numpy as np
    counts = np.asarray(matrix, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(max(5.0, 0.45 * n + 2.5), 40.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, shrink=0.6, label="share of the true class")
    return fig


def png_target_problem(path) -> str | None:
    """Why a figure cannot be written to `path`, or None."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder: give a file name ending in .png"
    if path.suffix.lower() != ".png":
        return f"{path}: figures are written as PNG; give a file name ending in .png"
    if not path.parent.is_dir():
        return f"{path}: the folder {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"{path}: no permission to write in {path.parent}"
    return None


def save(fig, path) -> Path:
    """Write the figure as PNG through a temporary file, so a failed write leaves no half image."""
    path = Path(path)
    problem = png_target_problem(path)
    if problem:
        raise ConfigError(problem)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
