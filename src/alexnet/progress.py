"""Progress display: a live tqdm bar on a terminal, plain periodic lines elsewhere (CI, Slurm logs, pipes)."""

from __future__ import annotations

import os
import shutil
import sys
import time

from tqdm import tqdm


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """`update(n, loss=..., top1=...)` after each step. On a terminal the bar is redrawn in place (at most
    five times a second) with the stats, steps per second and the time left; elsewhere a line is written
    every `every` steps and at the last, with no carriage returns or escape codes."""

    def __init__(self, total: int, desc: str, *, every: int = 20, enabled: bool = True, stream=None) -> None:
        self.total, self.desc, self.every, self.enabled = total, desc, every, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.count = 0
        self.bar = None
        if enabled and self.tty:
            # A terminal that reports no size (a bare pseudo-terminal) gets $COLUMNS or 80 columns, not 0.
            sized = _columns(self.stream) > 0
            # ALEXNET_PROGRESS_INTERVAL: seconds between redraws (0: every step, as the tests use).
            interval = float(os.environ.get("ALEXNET_PROGRESS_INTERVAL", "0.2"))
            self.bar = tqdm(total=total, desc=desc, file=self.stream, unit="step", leave=False,
                            mininterval=interval, miniters=1 if interval == 0 else None,
                            dynamic_ncols=sized, ncols=None if sized else shutil.get_terminal_size().columns)

    def update(self, n: int = 1, **stats) -> None:
        self.count += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in stats.items()}, refresh=False)
            self.bar.update(n)
        elif self.count % self.every == 0 or self.count == self.total:
            self.stream.write(self._line(time.perf_counter(), stats) + "\n")
            self.stream.flush()

    def _line(self, now: float, stats: dict) -> str:
        elapsed = now - self.start
        left = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        parts = [f"{self.desc} {self.count}/{self.total}"]
        parts += [f"{k} {_fmt(v)}" for k, v in stats.items()]
        parts.append(f"{_fmt_time(elapsed)} elapsed, {_fmt_time(left)} left")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
