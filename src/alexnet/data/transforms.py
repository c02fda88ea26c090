"""Augmentation whose random draws come from an explicit generator.

Each sample's generator is seeded from (seed, epoch, index) alone, so the draws do not depend on the
number of loader workers or on which worker loads the sample.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .images import MAX_PIXELS, TooLarge


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


class Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, img, g: torch.Generator | None = None):
        for step in self.steps:
            img = step(img, g)
        return img

    def at_epoch(self, epoch: int) -> None:
        """Sets the steps whose settings follow the epoch (a progressive random-resized crop's size); the
        datasets call it with each sample's epoch, in whatever process loads the sample."""
        for step in self.steps:
            if hasattr(step, "at_epoch"):
                step.at_epoch(epoch)

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(s) for s in self.steps) + ")"


class Resize:
    """An int: the shorter side to that size, keeping the aspect ratio; (h, w): exactly that size."""

    def __init__(self, size):
        self.size = size

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing an image of this size."""
        if isinstance(self.size, int):
            s = self.size / min(width, height)
            return max(self.size, round(width * s)), max(self.size, round(height * s))
        return self.size[1], self.size[0]

    def __call__(self, img: Image.Image, g=None) -> Image.Image:
        target = self.target(*img.size)
        if target == img.size:
            return img
        if target[0] * target[1] > MAX_PIXELS:  # 60000x1 resized to 256 on its shorter side: 4 billion pixels
            raise TooLarge(f"{img.size[0]}x{img.size[1]} resized to {self.size} would be {target[0]}x{target[1]}, "
                           f"more than the {MAX_PIXELS / 1e6:.0f} million pixels one image may have "
                           f"(ALEXNET_MAX_IMAGE_PIXELS raises the limit)")
        return img.resize(target, Image.BILINEAR, reducing_gap=None)

    def __repr__(self):
        return f"Resize({self.size})"


class RandomCrop:
    def __init__(self, size: int):
        self.size = size

    def draw(self, g: torch.Generator, width: int, height: int) -> tuple[int, int]:
        """(top, left) of the crop."""
        top = int(torch.randint(0, height - self.size + 1, (), generator=g))
        left = int(torch.randint(0, width - self.size + 1, (), generator=g))
        return top, left

    def __call__(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        top, left = self.draw(g, *img.size)
        return img.crop((left, top, left + self.size, top + self.size))

    def __repr__(self):
        return f"RandomCrop({self.size})"


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image, g=None) -> Image.Image:
        w, h = img.size
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))

    def __repr__(self):
        return f"CenterCrop({self.size})"


class RandomResizedCrop:
    """torchvision's RandomResizedCrop (scale (s, 1), ratio (3/4, 4/3)), drawing from the generator. With
    `sizes` (one output size per epoch, see train_crop_sizes), `at_epoch(e)` sets the size to epoch e's."""

    def __init__(self, size: int, min_scale: float = 0.08, ratio=(3 / 4, 4 / 3), sizes: list[int] | None = None):
        self.size, self.min_scale, self.ratio = size, min_scale, ratio
        self.sizes = list(sizes) if sizes else None

    def at_epoch(self, epoch: int) -> None:
        if self.sizes:
            self.size = self.sizes[min(epoch, len(self.sizes) - 1)]

    def draw(self, g: torch.Generator, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the region of a width x height image that is resized."""
        w, h = width, height
        area = w * h
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(g, self.min_scale, 1.0)
            aspect = math.exp(_uniform(g, *log_r))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=g))
                left = int(torch.randint(0, w - cw + 1, (), generator=g))
                break
        else:  # fall back to a centre crop of the allowed aspect ratio
            in_ratio = w / h
            cw, ch = (w, int(round(w / self.ratio[0]))) if in_ratio < self.ratio[0] else (
                (int(round(h * self.ratio[1])), h) if in_ratio > self.ratio[1] else (w, h))
            top, left = (h - ch) // 2, (w - cw) // 2
        return left, top, left + cw, top + ch

    def resize(self, img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        return img.resize((self.size, self.size), Image.BILINEAR, box=box)

    def __call__(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        return self.resize(img, self.draw(g, *img.size))

    def __repr__(self):
        return f"RandomResizedCrop({self.size}, min_scale={self.min_scale})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def draw(self, g: torch.Generator) -> bool:
        return torch.rand((), generator=g).item() < self.p

    def __call__(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        return img.transpose(Image.FLIP_LEFT_RIGHT) if self.draw(g) else img

    def __repr__(self):
        return f"RandomHorizontalFlip({self.p})"


class ColorJitter:
    """Brightness, contrast, saturation and hue, applied in a random order, factors from the generator."""

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        self.b, self.c, self.s, self.h = brightness, contrast, saturation, hue

    OPS = ("brightness", "contrast", "saturation", "hue")

    def draw(self, g: torch.Generator) -> list[tuple[str, float]]:
        """(operation, factor) pairs in the order they are applied."""
        ops = []
        if self.b:
            ops.append(("brightness", _uniform(g, max(0.0, 1 - self.b), 1 + self.b)))
        if self.c:
            ops.append(("contrast", _uniform(g, max(0.0, 1 - self.c), 1 + self.c)))
        if self.s:
            ops.append(("saturation", _uniform(g, max(0.0, 1 - self.s), 1 + self.s)))
        if self.h:
            ops.append(("hue", _uniform(g, -self.h, self.h)))
        return [ops[i] for i in torch.randperm(len(ops), generator=g).tolist()]

    def __call__(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        import torchvision.transforms.functional as F  # here, not at the top: importing torchvision costs seconds
        for name, factor in self.draw(g):
            img = getattr(F, f"adjust_{name}")(img, factor)
        return img

    def __repr__(self):
        return f"ColorJitter(b={self.b}, c={self.c}, s={self.s}, h={self.h})"


class RandomRotation:
    def __init__(self, degrees: float):
        self.degrees = degrees

    def __call__(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        return img.rotate(_uniform(g, -self.degrees, self.degrees), resample=Image.BILINEAR)

    def __repr__(self):
        return f"RandomRotation({self.degrees})"


class ToTensor:
    """uint8 HWC image -> float CHW tensor on a [0, 1] scale."""

    def __call__(self, img: Image.Image, g=None) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)

    def __repr__(self):
        return "ToTensor()"


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x: torch.Tensor, g=None) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __repr__(self):
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class ToTensorNormalize:
    """uint8 HWC image -> float CHW tensor, (x/255 - mean) / std."""

    def __init__(self, mean, std):
        self.to_tensor, self.normalize = ToTensor(), Normalize(mean, std)

    def __call__(self, img: Image.Image, g=None) -> torch.Tensor:
        return self.normalize(self.to_tensor(img))

    def __repr__(self):
        return f"ToTensorNormalize({self.normalize!r})"


class PCALighting:
    """The paper's colour augmentation (section 4.1) on a [0, 1] tensor: draw alpha_i ~ N(0, std) once per
    image and add the same shift, sum_i alpha_i * eigval_i * eigvec_i, to every pixel."""

    def __init__(self, std: float, eigval, eigvec):
        self.std = std
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32).view(3, 3)  # columns are the eigenvectors

    def shift(self, g: torch.Generator) -> torch.Tensor:
        alpha = torch.randn(3, generator=g) * self.std
        return self.eigvec @ (alpha * self.eigval)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return x + self.shift(g).view(3, 1, 1)

    def __repr__(self):
        return f"PCALighting({self.std}, eigval={self.eigval.tolist()})"


def ten_crop_boxes(width: int, height: int, size: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the four corner crops and the centre crop, in that order."""
    right, bottom = width - size, height - size
    centre = (int(round(right / 2.0)), int(round(bottom / 2.0)))
    corners = [(0, 0), (right, 0), (0, bottom), (right, bottom), centre]
    return [(x, y, x + size, y + size) for x, y in corners]


class TTAViews:
    """Test-time views of one image, stacked as a (views, 3, size, size) tensor: `flip`, the centre crop
    and its mirror; `10crop`, the four corners and the centre of the resized image, then their mirrors."""

    def __init__(self, mode: str, size: int, mean, std):
        self.mode, self.size, self.finish = mode, size, ToTensorNormalize(mean, std)

    def __call__(self, img: Image.Image, g=None) -> torch.Tensor:
        w, h = img.size
        boxes = ten_crop_boxes(w, h, self.size) if self.mode == "10crop" else ten_crop_boxes(w, h, self.size)[4:]
        crops = [img.crop(box) for box in boxes]
        crops += [c.transpose(Image.FLIP_LEFT_RIGHT) for c in crops]
        return torch.stack([self.finish(c) for c in crops])

    def __repr__(self):
        return f"TTAViews({self.mode}, {self.size})"


def crop_schedule(crop: int, epochs: int, progressive_crop: int = 0, progressive_start: int = 1,
                  progressive_end: int = 0) -> list[int]:
    """The training crop of each epoch (0-based): `crop` throughout, or with a progressive crop P, P up to
    epoch `progressive_start` (1-based), `crop` from epoch `progressive_end` (0: the last), and between
    them a linear growth rounded to a multiple of 32 (as FFCV's progressive resizing does), so that a run
    meets only a few sizes. Early epochs on smaller crops cost less; the last ones train at `crop`, the
    size the model is evaluated and exported at."""
    if not progressive_crop:
        return [crop] * epochs
    low, high = progressive_crop, crop
    start, end = progressive_start, progressive_end or epochs
    sizes = []
    for epoch in range(1, epochs + 1):
        t = min(max((epoch - start) / (end - start), 0.0), 1.0)
        sizes.append(high if t == 1.0 else min(max(int(round((low + t * (high - low)) / 32)) * 32, low), high))
    return sizes


def train_transform(resize: str, crop: int, *, mean, std, random_resized_crop: bool = False,
                    rrc_min_scale: float = 0.08, crop_sizes: list[int] | None = None, hflip: float = 0.5,
                    brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                    rotation: float = 0.0, pca_lighting: float = 0.0, pca_eigval=(), pca_eigvec=()) -> Compose:
    """The training augmentation: resize and random crop, or a random-resized crop (of the sizes
    `crop_sizes` gives each epoch, for progressive resizing), then flip, colour jitter, rotation, the
    paper's PCA lighting and normalisation, each only when asked for."""
    steps = []
    if random_resized_crop:
        steps.append(RandomResizedCrop(crop, rrc_min_scale, sizes=crop_sizes))
    else:
        steps += [Resize(parse_resize(resize)), RandomCrop(crop)]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    if brightness or contrast or saturation or hue:
        steps.append(ColorJitter(brightness, contrast, saturation, hue))
    if rotation > 0:
        steps.append(RandomRotation(rotation))
    if pca_lighting > 0:  # on the [0, 1] pixels, before normalisation, as in the paper
        steps += [ToTensor(), PCALighting(pca_lighting, pca_eigval, pca_eigvec), Normalize(mean, std)]
    else:
        steps.append(ToTensorNormalize(mean, std))
    return Compose(steps)


def eval_transform(resize: str, crop: int, mean, std, tta: str = "none") -> Compose:
    """The centre crop of the resized image (one tensor per image), or with `tta` flip/10crop a stack of
    views per image (see TTAViews)."""
    if tta == "none":
        return Compose([Resize(parse_resize(resize)), CenterCrop(crop), ToTensorNormalize(mean, std)])
    return Compose([Resize(parse_resize(resize)), TTAViews(tta, crop, mean, std)])


def parse_resize(text: str) -> tuple[int, int] | int:
    """'256' -> 256 (shorter side), '256x320' -> (256, 320) as (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not m:
        raise ConfigError(f"--resize: {text!r} is not N or WxH (for example 256 or 256x256)")
    if int(m.group(1)) < 1 or m.group(2) is not None and int(m.group(2)) < 1:
        raise ConfigError(f"--resize: {text!r}: a size must be at least 1 pixel")
    if m.group(2) is None:
        return int(m.group(1))
    w, h = int(m.group(1)), int(m.group(2))
    return (h, w)
