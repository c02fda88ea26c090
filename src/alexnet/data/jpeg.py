"""JPEG files decoded a batch at a time: on the GPU (nvJPEG through torchvision.io.decode_jpeg), and a JPEG
pack's images on a CPU by the main process.

On the JPEG path with a GPU, a loader worker then does almost nothing per image: it reads the file's
bytes and its header (for the size, so that it draws the crop, flip and colour parameters exactly as the
per-image path would), and the collate packs a batch's files into one byte tensor. On the device the
whole batch is decoded at once, each image is resized, cropped and mirrored there, and the batch
augmentation (data.batch) does the rest.

The images of a JPEG pack take the same path on a CPU, where the main process decodes each batch between
two steps in the model's threads (libjpeg-turbo through torchvision.io; packed.decode_in_main_process says
when), and only crops them: they are stored at their size.

The resize is PIL's bilinear resize with its antialiasing, done as PIL mostly does it: the horizontal
pass, rounded to 8 bits (halves up), then the vertical one, in floating point where PIL uses fixed
point. Given the same decoded pixels it is never more than one level from PIL's; resizing common photo
sizes to 256 on the shorter side, it is equal on 96% (640x427) to 100% (500x375) of the pixels. For an
exact WxH size PIL sometimes takes the vertical pass first, and then up to a quarter of the pixels are
a level off (tests/test_jpeg.py). nvJPEG's pixels are not libjpeg-turbo's to the bit either (another
inverse DCT and chroma upsampling), as no two JPEG decoders' are, so the device path is close to the
workers' path, not equal to it.

Files that are not RGB or greyscale JPEGs (PNG, CMYK JPEG, ...) and JPEGs cut short (no end-of-image
marker) are decoded and cropped in the worker as before and join the batch as crops. A batch the device
cannot decode in one go is decoded image by image, and an image the device cannot decode is decoded on
the CPU (at once when it meets the file again); one that cannot be decoded at all is an unreadable
image, skipped and counted, or an error under --on-bad-image error, as in the workers.
"""

from __future__ import annotations

import io
import os
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError
from .images import DECODE_ERRORS, MAX_PIXELS, decode_rgb, reason, unreadable


def decodes_lists() -> bool:
    """Whether this torchvision's decode_jpeg takes a list of files (0.20 and later; 0.19 takes one a call)."""
    try:
        import torchvision
    except ImportError:
        return False
    return torch.torch_version.TorchVersion(torchvision.__version__) >= "0.20"


def device_decoding_available() -> bool:
    """Whether a CUDA device is there and this torchvision decodes lists of JPEGs on it."""
    return torch.cuda.is_available() and decodes_lists()


def device_decoding_works(device: torch.device) -> str | None:
    """None when the device decodes a small JPEG to the right pixels; otherwise why not (no nvJPEG in this
    torchvision build, a ROCm build, a driver problem), so that the caller can decode in the workers
    rather than have every batch fall back to the CPU image by image."""
    from torchvision.io import ImageReadMode, decode_jpeg
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buffer, format="JPEG", quality=95)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        got = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)[0]
    except RuntimeError as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    error = (got.float().mean(dim=(1, 2)).cpu() - torch.tensor([200.0, 30.0, 90.0])).abs().max()
    return None if error < 8 else f"decoded a test image {float(error):.0f} levels off"


class Encoded(NamedTuple):
    """One JPEG file as a worker hands it over: its bytes, and (resized height, resized width, top,
    left, flip) of its crop. An image of a JPEG pack carries (the pack's folder, its pixel file, the
    image's number): stored at its size and decoded once before, it is damage when it no longer decodes
    to that size."""
    data: torch.Tensor
    geometry: torch.Tensor
    path: str
    pack: tuple | None = None


def damaged_pack(root, pixels_file, i: int, what: str) -> DataError:
    """The error for image `i` of a JPEG pack that no longer decodes as it did when packed."""
    return DataError(f"image {i} of {pixels_file} {what}: the pack is damaged; `alexnet data check {root}` checks "
                     f"every image; copy the pack again, or pack again")


def read_encoded(path: str, augment, g: torch.Generator) -> tuple[Encoded, torch.Tensor] | None:
    """(the encoded file, its batch-augmentation parameters), with the same draws as `augment.sample`
    makes on the decoded image; None when the file is not an RGB or greyscale JPEG (or cannot be opened),
    or does not end with the JPEG end-of-image marker, so that the worker decodes it itself (and reports
    it when it is unreadable). The marker check keeps truncated files off the device: nvJPEG decodes
    what a truncated file holds without an error, where PIL and libjpeg-turbo refuse it, so the two paths
    would disagree on which images are unreadable. A complete file with bytes after its marker is rare
    and only costs a decode in the worker."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
            return None
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            width, height = img.size
    except DECODE_ERRORS:
        return None
    if width * height > MAX_PIXELS:  # decoded at a reduced size on the CPU instead (images.MAX_PIXELS)
        return None
    width, height = augment.resized_size(width, height)
    top, left, params = augment.draw(height, width, g)
    geometry = torch.tensor([height, width, top, left, int(params[0])])
    return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), geometry, path), params


# Files the device refused in this process: decoded on the CPU at once from then on, so that one such file
# does not send its batch down the image-by-image path again every epoch.
_REFUSED: set[str] = set()


class JpegBatch:
    """A batch on the JPEG device-decoding path: the encoded files (their bytes end to end, one tensor for
    the batch rather than one shared-memory handle per file), their crop geometry and their positions in
    the batch, and the crops of the files the workers decoded themselves with their positions.
    `decode(device)` gives the (B, S, S, 3) uint8 crops on the device."""

    def __init__(self, items: list, size: int, strict: bool) -> None:
        encoded = [(i, e) for i, e in enumerate(items) if isinstance(e, Encoded)]
        decoded = [(i, c) for i, c in enumerate(items) if not isinstance(c, Encoded)]
        self.count, self.size, self.strict = len(items), size, strict
        self.where = torch.tensor([i for i, _ in encoded], dtype=torch.long)
        self.lengths = [e.data.numel() for _, e in encoded]
        self.data = torch.cat([e.data for _, e in encoded]) if encoded else torch.empty(0, dtype=torch.uint8)
        self.geometry = torch.stack([e.geometry for _, e in encoded]) if encoded else torch.empty(0, 5, dtype=torch.long)
        self.paths = [e.path for _, e in encoded]
        self.packs = [e.pack for _, e in encoded]
        self.crop_where = torch.tensor([i for i, _ in decoded], dtype=torch.long)
        self.crops = torch.stack([c for _, c in decoded]) if decoded else None
        self.on_cpu: list[str] = []  # files the device could not decode, tried on the CPU instead

    def pin_memory(self) -> "JpegBatch":  # the loader's pinning calls this; the bytes stay in host memory for nvJPEG
        if self.crops is not None:
            self.crops = self.crops.pin_memory()
        return self

    def decode(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(crops (B, S, S, 3) uint8 on `device`, mask of the images kept or None when all were): an image
        that cannot be decoded is dropped (its slot left blank) or, when strict, raises DataError. The crops
        may be a view of (B, 3, S, S) memory (the batch augmentation copies them to its own layout)."""
        s = self.size
        keep = torch.ones(self.count, dtype=torch.bool)
        images = self._decode_all(device) if self.paths else []
        for k, img in enumerate(images):
            if img is None:
                keep[self.where[k]] = False
            elif self.packs[k] is not None and tuple(img.shape[-2:]) != tuple(self.geometry[k, :2].tolist()):
                raise damaged_pack(*self.packs[k], f"decodes to {tuple(img.shape[-2:])}, not "
                                                   f"{tuple(self.geometry[k, :2].tolist())}")
        good = [k for k, img in enumerate(images) if img is not None]
        crops = resize_crop_flip([images[k] for k in good], self.geometry[good], s) if good else None
        if len(good) == self.count:  # every image of the batch decoded here, in its order
            return crops.permute(0, 2, 3, 1), None
        out = torch.empty(self.count, s, s, 3, dtype=torch.uint8, device=device)
        if self.crops is not None:
            out[self.crop_where.to(device)] = self.crops.to(device, non_blocking=True)
        if crops is not None:
            out[self.where[good].to(device)] = crops.permute(0, 2, 3, 1)
        return out, (None if bool(keep.all()) else keep)

    def _decode_all(self, device: torch.device) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg
        files = list(self.data.split(self.lengths))
        if device.type == "cuda":
            # nvJPEG's hardware decoder writes its outputs without waiting for work already queued on our
            # stream, and the caching allocator may hand it memory that work still reads (freed by the
            # last step): let the stream drain first (pytorch/vision#9606). The next step needs these
            # images anyway, so little overlap is lost.
            torch.cuda.current_stream(device).synchronize()
        images: list[torch.Tensor | None] = [None] * len(files)
        rest = []
        for k, path in enumerate(self.paths):
            if path in _REFUSED:  # refused before: to the CPU without another failed batch call
                self.on_cpu.append(path)
                images[k] = self._on_cpu(path, files[k], device, self.packs[k])
            else:
                rest.append(k)
        if not rest:
            return images
        try:
            listed = [files[k] for k in rest]
            decoded = (decode_jpeg(listed, mode=ImageReadMode.RGB, device=device) if device.type != "cpu"
                       else _decode_on_cpu_threads(listed))
            for k, img in zip(rest, decoded):
                images[k] = img
            return images
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # one bad file fails the whole call: decode them one by one to find it
            pass
        for k in rest:
            path = self.paths[k]
            try:
                images[k] = decode_jpeg(files[k], mode=ImageReadMode.RGB, device=device)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:
                _REFUSED.add(path)
                self.on_cpu.append(path)
                if device.type != "cpu":
                    print(f"WARNING: {device} could not decode {path} ({str(e).splitlines()[0] if str(e) else e!r}); "
                          f"trying the CPU", file=sys.stderr, flush=True)
                images[k] = self._on_cpu(path, files[k], device, self.packs[k])
        return images

    def _on_cpu(self, path: str, data: torch.Tensor, device: torch.device, pack: tuple | None = None) -> torch.Tensor | None:
        """The file's bytes decoded as the workers decode the file (data.images.load_rgb), or None (with a
        warning, or under strict a DataError) when they cannot be; a pack's image that cannot be is damage."""
        try:
            pixels = torch.from_numpy(np.array(decode_rgb(data.numpy().tobytes()), dtype=np.uint8))
        except DECODE_ERRORS as e:
            if pack is not None:
                raise damaged_pack(*pack, f"cannot be decoded ({reason(e)})") from None
            unreadable(path, e, self.strict)
            return None
        return pixels.permute(2, 0, 1).to(device)


_THREADS: list = []  # (thread count, pool): the main process's decoding threads on a CPU, made on first use
os.register_at_fork(after_in_child=_THREADS.clear)  # a forked loader worker has none of them


def _decode_on_cpu_threads(files: list[torch.Tensor]) -> list[torch.Tensor]:
    """The files decoded on the CPU between two steps, in as many threads as the model's (libjpeg-turbo
    through torchvision, which lets go of the GIL while it decodes): the cores the step uses, idle meanwhile.
    A RuntimeError when one of them cannot be decoded."""
    from concurrent.futures import ThreadPoolExecutor

    import torchvision.io
    cpu = torch.device("cpu")

    def decode(chunk):
        return torchvision.io.decode_jpeg(chunk, mode=torchvision.io.ImageReadMode.RGB, device=cpu)
    threads = torch.get_num_threads()
    n = max(min(threads, len(files)), 1)
    if n == 1:
        return decode(files)
    if not _THREADS or _THREADS[0][0] != threads:
        if _THREADS:
            _THREADS[0][1].shutdown(wait=False)
        _THREADS[:] = [(threads, ThreadPoolExecutor(threads, thread_name_prefix="jpeg-decode"))]
    parts = list(_THREADS[0][1].map(decode, [files[i::n] for i in range(n)]))
    return [parts[k % n][k // n] for k in range(len(files))]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear with antialiasing on 8-bit values held in floats, rounded back to 8-bit values."""
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.add_(0.5).floor_().clamp_(0, 255)  # halves rounded up, as PIL's fixed point does


def resize_crop_flip(images: list[torch.Tensor], geometry: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, S, S) uint8 crops of decoded (3, H, W) uint8 images, each resized to its (height, width),
    cropped at (top, left) and mirrored when flip is set (geometry rows: height, width, top, left, flip).
    Images of one original size are resized together; as in PIL, the horizontal pass comes first and is
    rounded to 8 bits. Only the crop's columns go through the vertical pass (it treats columns
    independently, so the result is the same). Images already at their size (a pack's) are only cropped,
    in (H, W, 3) order, which is how the CPU's decoder lays them out and the batch augmentation reads
    them: the crops are then a (N, 3, S, S) view of (N, S, S, 3) memory."""
    device = images[0].device
    rows = geometry.tolist()
    if all(tuple(img.shape[-2:]) == (row[0], row[1]) for img, row in zip(images, rows)):
        cuts = [img.permute(1, 2, 0)[top:top + size, left:left + size] for img, (_, _, top, left, _) in zip(images, rows)]
        return torch.stack([cut.flip(1) if row[4] else cut for cut, row in zip(cuts, rows)]).permute(0, 3, 1, 2)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(k)
    for (h0, w0), idx in groups.items():
        x = _resized_crops([images[k] for k in idx], [rows[k] for k in idx], (h0, w0), size)
        flip = torch.tensor([rows[k][4] for k in idx], dtype=torch.bool, device=device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        out[torch.tensor(idx, device=device)] = x.to(torch.uint8)
    return out


def _resized_crops(images: list[torch.Tensor], rows: list, shape: tuple[int, int], size: int) -> torch.Tensor:
    """The crops of images of one size, resized as resize_crop_flip says, in 8-bit values held in floats."""
    (h0, w0), (h, w) = shape, rows[0][:2]
    x = torch.stack(images).float()
    if w != w0:
        x = _resize(x, (h0, w))
    x = torch.stack([x[j, :, :, row[3]:row[3] + size] for j, row in enumerate(rows)])
    if h != h0:
        x = _resize(x, (h, size))
    return torch.stack([x[j, :, row[2]:row[2] + size] for j, row in enumerate(rows)])
