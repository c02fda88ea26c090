"""The packed form of an ImageFolder dataset: resized images in one file per split, read through a memory map.

`alexnet data pack DIR OUT` decodes and resizes every image once (the same decode and resize as the
per-image path) and writes, per split:

    OUT/<split>.u8        the images one after another: with --encoding raw their pixels (HWC uint8), with
                          --encoding jpeg the resized pixels encoded again as JPEG (--quality, 4:2:0)
    OUT/<split>.idx.npy   int64 (images, 4): byte offset, height, width, label
    OUT/<split>.sum.npy   uint32 (images,): the CRC-32 of each image's bytes (`alexnet data check OUT`)
    OUT/packed.json       format version, encoding, resize, classes, and per split: image count, bytes,
                          skipped files, how many images are stored with fewer pixels than their source
                          files, and a fingerprint of the contents (see `content_fingerprint`)

Reading a raw image is a slice of a memory map: no decoding and no resizing, and the operating system's
page cache keeps the hot pages in memory for every loader worker at once. A JPEG image is a slice too,
about a tenth of the bytes, decoded by the loader worker (libjpeg-turbo through torchvision.io) or a batch
at a time, on a GPU by nvJPEG and on a CPU by the main process (data.jpeg, `decode_in_main_process`).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .batch import FLIP, BatchAugment, supports
from .cache import build_once, is_complete, partial_of
from .folder import (VAL_DIRS, check_val_classes, find_classes, held_out, left_out, not_a_data_folder, pool_dir,
                     scan, val_dir_of)
from .images import DECODE_ERRORS, decode_rgb, jpeg_decoder, load_rgb, reason
from .held import HeldCrops, Slot, hold
from .jpeg import Encoded, JpegBatch, damaged_pack
from .transforms import Compose, Resize, parse_resize, sample_generator

FORMAT_VERSION = 1
META = "packed.json"
ENCODINGS = ("raw", "jpeg")


def is_packed(root: str | Path) -> bool:
    return (Path(root) / META).is_file()


def read_meta(root: str | Path) -> dict:
    root = Path(root)
    if not is_complete(root):
        raise DataError(f"{root} is an incomplete packed dataset (interrupted while packing?); pack it again")
    try:
        meta = json.loads((root / META).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{root / META} cannot be read ({e}); pack the data again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{root} was packed in format {meta.get('format_version')}; this version reads "
                        f"{FORMAT_VERSION}: pack it again with `alexnet data pack`")
    return meta


def smaller_than_source(root: str | Path, split: str = "train") -> tuple[int | None, int]:
    """(how many of the split's images are stored with fewer pixels than their source files, how many images
    it holds); the count is None for a pack made before it was recorded."""
    meta = read_meta(root)["splits"][split]
    return meta.get("smaller_than_source"), meta["images"]


def encoding_of(meta: dict) -> str:
    return meta.get("encoding", "raw")  # packs made before JPEG packs were raw


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """HWC uint8 pixels as a baseline JPEG with 4:2:0 chroma subsampling."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def available_cores() -> int:
    """The cores this process may run on: how many processes pack by default."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pool(workers: int):
    """The packing processes. Forked where this process runs no other Python thread: they start at once,
    with the modules (torch, torchvision's decoder) already imported here, where spawned ones would each
    import them again, seconds of a first run's packing. Spawned otherwise (a thread may hold a lock at the
    fork). Each runs torch on one thread (_one_thread)."""
    fork = "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
    if fork:
        jpeg_decoder()  # imported once here rather than in each process
    return multiprocessing.get_context("fork" if fork else "spawn").Pool(workers, initializer=_one_thread)


def _one_thread() -> None:
    """A packing process's torch on one thread: one process a core already, and torch's operations then run
    inline, never in an OpenMP region, whose thread pool a forked process inherits in a state it cannot use
    (GNU OpenMP waits there for threads that were not forked: a hang) where this process had used one.
    Ctrl-C, which the terminal sends to every process of the job, is left to the main process: it says what
    was kept and ends the pool; each packing process would print a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _decode(job: tuple[str, str, str, int]):
    return stored_image(*job)


def stored_image(path: str, resize: str, encoding: str, quality: int):
    """The image file at `path` as a pack stores it: (the bytes to store, height, width, error, whether the
    stored image has fewer pixels than the source's); the bytes None and the error's text when it cannot
    be read."""
    try:
        img = load_rgb(path)
        pixels = np.asarray(Resize(parse_resize(resize))(img), dtype=np.uint8)
    except DECODE_ERRORS as e:
        return None, 0, 0, f"{path}: {reason(e)}", False
    h, w = pixels.shape[:2]
    data = pixels.tobytes() if encoding == "raw" else encode_jpeg(pixels, quality)
    return data, h, w, None, h * w < img.width * img.height


def content_fingerprint(rows) -> str:
    """A hash of a split's contents that two packs of one folder share wherever and whenever they were made,
    and whatever JPEG encoder made them: of each image's path relative to the source folder, file size,
    label and stored height x width, in order (rows of (relative path, size, label, height, width))."""
    h = hashlib.sha256()
    for rel, size, label, height, width in rows:
        h.update(f"{rel}\t{size}\t{label}\t{height}x{width}\n".encode())
    return h.hexdigest()


SAVE_EVERY = 256  # images between two saves of an unfinished split's progress (data pack continues from there)


def _pack_split(samples: list[tuple[str, int]], how: tuple, out: Path, split: str, pool, progress) -> dict:
    """Decode, resize (and encode: `how` is (source folder, resize, encoding, quality)) and append the split's
    images to OUT/<split>.u8, with their index and checksums. Every
    SAVE_EVERY images what is done is saved (OUT/<split>.progress.*): a pack killed half-way continues from
    there, with the same bytes as a pack never stopped. Returns the split's entry of packed.json."""
    done_file, state_file = out / f"{split}.done.json", out / f"{split}.progress.json"
    if done_file.exists():  # finished before the interruption
        return json.loads(done_file.read_text())
    source, *coding = how
    state = {"done": 0, "bytes": 0, "skipped": [], "skipped_at": [], "smaller": 0}
    index, sums = [], []
    if state_file.exists():
        state = json.loads(state_file.read_text())
        index = np.load(out / f"{split}.progress.idx.npy").tolist()[:state["images"]]
        sums = np.load(out / f"{split}.progress.sum.npy").tolist()[:state["images"]]
    offset, smaller, start = state["bytes"], state["smaller"], state["done"]
    skipped, skipped_at = list(state["skipped"]), list(state["skipped_at"])
    progress(split, start, before=True)
    jobs = [(path, *coding) for path, _ in samples[start:]]
    with open(out / f"{split}.u8", "r+b" if start else "wb") as f:
        f.truncate(offset)  # what was written after the last save is written again
        f.seek(offset)
        decoded = pool.imap(_decode, jobs, chunksize=16) if pool else map(_decode, jobs)
        for done, ((path, label), (data, h, w, error, shrunk)) in enumerate(zip(samples[start:], decoded), start + 1):
            if error is not None:
                skipped.append(error)
                skipped_at.append(done - 1)
                print(f"WARNING: skipping unreadable image {error}", file=sys.stderr, flush=True)
            else:
                f.write(data)
                sums.append(zlib.crc32(data))
                index.append((offset, h, w, label))
                offset += len(data)
                smaller += shrunk
            progress(split)
            if done % SAVE_EVERY == 0 and done < len(samples):
                f.flush()
                os.fsync(f.fileno())
                np.save(out / f"{split}.progress.idx.npy", np.array(index, dtype=np.int64).reshape(-1, 4))
                np.save(out / f"{split}.progress.sum.npy", np.array(sums, dtype=np.uint32))
                tmp = state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"done": done, "images": len(index), "bytes": offset, "skipped": skipped,
                                           "skipped_at": skipped_at, "smaller": smaller}))
                os.replace(tmp, state_file)
    if not index:
        raise DataError(f"no readable image in the {split} split")
    np.save(out / f"{split}.idx.npy", np.array(index, dtype=np.int64))
    np.save(out / f"{split}.sum.npy", np.array(sums, dtype=np.uint32))
    gone = set(skipped_at)
    kept = [sample for k, sample in enumerate(samples) if k not in gone]
    rows = ((Path(os.path.relpath(path, source)).as_posix(), _size(path), label, h, w)
            for (path, label), (_, h, w, _) in zip(kept, index))
    entry = {"images": len(index), "bytes": offset, "skipped": skipped, "smaller_than_source": smaller,
             "checksums": f"{split}.sum.npy", "fingerprint": content_fingerprint(rows)}
    done_file.write_text(json.dumps(entry))
    for name in (state_file, out / f"{split}.progress.idx.npy", out / f"{split}.progress.sum.npy"):
        name.unlink(missing_ok=True)
    return entry


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def verify(root: str | Path, progress=None) -> list[str]:
    """`alexnet data check PACK`: every image's bytes against the CRC-32 recorded when it was packed (and
    first, the files' sizes against the index, as at every start). One line per damaged file, naming the
    first images that differ; empty when the pack is whole."""
    root = Path(root)
    meta = read_meta(root)
    found = []
    for split, info in meta["splits"].items():
        pixels_file = root / f"{split}.u8"
        try:
            index = _checked_index(root, split, info, pixels_file, encoding_of(meta) == "raw")
        except DataError as e:
            found.append(str(e))
            continue
        if "checksums" not in info:
            found.append(f"{root} was packed before checksums were recorded: only the sizes of {pixels_file} "
                         f"were checked; pack it again to have every image checked")
            continue
        sums = np.load(root / info["checksums"])
        pixels = np.memmap(pixels_file, dtype=np.uint8, mode="r")
        bad = []
        for i, (start, end) in enumerate(zip(index[:, 0], _ends(index, info["bytes"]))):
            if zlib.crc32(pixels[start:end]) != sums[i]:
                bad.append(i)
            if progress is not None:
                progress.update()
        if bad:
            first = ", ".join(str(i) for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            found.append(f"{pixels_file}: {len(bad)} of its {len(index)} images differ from what was packed (images "
                         f"{first}): the copy is damaged; copy the pack again from where it was made, or pack again")
    if progress is not None:
        progress.close()
    return found


def pack(source: str | Path, out: str | Path, resize: str = "256", workers: int = 2, log=print,
         val_dir: str | None = None, val_fraction: float = 0.0, split_seed: int = 0, encoding: str = "raw",
         quality: int = 90) -> Path:
    """Pack the train and validation splits of the ImageFolder `source` into `out` (see the module's doc;
    the validation split is folder.val_dir_of's, or with `val_fraction` folder.held_out's, stored as "val").
    One process packs; others that ask for the same folder at the same time wait for it and use it."""
    source, out = Path(source), Path(out)
    parse_resize(resize)
    if encoding not in ENCODINGS:
        raise DataError(f"--encoding: {encoding!r} is not one of {', '.join(ENCODINGS)}")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality: {quality} is not in 1..100 (JPEG quality; 90 keeps photos within about "
                        f"2 levels of the raw pixels)")
    coding = {"encoding": encoding, **({"quality": quality} if encoding == "jpeg" else {})}
    if not source.is_dir():
        raise not_a_data_folder(source)
    if is_packed(source):
        raise DataError(f"{source} is already a packed dataset")
    if is_complete(out):
        return _same_pack(out, source, resize, coding, log)
    if out.exists() and any(out.iterdir()) and not is_complete(out):
        raise DataError(f"{out} exists and is not a packed dataset; choose a new folder")
    splits_at = [pool_dir(source)] if val_fraction else ["train", *([val_dir] if val_dir else VAL_DIRS)]
    for folder in (source / name for name in splits_at):  # before the files are listed: cheap on any size
        if out.resolve().is_relative_to(folder.resolve()):
            raise DataError(f"{out} lies inside {folder}, where the dataset's class folders are looked for; choose "
                            f"a folder outside it")
    others = Counter()  # files of the class folders that are not images by their names
    if val_fraction:
        classes, train, val = held_out(source, val_fraction, split_seed, others)
        splits = {"train": train, "val": val}
        log(f"validation split: {len(val)} images held out of {source / pool_dir(source)} (--val-fraction "
            f"{val_fraction:g}, --split-seed {split_seed})")
    else:
        classes = find_classes(source / "train")
        splits = {"train": scan(source / "train", classes, others)}
        val_dir = val_dir_of(source, val_dir)
        check_val_classes(source, val_dir, classes)
        splits["val"] = scan(source / val_dir, classes, others)
        if val_dir != "val":
            log(f"validation split: {source / val_dir}")
    if note := left_out(others, source):
        log(note)
    total = sum(len(s) for s in splits.values())
    done = {"n": 0, "before": 0, "start": time.monotonic()}
    done["said"] = (0, done["start"])  # (images, time) of the last line

    def progress(split, n: int = 1, before: bool = False):
        """`n` more images done (`before`: by an interrupted run, which the rate leaves out). A line each 5%
        of the images, at most one a second, and the last."""
        done["n"] += n
        done["before"] += n if before else 0
        if before:  # the next line after 5% more of this run's own, whose rate it can tell
            done["said"] = (done["n"], done["said"][1])
        said_n, said_t = done["said"]
        now = time.monotonic()
        if not before and (done["n"] - said_n >= total / 20 and now - said_t >= 1 or done["n"] == total):
            done["said"] = (done["n"], now)
            rate = (done["n"] - done["before"]) / max(now - done["start"], 1e-9)
            left = int((total - done["n"]) / max(rate, 1e-9))
            log(f"  {done['n']}/{total} images, {rate:.0f} images/s, {left // 60}:{left % 60:02d} left")

    def already(tmp: Path) -> int:
        """Images an interrupted pack in `tmp` had done."""
        count = 0
        for split, samples in splits.items():
            if (tmp / f"{split}.done.json").exists():
                count += len(samples)
            elif (tmp / f"{split}.progress.json").exists():
                count += json.loads((tmp / f"{split}.progress.json").read_text())["done"]
        return count

    def build(tmp: Path) -> None:
        meta = {"format_version": FORMAT_VERSION, "source": str(source.resolve()), "resize": resize, **coding,
                "classes": classes, "splits": {},
                **({"val_fraction": val_fraction, "split_seed": split_seed} if val_fraction else {}),
                **({"left_out": dict(others)} if others else {})}  # files not images by their names, by extension
        files = hashlib.sha256("\n".join(f"{path}\t{label}" for samples in splits.values()
                                          for path, label in samples).encode()).hexdigest()
        plan = {**{k: v for k, v in meta.items() if k != "left_out"}, "files": files}  # what the images are
        started = tmp / "plan.json"
        if started.exists() and json.loads(started.read_text()) == plan:
            log(f"continuing the interrupted pack of {source} into {out}: {already(tmp)} of {total} images "
                f"already done")
        else:  # a first start, or an interrupted pack of other files or settings: start over
            for old in tmp.iterdir():
                old.unlink()
            started.write_text(json.dumps(plan))
        log(f"packing {total} images of {source} at --resize {resize} ({_coding_text(coding)}) into {out} with "
            f"{workers} worker(s)")
        pool = _pool(workers) if workers > 0 else None
        with pool or nullcontext():
            for split, samples in splits.items():
                how = (source, resize, encoding, quality)
                meta["splits"][split] = _pack_split(samples, how, tmp, split, pool, progress)
        for split in splits:
            (tmp / f"{split}.done.json").unlink()
        started.unlink()
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")

    try:
        if not build_once(out, build, f"packed from {source}", resumable=True):  # another process packed it meanwhile
            return _same_pack(out, source, resize, coding, log)
    except KeyboardInterrupt:
        if done["n"] and partial_of(out).exists():  # this process was packing (not waiting for another's pack)
            log(f"packing stopped by Ctrl-C: the images packed up to its last save (every {SAVE_EVERY} images) are "
                f"kept in {partial_of(out)}, and the same command continues from there")
        raise
    meta = read_meta(out)
    sizes = {s: m["images"] for s, m in meta["splits"].items()}
    skipped = sum(len(m["skipped"]) for m in meta["splits"].values())
    gib = sum(m["bytes"] for m in meta["splits"].values()) / 2**30
    log(f"packed {sizes['train']} train and {sizes['val']} val images ({gib:.2f} GiB, {_coding_text(coding)}) "
        f"into {out}"
        + (f"; {skipped} unreadable file(s) skipped (listed in {out / META})" if skipped else ""))
    return out


def _coding_text(coding: dict) -> str:
    return "raw pixels" if coding["encoding"] == "raw" else f"JPEG quality {coding['quality']}"


def _same_pack(out: Path, source: Path, resize: str, coding: dict, log) -> Path:
    meta = read_meta(out)
    theirs = {"encoding": encoding_of(meta), **({"quality": meta["quality"]} if "quality" in meta else {})}
    if meta["resize"] != resize or meta["source"] != str(source.resolve()) or theirs != coding:
        raise DataError(f"{out} already holds {meta['source']} packed at --resize {meta['resize']} "
                        f"({_coding_text(theirs)}); choose another folder or remove it")
    log(f"{out} is already packed from {source} at --resize {resize} ({_coding_text(coding)})")
    return out


def _ends(index: np.ndarray, total: int) -> np.ndarray:
    """Where each image's bytes end: the next one's offset, the total for the last."""
    return np.append(index[1:, 0], total) if len(index) else np.zeros(0, dtype=np.int64)


def _checked_index(root: Path, split: str, meta: dict, pixels_file: Path, raw: bool = True) -> np.ndarray:
    """The split's index, once it and the pixel file agree with packed.json (image count, total bytes, the
    file's size): a copy cut short, or a file from another pack, is refused here at start with what to do,
    not found as a reshape error in the middle of an epoch."""
    again = (f"copy the pack again from where it was made (the whole folder: packed.json, {split}.u8 and "
             f"{split}.idx.npy), or pack again with `alexnet data pack`")
    index_file = root / f"{split}.idx.npy"
    try:
        index = np.load(index_file)
        size = pixels_file.stat().st_size
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{root} is a damaged packed dataset: {getattr(e, 'filename', None) or index_file} cannot be "
                        f"read ({getattr(e, 'strerror', None) or e}); {again}") from None
    if index.ndim != 2 or index.shape != (meta["images"], 4):
        raise DataError(f"{root} is a damaged packed dataset: {index_file} lists {len(index)} images where "
                        f"packed.json says {meta['images']}; {again}")
    if raw:  # each image's length follows from its size
        end = int((index[-1, 0] + index[-1, 1] * index[-1, 2] * 3)) if len(index) else 0
    else:  # JPEG images lie end to end: each one's bytes end where the next one's begin
        lengths = _ends(index, meta["bytes"]) - index[:, 0]
        end = meta["bytes"] if len(index) and index[0, 0] == 0 and (lengths > 0).all() else -1
    if size != meta["bytes"] or end != meta["bytes"]:
        what = (f"{pixels_file} holds {size:,} bytes where packed.json says {meta['bytes']:,}" if size != meta["bytes"]
                else f"{index_file} does not end at byte {meta['bytes']:,}, where packed.json says the images end")
        raise DataError(f"{root} is a damaged packed dataset: {what} (a copy cut short?); {again}")
    return index


def check_sizes(root: str | Path) -> None:
    """The checks every start makes (`_checked_index`), on every split of the pack: a DataError when one fails."""
    root = Path(root)
    meta = read_meta(root)
    for split, info in meta["splits"].items():
        _checked_index(root, split, info, root / f"{split}.u8", encoding_of(meta) == "raw")


class PackedSplit(Dataset):
    """One split of a packed dataset. Items by index or by (epoch, index), as ImageFolder's. With a
    BatchAugment (`batch`), an item is ((crop, parameters), label) for the batch path, or with `held`
    (its pixels in the device's memory, data.held) ((where the crop lies, parameters), label); otherwise the
    per-image transform runs on the stored pixels (its resize is then a no-op). The images of a JPEG pack
    are decoded by whoever reads them, or with `decode_on_device` left to the GPU as data.jpeg's Encoded
    files (their resize is then a no-op too)."""

    # Every image was readable when packed: one that no longer decodes is damage, an error on every path
    # (the loader's collate reads this for images left to the GPU's decoder).
    on_bad_image = "error"

    def __init__(self, root: str | Path, split: str, transform: Compose, seed: int = 0,
                 batch: BatchAugment | None = None) -> None:
        self.root, self.split = Path(root), split
        meta = read_meta(self.root)
        self.classes, self.resize, self.encoding = meta["classes"], meta["resize"], encoding_of(meta)
        self.pixels_file = self.root / f"{split}.u8"
        info = meta["splits"][split]
        self.index = _checked_index(self.root, split, info, self.pixels_file, self.encoding == "raw")
        self.ends = _ends(self.index, info["bytes"])
        self.recorded = info.get("fingerprint")  # None for a pack made before it was recorded
        self.transform, self.seed, self.batch = transform, seed, batch
        self.held = self.decode_on_device = False
        self._pixels = None  # opened in each process on first use (a memory map does not travel to workers)

    def __len__(self) -> int:
        return len(self.index)

    def fingerprint(self, sizes: bool = True) -> dict:
        """As ImageFolder.fingerprint's: the fingerprint recorded at packing (content_fingerprint), or for a
        pack made before it was recorded a hash of the stored size and label of each image in order (two
        packs of one folder agree whatever their paths or the times they were made), and the encoding.
        Reading it costs nothing. Without `sizes` (what a checkpoint records), the resize too: the stored
        sizes the hash covers depend on it."""
        rows = np.ascontiguousarray(self.index[:, 1:4])
        files = self.recorded or hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()
        return {"images": len(self.index), "classes": list(self.classes), "files": files, "encoding": self.encoding,
                **({} if sizes else {"resize": self.resize})}

    def stored(self, i: int) -> np.ndarray:
        """The image's stored bytes (a view of the memory map)."""
        if self._pixels is None:
            self._pixels = np.memmap(self.pixels_file, dtype=np.uint8, mode="r")
        return self._pixels[self.index[i][0]:self.ends[i]]

    def pixels(self, i: int) -> np.ndarray:
        _, h, w, _ = self.index[i]
        if self.encoding == "raw":
            return self.stored(i).reshape(h, w, 3)
        pixels, error = None, None
        try:
            pixels = np.asarray(decode_rgb(self.stored(i).tobytes()), dtype=np.uint8)
        except DECODE_ERRORS as e:
            error = e
        if pixels is None or pixels.shape != (h, w, 3):
            what = f"cannot be decoded ({reason(error)})" if pixels is None else f"decodes to {pixels.shape[:2]}, not {(h, w)}"
            raise damaged_pack(self.root, self.pixels_file, i, what)
        return pixels

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        self.transform.at_epoch(epoch)
        label = int(self.index[i][3])
        g = sample_generator(self.seed, epoch, i)
        if self.decode_on_device:
            offset, h, w, _ = (int(v) for v in self.index[i])
            top, left, params = self.batch.draw(h, w, g)
            data = torch.from_numpy(np.array(self.stored(i)))
            geometry = torch.tensor([h, w, top, left, int(params[0])])
            where = (self.root, self.pixels_file, i)
            return (Encoded(data, geometry, f"{self.pixels_file} (image {i})", where), params), label
        if self.batch is not None and self.held:
            offset, h, w, _ = (int(v) for v in self.index[i])
            top, left, params = self.batch.draw(h, w, g)
            return (Slot(str(self.pixels_file), torch.tensor([offset // 3, w, top, left])), params), label
        if self.batch is not None:
            return self.batch.sample(self.pixels(i), g), label
        return self.transform(Image.fromarray(np.array(self.pixels(i))), g), label


def check_resize(root: str | Path, resize: str) -> None:
    """The stored images are resized already: a model made for another resize needs another pack."""
    meta = read_meta(root)
    if parse_resize(meta["resize"]) != parse_resize(resize):
        raise DataError(f"{root} was packed at --resize {meta['resize']}, not {resize}: use --resize "
                        f"{meta['resize']} or pack again with `alexnet data pack SRC OUT --resize {resize}`")


def open_splits(root: str | Path, resize: str, train_transform: Compose, eval_transform: Compose, seed: int,
                batch_on: bool = True):
    """(train, val) of a packed dataset, each on the batch path when its transform allows it."""
    check_resize(root, resize)
    splits = []
    for split, transform in (("train", train_transform), ("val", eval_transform)):
        batch = BatchAugment(transform) if batch_on and supports(transform) else None
        splits.append(PackedSplit(root, split, transform, seed, batch))
    return tuple(splits)


def hold_on_device(splits, device: torch.device, mode: str, say) -> None:
    """Hold the packed splits on the batch path (with `mode` yes the first, training, split must be one)
    in the device's memory (data.held). On a GPU: with `mode` auto when they take at most half of its
    free memory, with yes whenever they fit (an error otherwise), with no never. On a CPU, where holding
    is reading the crops from the memory map in the main process, with auto and yes."""
    if mode == "no":
        return
    candidates = [s for s in splits if isinstance(s, PackedSplit) and s.encoding == "raw" and s.batch is not None
                  and s.batch.window]
    if mode == "yes":
        if not isinstance(splits[0], PackedSplit) or splits[0].encoding != "raw":
            raise DataError("--data-on-device yes needs data packed as raw pixels: pack the folder with `alexnet "
                            "data pack DIR OUT --resize R` and train with --data OUT, or use --data-on-device no")
        if splits[0] not in candidates:
            raise DataError("--data-on-device yes crops the held images as windows (on the GPU, or in the main "
                            "process on a CPU), which cannot rotate them or take random-resized crops; use "
                            "--data-on-device no")
    if device.type not in ("cpu", "cuda") or not candidates:
        return
    if device.type == "cuda":  # copied there, so it must fit; a CPU maps the file and has no such limit
        size = sum(s.pixels_file.stat().st_size for s in candidates)
        free = torch.cuda.mem_get_info(device)[0]
        if size > (free / 2 if mode == "auto" else free):
            message = (f"packed images ({size / 2**30:.1f} GiB) larger than {'half of ' if mode == 'auto' else ''}"
                       f"{device}'s free memory ({free / 2**30:.1f} GiB)")
            if mode == "yes":
                raise DataError(f"--data-on-device yes: {message}; use --data-on-device no")
            say(f"{message}: read by the loader")
            return
    for split in candidates:
        hold(split.pixels_file, device)
        split.held = True


def decode_in_main_process(splits, device: torch.device, workers: int, jpeg_decode: str) -> None:
    """On a CPU, let the main process decode a JPEG pack's images, a batch at a time between two steps, as
    a GPU does (data.jpeg: the workers only read each image's bytes and draw its crop), where loader
    workers decoding them would run on the cores of the model's threads (`jpeg_decode` auto). A worker
    that takes a core from one of those threads holds up the whole step, which then costs more than the
    decoding itself: on 2 cores, 79 ms a batch of 64 for 43 ms of decoding on one core, where the main
    process spends 37 ms decoding, cropping and finishing the batch (BENCHMARKS.md, "Raw and JPEG packs").
    With `jpeg_decode` workers, or workers with cores of their own, the workers decode."""
    if device.type != "cpu" or jpeg_decode != "auto":
        return
    if workers and torch.get_num_threads() + workers <= available_cores():
        return
    for split in splits:
        if isinstance(split, PackedSplit) and split.encoding == "jpeg" and split.batch is not None \
                and split.batch.window:
            split.decode_on_device = True


def collate_batch(augment: BatchAugment, finish: bool, strict: bool = False):
    """A collate function for the batch path: stacks the crops and parameters, and with `finish` (on the
    CPU) finishes the batch in the loader's worker. Files left for the device to decode (data.jpeg) make
    a JpegBatch in place of the crops; `strict`: an image the device cannot decode is an error."""
    def collate(items):
        good = [item for item in items if item is not None]  # None: an unreadable file (JPEG path)
        bad = len(items) - len(good)
        if not good:
            return torch.empty(0), torch.empty(0, dtype=torch.long), bad
        params = torch.stack([p for (_, p), _ in good])
        target = torch.tensor([label for _, label in good])
        if isinstance(good[0][0][0], Slot):
            return (HeldCrops([c for (c, _), _ in good], params[:, FLIP], augment.crop.size), params), target, bad
        if any(isinstance(c, Encoded) for (c, _), _ in good):
            return (JpegBatch([c for (c, _), _ in good], augment.crop.size, strict), params), target, bad
        crops = torch.stack([c for (c, _), _ in good])
        if finish:
            return augment(crops, params), target, bad
        return (crops, params), target, bad
    return collate
