"""Augmentation of whole batches.

The random draws are made per image in the loader, by the same transform objects and from the same
per-sample generators as the per-image path (so a sample gets the same crop, flip, jitter factors and
colour shift either way); the loader then only slices the crop out of the stored uint8 pixels (a
random-resized crop is also resized there, by PIL as in the per-image path, still in uint8). The pixel
work (flip, colour jitter, PCA lighting, scaling and normalisation) is done on the whole batch at once:
on the GPU after the uint8 batch is copied there, or vectorised on the CPU, in the main process for a
held split (data.held) and in the loader's workers otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .held import HeldCrops
from .jpeg import JpegBatch, device_decoding_available, device_decoding_works
from .transforms import (CenterCrop, ColorJitter, Compose, Normalize, PCALighting, RandomCrop,
                         RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor, ToTensorNormalize)

JITTER_OPS = ColorJitter.OPS
# Per-image parameters: flip, the four jitter factors (hue's in steps of 1/255 turn), the jitter order (op
# codes, -1: none), the PCA shift.
FLIP, FACTORS, ORDER, SHIFT, N_PARAMS = 0, slice(1, 5), slice(5, 9), slice(9, 12), 12
_SUPPORTED = (Resize, RandomCrop, CenterCrop, RandomResizedCrop, RandomHorizontalFlip, ColorJitter, ToTensor,
              PCALighting, Normalize, ToTensorNormalize)


def supports(transform: Compose) -> bool:
    """Whether the batch path can do this transform: a plain or centre crop of the resized image or a
    random-resized crop, flips, colour jitter and PCA lighting (not rotation or test-time views)."""
    return all(isinstance(step, _SUPPORTED) for step in transform.steps)


class BatchAugment:
    """`sample(pixels, g)` in the loader: (crop as HWC uint8, already mirrored when the flip was drawn,
    parameter vector); `__call__(crops, params)` on a batch: normalised float images (B, 3, H, W) in
    channels_last layout."""

    def __init__(self, transform: Compose) -> None:
        if not supports(transform):
            raise ValueError(f"the batch path cannot do {transform}")
        self.steps = transform.steps
        self.crop = next(s for s in self.steps if isinstance(s, (RandomCrop, CenterCrop, RandomResizedCrop)))
        # a window of the stored pixels, as the paths that crop elsewhere (data.held, data.jpeg) need; a
        # random-resized crop is resized in the loader instead
        self.window = not isinstance(self.crop, RandomResizedCrop)
        norm = next(s.normalize if isinstance(s, ToTensorNormalize) else s for s in self.steps
                    if isinstance(s, (Normalize, ToTensorNormalize)))
        self.mean, self.std = norm.mean.view(1, 3, 1, 1), norm.std.view(1, 3, 1, 1)
        self.jitter = any(isinstance(s, ColorJitter) for s in self.steps)
        self.pca = any(isinstance(s, PCALighting) for s in self.steps)

    def resize(self, img) -> np.ndarray:
        """The transform's resize of a decoded image, as uint8 HWC pixels (for the JPEG path)."""
        for step in self.steps:
            if isinstance(step, Resize):
                img = step(img)
        return np.asarray(img, dtype=np.uint8)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of this size after the transform's resize."""
        for step in self.steps:
            if isinstance(step, Resize):
                width, height = step.target(width, height)
        return width, height

    def sample(self, pixels: np.ndarray, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        box, params = self._draw(*pixels.shape[:2], g)
        if self.window:
            crop = pixels[box[1]:box[3], box[0]:box[2]]
        else:  # the whole image goes to PIL: its bilinear filter reads the pixels around the box too
            crop = np.asarray(self.crop.resize(Image.fromarray(pixels), box))
        # a copy always: a crop as wide as the image is a contiguous view of the read-only memory map
        crop = torch.from_numpy(np.array(crop, order="C"))
        if params[FLIP]:  # torch's flip: ten times quicker than numpy's copy of a mirrored view of 3-byte pixels
            crop = crop.flip(1)
        return crop, params

    def draw(self, h: int, w: int, g: torch.Generator | None) -> tuple[int, int, torch.Tensor]:
        """(top, left, parameters) of the window crop of an h x w resized image."""
        if not self.window:
            raise ValueError(f"{self.crop} is not a window of the resized image")
        (left, top, _, _), params = self._draw(h, w, g)
        return top, left, params

    def _draw(self, h: int, w: int, g: torch.Generator | None) -> tuple[tuple[int, int, int, int], torch.Tensor]:
        """((left, top, right, bottom) of the crop, parameters) for an h x w resized image."""
        size = self.crop.size
        params = torch.zeros(N_PARAMS)
        params[ORDER] = -1
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        box = (left, top, left + size, top + size)
        for step in self.steps:  # the draws in the order the per-image transform makes them
            if isinstance(step, RandomCrop):
                top, left = step.draw(g, w, h)
                box = (left, top, left + size, top + size)
            elif isinstance(step, RandomResizedCrop):
                box = step.draw(g, w, h)
            elif isinstance(step, RandomHorizontalFlip):
                params[FLIP] = float(step.draw(g))
            elif isinstance(step, ColorJitter):
                for k, (name, factor) in enumerate(step.draw(g)):
                    code = JITTER_OPS.index(name)
                    if name == "hue":  # PIL turns the hue in steps of 1/255, truncated in double precision
                        factor = float(math.trunc(factor * 255))
                    params[FACTORS.start + code], params[ORDER.start + k] = factor, code
            elif isinstance(step, PCALighting):
                params[SHIFT] = step.shift(g)
        return box, params

    def __call__(self, crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """crops: (B, H, W, 3) uint8; params: (B, N_PARAMS). The float batch is made in the crops' (B, H, W, 3)
        order and returned as its (B, 3, H, W) view, which is channels_last, without a copy to change layout."""
        pixels = crops.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # worked on in place
        x = pixels.permute(0, 3, 1, 2)
        params = params.to(x.device, torch.float32)
        if self.jitter:  # on 8-bit values, as PIL
            for k in range(ORDER.stop - ORDER.start):
                codes = params[:, ORDER.start + k]
                for code, name in enumerate(JITTER_OPS):
                    idx = (codes == code).nonzero().flatten()
                    if idx.numel():
                        x[idx] = _JITTER[name](x[idx], params[idx, FACTORS.start + code].view(-1, 1, 1, 1))
        # (x / 255 + shift - mean) / std as x * scale + bias, the PCA shift (added on the [0, 1] pixels
        # before normalisation, as the per-image path) folded into each image's bias. In place on rows of
        # W x 3 values, the channels' factors repeated along a row: on a CPU that is 4 times quicker than
        # broadcasting them over the channel dimension (3.4 against 15 ms for 64 images at 224).
        mean, std = self.mean.view(1, 3).to(x.device), self.std.view(1, 3).to(x.device)
        bias = -mean / std
        if self.pca:
            bias = bias + params[:, SHIFT] / std
        b, h, w, _ = pixels.shape
        rows = pixels.view(b, h, w * 3)
        rows.mul_((1 / (255 * std)).repeat(1, w).view(1, 1, w * 3)).add_(bias.repeat(1, w).view(-1, 1, w * 3))
        return x


# The jitter operations work on 8-bit values held in floats and, like PIL's, truncate after each one, so
# that they give the per-image path's pixels (off by a level in rare rounding cases).

def _blend(base: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend: base + f * (x - base), truncated and clipped to 8 bits."""
    return torch.floor(base + f * (x - base)).clamp_(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L"): ITU-R 601-2 luma in fixed point, rounded."""
    return torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536)


def _brightness(x, f):
    return _blend(torch.zeros_like(x[:, :1]), x, f)


def _contrast(x, f):
    return _blend(torch.floor(_grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5), x, f)


def _saturation(x, f):
    return _blend(_grey(x), x, f)


def _hue(x, f):
    """Rotate the hue by f steps of 1/255 turn through PIL's 8-bit HSV, with its mix of single and double
    precision."""
    dtype, x = x.dtype, x.float()
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v, _ = x.max(dim=1)
    delta = v - x.min(dim=1).values
    grey = delta == 0
    safe = torch.where(grey, torch.ones_like(delta), delta)
    rc, gc, bc = ((v - c) / safe for c in (r, g, b))
    rc, gc, bc = rc.double(), gc.double(), bc.double()
    h = torch.where(r == v, bc - gc, torch.where(g == v, 2 + rc - bc, 4 + gc - rc)).float()
    h = torch.remainder(h.double() / 6 + 1, 1).float().double()
    h = torch.where(grey, 0, torch.floor(h * 255))
    s = torch.where(grey, 0, torch.floor((delta / torch.where(v > 0, v, torch.ones_like(v))).double() * 255))
    h = torch.remainder(h + f.view(-1, 1, 1).double(), 256)  # uint8 arithmetic wraps around
    sector = torch.floor(h * 6 / 255)
    fs = ((h * 6 / 255 - sector).float() * s.float()).double()
    v = v.double()
    p, q, t = (torch.floor(v * (1 - a / 255) + 0.5) for a in (s, fs, (s.float() - fs.float()).double()))
    sector = sector.long().remainder(6).unsqueeze(1)
    table = torch.stack([torch.stack(c, dim=1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], dim=1)
    rgb = table.gather(2, sector.unsqueeze(2).expand(-1, 3, 1, -1, -1)).squeeze(2)
    return torch.where((grey | (s == 0)).unsqueeze(1), v.unsqueeze(1).expand(-1, 3, -1, -1), rgb).to(dtype)


_JITTER = {"brightness": _brightness, "contrast": _contrast, "saturation": _saturation, "hue": _hue}


def jpeg_on_gpu(splits, device: torch.device, jpeg_decode: str, say) -> None:
    """Put ImageFolder splits on the batch path for a GPU: decoded and resized in the loader workers, the
    rest on the GPU, or (`jpeg_decode` auto or device) decoded on the GPU too (data.jpeg), when its
    decoder passes a test image. Errors for a `device` that cannot be honoured."""
    if jpeg_decode == "device" and not (device.type == "cuda" and device_decoding_available()):
        raise DataError("--jpeg-decode device needs a CUDA device and torchvision 0.20 or later; "
                        "use --jpeg-decode workers")
    if device.type != "cuda":
        return
    for dataset in splits:
        dataset.batch = BatchAugment(dataset.transform) if supports(dataset.transform) else None
    if jpeg_decode == "device" and any(dataset.batch is None or not dataset.batch.window for dataset in splits):
        raise DataError("--jpeg-decode device crops the decoded images on the GPU, which cannot rotate them, "
                        "take random-resized crops or cut test-time views; use --jpeg-decode workers")
    if jpeg_decode == "workers" or not device_decoding_available():
        return
    problem = device_decoding_works(device)
    if problem is None:
        for dataset in splits:
            dataset.decode_on_device = dataset.batch is not None and dataset.batch.window
    elif jpeg_decode == "device":
        raise DataError(f"{device} cannot decode JPEGs here ({problem}); use --jpeg-decode workers")
    else:
        say(f"WARNING: {device} cannot decode JPEGs here ({problem}); decoding them in the loader workers")


def main_process_augment(dataset, device: torch.device) -> BatchAugment | None:
    """The batch augmentation that `on_device` finishes a loader's batches with in the main process: on a
    GPU always (the workers send uint8 crops), on a CPU for a held split (data.held: the workers send only
    where its crops lie); None where the workers finish them (a CPU reading the memory map or JPEGs)."""
    batch = getattr(dataset, "batch", None)
    return batch if device.type != "cpu" or getattr(dataset, "held", False) or getattr(dataset, "decode_on_device",
                                                                                      False) else None


def on_device(batch, device: torch.device, channels_last: bool, augment: BatchAugment | None = None):
    """A loader's batch (images, targets, unreadable count) with its images and targets on the device (see
    `to_device`); JPEG files left to the device (data.jpeg) are decoded there first, and an image it finds
    unreadable is dropped and counted; crops of a split held on the device (data.held) are gathered
    there. A batch with no image is returned as it is."""
    images, target, bad = batch
    if target.numel() and isinstance(images, (tuple, list)) and isinstance(images[0], HeldCrops):
        images = (images[0].gather(device), images[1])
    if target.numel() and isinstance(images, (tuple, list)) and isinstance(images[0], JpegBatch):
        crops, keep = images[0].decode(device)
        params = images[1]
        if keep is not None:
            crops, params, target = crops[keep.to(device)], params[keep], target[keep]
            bad += int((~keep).sum())
        images = (crops, params)
    if not target.numel():
        return torch.empty(0), target, bad
    return to_device(images, device, channels_last, augment), target.to(device, non_blocking=True), bad


def to_device(images, device: torch.device, channels_last: bool, augment: BatchAugment | None = None) -> torch.Tensor:
    """A loader's images on the device, in the layout asked for; (uint8 crops, parameters) from the
    batch path are copied as uint8 (a quarter of the bytes of fp32) and finished there by `augment`."""
    if isinstance(images, (tuple, list)):
        crops, params = (t.to(device, non_blocking=True) for t in images)  # crops from data.jpeg are there already
        images = augment(crops, params)
    else:
        images = images.to(device, non_blocking=True)
        if images.dim() == 5:  # test-time views: (images, views, 3, H, W)
            images = images.flatten(0, 1)
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
