"""Logging around the loop: timestamped, rank-tagged lines (also kept in the run folder), TensorBoard
scalars, and the table of epochs printed at the end of a run."""

from __future__ import annotations

import logging
import sys
from logging.handlers import MemoryHandler
from pathlib import Path

FORMAT = "%(asctime)s{tag} %(message)s"


def setup(rank: str | None) -> logging.Logger:
    """Lines on stdout as `HH:MM:SS [rank R] message`; the rank tag only when there are several processes."""
    tag = f" [rank {rank}]" if rank is not None else ""
    logging.basicConfig(level=logging.INFO, format=FORMAT.format(tag=tag), datefmt="%H:%M:%S", stream=sys.stdout)
    logger = logging.getLogger("alexnet")
    # its own level: where the root logger was set up before (a host program, a test runner) basicConfig
    # changes nothing, and the root's level would otherwise keep the run's lines out of train.log
    logger.setLevel(logging.INFO)
    return logger


def hold_early() -> MemoryHandler:
    """Keep the lines logged from now on until `to_file(path, early=...)` writes them, with their own
    times, into the file: the warnings said before a run folder exists belong in its log too."""
    handler = MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    logging.getLogger("alexnet").addHandler(handler)
    return handler


def drop_early(handler: MemoryHandler) -> None:
    """Stop keeping lines (those kept and not yet written are dropped)."""
    logging.getLogger("alexnet").removeHandler(handler)
    handler.setTarget(None)
    handler.close()


class _FileHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        """A line that cannot be written (a full disk) is dropped without logging's traceback: the log also
        goes to the terminal, and the run's own writes (train.hooks.written) stop it with one message."""


def to_file(path: Path, early: MemoryHandler | None = None) -> logging.Handler:
    """Also write the log to `path` (appending: a resumed run continues its log), with full dates; first
    the lines kept by `early` (hold_early), which stops keeping them."""
    handler = _FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT.format(tag=""), datefmt="%Y-%m-%d %H:%M:%S"))
    if early is not None:
        early.setTarget(handler)
        early.flush()
        drop_early(early)
    logging.getLogger("alexnet").addHandler(handler)
    return handler


def close_file(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("alexnet").removeHandler(handler)
        handler.close()


def tensorboard_missing() -> str | None:
    """Why --tensorboard cannot work here, or None."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        return f"--tensorboard needs the tensorboard package ({e}): pip install 'alexnet[tensorboard]'"
    return None


class Scalars:
    """TensorBoard event files under `folder`, or nothing when `folder` is None."""

    def __init__(self, folder: Path | None) -> None:
        self.writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(folder))

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


COLUMNS = [("epoch", "epoch", "{:d}"), ("train loss", "train_loss", "{:.4f}"), ("val loss", "val_loss", "{:.4f}"),
           ("top-1", "val_acc1", "{:.2%}"), ("top-5", "val_acc5", "{:.2%}"), ("lr", "lr", "{:.3g}"),
           ("img/s", "images_per_sec", "{:.0f}"), ("seconds", "epoch_seconds", "{:.1f}")]


def by_epoch(history: list[dict]) -> list[dict]:
    """metrics.jsonl's records in epoch order, one per epoch: a resumed run may have written an epoch twice,
    and its last record counts."""
    last = {m["epoch"]: m for m in history}
    return [last[e] for e in sorted(last)]


def validated(history: list[dict]) -> list[dict]:
    """The epochs that were validated (all but those skipped by --val-every)."""
    return [m for m in history if "val_acc1" in m]


def summary_table(history: list[dict]) -> str:
    """A text table of the epochs (the last entry of each epoch number), the best top-1 marked with *; an
    epoch that was not validated (--val-every) shows - for the validation columns."""
    rows = by_epoch(history)
    if not rows:
        return ""
    scored = validated(rows)
    best = max(scored, key=lambda m: m["val_acc1"])["epoch"] if scored else None
    cells = [[(fmt.format(m[key]) if key in m else "-")
              + ("*" if key == "val_acc1" and m["epoch"] == best else " " if key == "val_acc1" else "")
              for _, key, fmt in COLUMNS] for m in rows]
    head = [title for title, _, _ in COLUMNS]
    widths = [max(len(head[i]), *(len(r[i]) for r in cells)) for i in range(len(head))]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, cells)])
