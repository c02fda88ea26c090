"""The built-in generated dataset: coloured shapes on varied backgrounds.

Each class is a shape; its colours, size, position, rotation, texture and background are drawn at
random, so neither colour statistics nor a blurred thumbnail tell the classes apart, but a small
convolutional network does. Every image is a pure function of (seed, split, index), and the set is
written once as a JPEG ImageFolder into a cache folder, so the default run reads it through the same
path as real data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from .cache import build_once, cannot_write, is_complete

CLASSES = ("circle", "ring", "square", "frame", "triangle", "star", "plus", "cross", "crescent", "bars")
VERSION = 3
IMAGE_SIZE = 72
TRAIN_PER_CLASS = 500
VAL_PER_CLASS = 100
_SPLIT_IDS = {"train": 0, "val": 1}


def default_cache_dir() -> Path:
    root = os.environ.get("ALEXNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alexnet")
    return Path(root)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _far_colour(rng: np.random.Generator, other: tuple[int, int, int]) -> tuple[int, int, int]:
    # The shape must stay visible: redraw until it differs enough from the background.
    for _ in range(50):
        c = _colour(rng)
        if sum(abs(a - b) for a, b in zip(c, other)) > 150:
            return c
    return tuple(255 - v for v in other)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = np.array(_colour(rng), dtype=np.float32)
    kind = rng.integers(0, 4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # flat with pixel noise
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == 1:  # linear gradient to a second colour
        other = np.array(_colour(rng), dtype=np.float32)
        a = rng.uniform(0, 2 * math.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        img = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == 2:  # soft stripes
        other = np.array(_colour(rng), dtype=np.float32)
        a, f = rng.uniform(0, math.pi), rng.uniform(3, 9)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
        t = t * rng.uniform(0.2, 0.5)  # faint, so the shape stays the strongest edge
        img = base * (1 - t[..., None]) + other * t[..., None]
    else:  # blotches: smooth noise
        coarse = rng.uniform(0, 1, (6, 6, 3)).astype(np.float32)
        up = np.array(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                      dtype=np.float32) / 255
        img = base * 0.7 + up * 76
    img = img + rng.normal(0, rng.uniform(2, 12), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        rad = (inner if inner and k % 2 else 1.0) * r
        a = rot + math.pi * 2 * k / (n * (2 if inner else 1))
        pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, label: str, cx, cy, r, rot) -> None:
    """Draw the shape into a mask: 255 inside, 0 in its holes."""
    fill, bg = 255, 0
    def box(rr):
        return [cx - rr, cy - rr, cx + rr, cy + rr]

    def bar(length, width, angle):
        dx, dy = math.cos(angle), math.sin(angle)
        px, py = -dy, dx
        return [(cx + dx * length + px * width, cy + dy * length + py * width),
                (cx + dx * length - px * width, cy + dy * length - py * width),
                (cx - dx * length - px * width, cy - dy * length - py * width),
                (cx - dx * length + px * width, cy - dy * length + py * width)]

    if label == "circle":
        draw.ellipse(box(r), fill=fill)
    elif label == "ring":
        draw.ellipse(box(r), fill=fill)
        draw.ellipse(box(r * 0.6), fill=bg)
    elif label == "square":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, rot + math.pi / 4), fill=fill)
    elif label == "frame":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, rot + math.pi / 4), fill=fill)
        draw.polygon(_polygon(cx, cy, r * 0.65, 4, rot + math.pi / 4), fill=bg)
    elif label == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.15, 3, rot), fill=fill)
    elif label == "star":
        draw.polygon(_polygon(cx, cy, r * 1.1, 5, rot, inner=0.42), fill=fill)
    elif label == "plus":
        draw.polygon(bar(r, r * 0.28, rot), fill=fill)
        draw.polygon(bar(r, r * 0.28, rot + math.pi / 2), fill=fill)
    elif label == "cross":
        draw.polygon(bar(r, r * 0.22, rot + math.pi / 4), fill=fill)
        draw.polygon(bar(r, r * 0.22, rot - math.pi / 4), fill=fill)
    elif label == "crescent":
        draw.ellipse(box(r), fill=fill)
        ox, oy = r * 0.5 * math.cos(rot * 4), r * 0.5 * math.sin(rot * 4)
        draw.ellipse([cx - r * 0.85 + ox, cy - r * 0.85 + oy, cx + r * 0.85 + ox, cy + r * 0.85 + oy], fill=bg)
    elif label == "bars":
        dx, dy = -math.sin(rot) * r * 0.45, math.cos(rot) * r * 0.45
        for s in (-1, 1):
            draw.polygon([(x + s * dx, y + s * dy) for x, y in bar(r, r * 0.16, rot)], fill=fill)
    else:
        raise ValueError(f"unknown shape {label!r}")


def make_image(seed: int, split: str, index: int, size: int = IMAGE_SIZE) -> tuple[Image.Image, int]:
    """Image number `index` of `split` and its class index; a pure function of its arguments."""
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, VERSION])
    scale = 2  # draw large, then shrink: smooth edges
    big = size * scale
    img = _background(rng, size).resize((big, big), Image.BILINEAR)
    bg_mean = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(0))
    fill = _far_colour(rng, bg_mean)
    draw = ImageDraw.Draw(img)
    mask = Image.new("L", (big, big), 0)
    # A few distractor blobs of random colours, smaller than the shape.
    for _ in range(int(rng.integers(0, 3))):
        rr = rng.uniform(0.025, 0.05) * big
        x, y = rng.uniform(0, big, 2)
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=_colour(rng))
    r = rng.uniform(0.25, 0.42) * big
    cx, cy = rng.uniform(r, big - r, 2)
    rot = rng.uniform(-0.35, 0.35)
    _draw_shape(ImageDraw.Draw(mask), CLASSES[label], cx, cy, r, rot)
    img.paste(Image.new("RGB", (big, big), fill), (0, 0), mask)
    img = img.resize((size, size), Image.BILINEAR)
    return img, label


def counts(train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = VAL_PER_CLASS) -> dict[str, int]:
    return {"train": train_per_class * len(CLASSES), "val": val_per_class * len(CLASSES)}


def _write(root: Path, seed: int, n: dict[str, int], size: int, progress=None) -> None:
    for split, total in n.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(total):
            img, label = make_image(seed, split, i, size)
            img.save(root / split / CLASSES[label] / f"{i:06d}.jpg", quality=92)
            if progress is not None:
                progress(split, i + 1, total)


def ensure_dataset(seed: int = 0, cache_dir: str | Path | None = None, *, train_per_class: int = TRAIN_PER_CLASS,
                   val_per_class: int = VAL_PER_CLASS, size: int = IMAGE_SIZE, log=print) -> Path:
    """Return the folder of the generated dataset, generating it first if it is not complete.

    One process generates, under an exclusive file lock, into a temporary folder that is renamed into
    place when complete; others wait on the lock and then find it ready.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"shapes-v{VERSION}-seed{seed}-{size}px-{train_per_class}x{val_per_class}"
    final = cache / name
    if is_complete(final):
        return final
    n = counts(train_per_class, val_per_class)
    step = max(1, sum(n.values()) // 10)

    def progress(split, i, total):
        if i % step == 0 or i == total:
            log(f"  {split}: {i}/{total}")

    def build(tmp: Path) -> None:
        log(f"generating the built-in dataset ({n['train']} train, {n['val']} val images) into {final}")
        _write(tmp, seed, n, size, progress)

    try:
        build_once(final, build, name, replace_incomplete=True)
    except OSError as e:
        raise DataError(f"cannot write the built-in dataset into the cache folder {cache}: {cannot_write(cache, e)}; "
                        f"set --cache-dir or ALEXNET_CACHE to a writable folder with a few MiB free") from None
    return final
