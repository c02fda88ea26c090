"""Reading image files as 8-bit RGB with the right pixel values, whatever their mode."""

from __future__ import annotations

import io
import os
import sys
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision ImageFolder's

# What one image may cost to decode: a JPEG larger than this is decoded at 1/2, 1/4 or 1/8 of its size
# (libjpeg's reduced decoding, far cheaper than decoding it whole and resizing), other formats are refused
# as unreadable (skipped and counted in training). 40 million pixels are 120 MB as 8-bit RGB, in every
# loader worker; ALEXNET_MAX_IMAGE_PIXELS raises it.
MAX_PIXELS = int(os.environ.get("ALEXNET_MAX_IMAGE_PIXELS", "40000000"))
# Pillow warns above its own bomb limit and refuses above twice it; this module bounds the cost itself.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class TooLarge(ValueError):
    """An image whose decoding would cost more than MAX_PIXELS allows."""


# Every error a decoder raises for a file it cannot read: truncated, corrupt, empty, not an image, one
# that declares a huge size (Pillow's DecompressionBombError), one over MAX_PIXELS.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, TooLarge)


def is_image_name(name: str) -> bool:
    """Whether a file of this name is read as an image: by its extension, and not a "._" file (the
    metadata macOS leaves beside each file it copies to another file system, named as the file)."""
    return name.lower().endswith(EXTENSIONS) and not name.startswith("._")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    - 16- and 32-bit integer greyscale (PNG 'I;16', 'I'): scaled down to 8 bits, not clipped (a plain
      convert would turn most of a 16-bit image white).
    - float ('F'): taken as [0, 1] when its maximum is at most 1, else as 8-bit values.
    - transparency (RGBA, LA, palette with transparency): composited onto white, as a viewer shows it.
    - CMYK, YCbCr, palette, greyscale, 1-bit: PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if mode == "I" and img.format not in ("PNG", "PPM", None) and a.max(initial=0) <= 255:
            pass  # 32-bit integer storage of 8-bit values (some TIFFs; PIL opens 8-bit PGMs as "L")
        elif mode == "I" and a.max(initial=0) > 65535:
            a = a >> 24 if a.max() > 2**24 else a >> 16
        else:  # 16-bit samples, PNG's deep greyscale among them, even when the image is dark
            a = a >> 8
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info or mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


# torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; they are still the
# quickest JPEG decoder we can count on being installed. Where they are gone, PIL decodes everything.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
_jpeg = None


def jpeg_decoder() -> tuple:
    """(torch, torchvision's decode_jpeg, its RGB mode), imported on first use (seconds); () where
    torchvision cannot be imported."""
    global _jpeg
    if _jpeg is None:
        try:
            import torch
            from torchvision.io import ImageReadMode, decode_jpeg
            _jpeg = (torch, decode_jpeg, ImageReadMode.RGB)
        except ImportError:
            _jpeg = ()
    return _jpeg


def _decode_jpeg(data: bytes) -> Image.Image | None:
    """torchvision's libjpeg-turbo decoder (about twice PIL's speed here), straight to RGB; None when it
    cannot decode the file (not a JPEG, truncated, an unusual colour space) or is not there: PIL then
    decodes it, or gives the error."""
    decoder = jpeg_decoder()
    if not decoder:
        return None
    torch, decode_jpeg, rgb = decoder
    try:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=rgb)
    except RuntimeError:
        return None
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def load_rgb(path) -> Image.Image:
    """The image at `path` as 8-bit RGB; one of DECODE_ERRORS when it cannot be read (or would cost more
    than MAX_PIXELS: see there)."""
    with open(path, "rb") as f:
        return decode_rgb(f.read())


def decode_rgb(data: bytes) -> Image.Image:
    """An image file's bytes decoded as `load_rgb` decodes the file."""
    img = Image.open(io.BytesIO(data))  # the header only: the size is known before any pixel is decoded
    width, height = img.size
    if width * height > MAX_PIXELS:
        return to_rgb(_reduced(img, width, height))
    if img.format == "JPEG":
        fast = _decode_jpeg(data)
        if fast is not None:
            return fast
    img.load()
    return to_rgb(img)


def _reduced(img: Image.Image, width: int, height: int) -> Image.Image:
    """A JPEG over MAX_PIXELS decoded at the largest of 1/2, 1/4, 1/8 of its size that fits; TooLarge for
    other formats or when even 1/8 does not fit."""
    fits = [s for s in (2, 4, 8) if (width // s) * (height // s) <= MAX_PIXELS] if img.format == "JPEG" else []
    if fits:
        img.draft(img.mode if img.mode in ("RGB", "L") else "RGB", (width // fits[0], height // fits[0]))
        img.load()
        return img
    raise TooLarge(f"{width}x{height} is {width * height / 1e6:.0f} million pixels, more than the "
                   f"{MAX_PIXELS / 1e6:.0f} million one image may have (ALEXNET_MAX_IMAGE_PIXELS raises the limit)")


def reason(error: Exception) -> str:
    """A decoding error in words, for a message that names the file already: PIL names the in-memory file
    it could not identify by its address, and an OSError repeats the path after its own words."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file"
    if isinstance(error, OSError) and error.strerror:
        link = isinstance(error, FileNotFoundError) and error.filename and os.path.islink(error.filename)
        return error.strerror + (" (a link to a file that is gone)" if link else "")
    return str(error) or type(error).__name__


def unreadable(path, error: Exception, strict: bool) -> None:
    """An image that cannot be decoded: with `strict` (--on-bad-image error) a DataError that names it,
    otherwise a warning, and the caller skips it (the loader counts it)."""
    if strict:
        raise DataError(f"unreadable image {path}: {reason(error)} (--on-bad-image skip skips such files)")
    print(f"WARNING: skipping unreadable image {path}: {reason(error)}", file=sys.stderr, flush=True)
