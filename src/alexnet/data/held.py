"""Packed splits held in the device's memory: the loader then moves no pixels at all.

On a GPU, a packed split that fits (by default, when the whole dataset takes at most half of the GPU's
free memory) is copied there once. On a CPU the split is not copied: the main process reads the crops
straight from the file's read-only memory map (which the page cache keeps in memory between epochs when
it fits, as for the workers that would read it otherwise). The loader workers still draw every image's
crop, flip and colour parameters from its own generator, exactly as on the other paths, but hand over
only where each crop lies; the crops are then gathered from the held pixels, a batch at a time, and the
batch augmentation (data.batch) finishes them. This takes the copies that bound the
packed path out of every step: on a fast GPU a batch's crops written to shared memory by a worker, copied
to pinned memory, then to the GPU; on a CPU the same shared memory, faulted in page by page by the main
process, and the workers' pixel work competing with the training step for the cores.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

# (pixels file, device) -> the file's pixels on that device, (pixels, 3) uint8; emptied by release() at the
# end of every training run and bench, so a pack rebuilt at the same path is never served stale
_HELD: dict[tuple[str, str], torch.Tensor] = {}
CHUNK = 1 << 28  # bytes copied at a time: the host never holds more than this of a split


def _key(pixels_file, device: torch.device) -> tuple[str, str]:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(pixels_file), str(device)


def hold(pixels_file: Path, device: torch.device) -> None:
    """Copy a split's pixels to `device` (once per process and file), a chunk at a time from its memory
    map; on a CPU, map the file."""
    key = _key(pixels_file, device)
    if key in _HELD:
        return
    if device.type == "cpu":  # the memory map itself, read-only: crops are copied out of it, nothing writes
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            _HELD[key] = torch.from_numpy(np.memmap(pixels_file, dtype=np.uint8, mode="r")).view(-1, 3)
        return
    source = np.memmap(pixels_file, dtype=np.uint8, mode="r")
    held = torch.empty(len(source), dtype=torch.uint8, device=device)
    for start in range(0, len(source), CHUNK):
        held[start:start + CHUNK].copy_(torch.from_numpy(np.array(source[start:start + CHUNK])))
    del source
    _HELD[key] = held.view(-1, 3)


def release() -> None:
    """Forget every held split (their memory is freed with the last batch that uses them)."""
    _HELD.clear()


class Slot(NamedTuple):
    """Where one crop lies: its split's pixels file, and (first pixel of the image, image width, top,
    left) in it."""
    pixels_file: str
    where: torch.Tensor


class HeldCrops:
    """A batch's crops as places in a held split; `gather(device)` gives them as (B, S, S, 3) uint8 on
    the device, mirrored where the flip was drawn, the same pixels the workers would have cropped."""

    def __init__(self, slots: list[Slot], flips: torch.Tensor, size: int) -> None:
        self.pixels_file, self.size = slots[0].pixels_file, size
        self.where = torch.stack([s.where for s in slots])
        self.flips = flips.bool()

    def pin_memory(self) -> "HeldCrops":  # the loader's pinning calls this: the places cross asynchronously
        self.where, self.flips = self.where.pin_memory(), self.flips.pin_memory()
        return self

    def gather(self, device: torch.device) -> torch.Tensor:
        pixels = _HELD.get(_key(self.pixels_file, device))
        if pixels is None:
            raise RuntimeError(f"{self.pixels_file} is not held on {device}")
        # on a CPU a copy of each crop's window is ten times quicker than the indexed gather (1 against 11 ms
        # for 64 crops of 224); on a GPU one indexed gather beats a kernel launch per image
        return self.windows(pixels) if device.type == "cpu" else self.indexed(pixels, device)

    def windows(self, pixels: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(self.where), self.size, self.size, 3, dtype=torch.uint8)
        for i, ((first, width, top, left), flip) in enumerate(zip(self.where.tolist(), self.flips.tolist())):
            start = first + top * width
            window = pixels[start:start + self.size * width].view(self.size, width, 3)[:, left:left + self.size]
            out[i] = window.flip(1) if flip else window
        return out

    def indexed(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        where = self.where.to(device, non_blocking=True)
        flips = self.flips.to(device, non_blocking=True)
        first, width, top, left = (where[:, k].view(-1, 1, 1) for k in range(4))
        step = torch.arange(self.size, device=device)
        rows = (top + step.view(1, -1, 1)) * width
        cols = left + torch.where(flips.view(-1, 1, 1), self.size - 1 - step.view(1, 1, -1), step.view(1, 1, -1))
        return pixels[first + rows + cols]
