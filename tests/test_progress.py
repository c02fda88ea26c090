"""Progress: a bar redrawn in place on a terminal (a real pseudo-terminal). Plain lines in a pipe:
test_cli.py::test_train_leaves_the_run_folder."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

from conftest import TINY


def run_in_terminal(*args, timeout=120) -> str:
    """`alexnet ARGS` with stdout and stderr on a pseudo-terminal; everything it wrote, as text."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows, 160 columns
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm", "ALEXNET_PROGRESS_INTERVAL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", *map(str, args)], stdin=terminal, stdout=terminal,
                            stderr=terminal, env=env, close_fds=True)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # the terminal closed: the process has ended
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=max(deadline - time.monotonic(), 1)) == 0, b"".join(chunks).decode()[-3000:]
    finally:
        proc.kill()
        os.close(controller)
    return b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_a_bar_updated_in_place(tiny_data, tmp_path):
    # batch 2: 12 steps in the epoch, so that the bar is drawn several times
    text = run_in_terminal("train", "--data", tiny_data, "--out", tmp_path / "r", *TINY, "--no-quiet",
                           "--batch-size", "2", "--device", "cpu")
    lines = text.replace("\r\n", "\n").split("\n")
    bar_lines = [line for line in lines if "epoch 1/1:" in line and "step" in line]
    assert bar_lines, text[-2000:]
    # one terminal line, redrawn: its states are separated by carriage returns, the count goes up
    states = [s for s in bar_lines[0].split("\r") if "epoch 1/1:" in s]
    counts = [int(m) for s in states for m in re.findall(r"(\d+)/12 \[", s)]
    assert counts == list(range(13)), states  # drawn at the start and after every step (interval 0)
    assert "train loss" in states[-1]  # the bar was cleared and the epoch's line written over it
    assert any("loss=" in s and "top1=" in s and "img_s=" in s for s in states)
    assert any("<" in s and ("step/s" in s or "s/step" in s) for s in states)  # elapsed<left and the rate

