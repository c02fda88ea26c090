"""Progress display: a line updated in place on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, desc: str, *, every: int = 20, enabled: bool = True, stream=None) -> None:
        self.total, self.desc, self.every, self.enabled = total, desc, every, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.count = 0
        self._last_draw = 0.0

    def update(self, n: int = 1, **stats) -> None:
        self.count += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw < 0.2 and self.count < self.total:
                return
            self._last_draw = now
            self.stream.write("\r\x1b[K" + self._line(now, stats))
        elif self.count % self.every == 0 or self.count == self.total:
            self.stream.write(self._line(now, stats) + "\n")
        self.stream.flush()

    def _line(self, now: float, stats: dict) -> str:
        elapsed = now - self.start
        left = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        parts = [f"{self.desc} {self.count}/{self.total}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()]
        parts.append(f"{_fmt_time(elapsed)} elapsed, {_fmt_time(left)} left")
        return " | ".join(parts)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
