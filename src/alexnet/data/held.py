"""Packed splits held in GPU memory: the loader then moves no pixels at all.

A packed split that fits (by default, when the whole dataset takes at most half of the GPU's free
memory) is copied to the GPU once. The loader workers still draw every image's crop, flip and colour
parameters from its own generator, exactly as on the other paths, but hand over only where each crop
lies; the crops are then gathered on the GPU from the held pixels, a batch at a time, and the batch
augmentation (data.batch) finishes them. This takes the copies that bound the packed path on a fast GPU
(a batch's crops written to shared memory by a worker, copied to pinned memory, then to the GPU) out of
every step.
"""

from __future__ import annotations

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
    map."""
    key = _key(pixels_file, device)
    if key in _HELD:
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
        where = self.where.to(device, non_blocking=True)
        flips = self.flips.to(device, non_blocking=True)
        first, width, top, left = (where[:, k].view(-1, 1, 1) for k in range(4))
        step = torch.arange(self.size, device=device)
        rows = (top + step.view(1, -1, 1)) * width
        cols = left + torch.where(flips.view(-1, 1, 1), self.size - 1 - step.view(1, 1, -1), step.view(1, 1, -1))
        return pixels[first + rows + cols]
