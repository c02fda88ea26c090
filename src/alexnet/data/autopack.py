"""`alexnet train --data DIR` on an image folder: DIR packed once, on first use, into the cache folder, and
trained from the pack from then on (--pack; data.packed holds the packed form).

The pack is made where it gives the pixels the run would use anyway: the images resized to --resize. Not
with random-resized crops, which are cut from the original images, nor with --val-fraction (packs choose
their validation split when packed: `alexnet data pack DIR OUT --val-fraction F`), nor for the built-in
dataset, whose 72-px images are generated into the cache folder and decode in tens of microseconds.

The pack's folder is keyed by DIR's file list (relative paths, sizes and modification times), --resize and
the encoding, so that a changed folder is packed again and an unchanged one is found again by every
later run and every process of this machine. `auto` takes raw pixels where they take at most half the
free disk of the cache folder and half the memory, JPEG where that takes at most half the free disk, and
otherwise decodes the files every epoch; the sizes come from a sample of the files. An existing pack of
the folder is used first; runs that start together on one folder and cache folder wait for each other
(a lock file beside the packs), so that one of them packs and the others use its pack. A cache folder
that cannot take the pack (not writable, or filled up by another process while packing) leaves `auto` to
the files, with a warning. The choice is recorded in config.yaml (`pack: raw`, `jpeg` or `no`), so that a
resumed run reads the same pixels."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from . import packed
from .cache import cannot_write, partial_of
from .folder import find_classes, left_out, pool_dir, val_dir_of
from .images import DECODE_ERRORS, is_image_name
from .synthetic import default_cache_dir
from .transforms import Resize, parse_resize

QUALITY = 90
HEADERS, ENCODED = 64, 12  # files sampled for the pack's size: headers read, images resized and encoded
SMALL = 1000  # folders of fewer images are packed by this process alone


def why_not(cfg) -> str | None:
    """Why this run trains from its --data as it is (None when it is packed on first use)."""
    if cfg.data is None:
        return "the built-in dataset"
    if cfg.pack == "no":
        return "--pack no"
    if packed.is_packed(cfg.data):
        return "packed already"
    if not Path(cfg.data).is_dir():
        return "not a folder here"
    if cfg.random_resized_crop:
        return "--random-resized-crop cuts its crops from the original images"
    if cfg.jpeg_decode == "device":
        return "--jpeg-decode device decodes the files on the GPU"
    if cfg.val_fraction:
        return "--val-fraction holds files out at start (pack with `alexnet data pack DIR OUT --val-fraction F`)"
    return None


def _files(folder: Path, val_dir: str | None) -> list[tuple[str, int, int]]:
    """(relative path, size, modification time in ns) of the image files of the train and validation splits:
    the files folder.scan finds (in class folders linked from elsewhere too), so that a change to any file
    a run reads makes another pack."""
    found = []
    for split in dict.fromkeys((pool_dir(folder), val_dir_of(folder, val_dir))):
        for label in find_classes(folder / split):
            for dirpath, _, names in os.walk(folder / split / label, followlinks=True):
                for name in names:
                    if not is_image_name(name):
                        continue
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.stat(path)
                    except OSError:  # a dangling link, say: packing counts it unreadable, as training does
                        found.append((os.path.relpath(path, folder), -1, 0))
                        continue
                    found.append((os.path.relpath(path, folder), st.st_size, st.st_mtime_ns))
    return sorted(found)


# The folder listed (and its list hashed) once a run, whatever the encodings asked about: by prepare, then
# found here by the run's later questions.
_LISTED: dict[tuple, tuple[list, str]] = {}


def _where(cfg, encoding: str) -> tuple[Path, list]:
    """(the pack's folder for this encoding, the file list it is keyed by)."""
    folder = Path(cfg.data).resolve()
    if (folder, cfg.val_dir) not in _LISTED:
        files = _files(folder, cfg.val_dir)
        h = hashlib.sha256()
        for rel, size, mtime in files:
            h.update(f"{rel}\t{size}\t{mtime}\n".encode())
        _LISTED[folder, cfg.val_dir] = files, h.hexdigest()
    files, listed = _LISTED[folder, cfg.val_dir]
    key = hashlib.sha256(f"{cfg.resize}|{cfg.val_dir}|{encoding}|{QUALITY}|{listed}".encode()).hexdigest()
    name = f"{folder.name}-{cfg.resize.replace('x', '-')}-{encoding}-{key[:16]}"
    return Path(cfg.cache_dir or default_cache_dir()) / "packed" / name, files


def location(cfg) -> Path | None:
    """The pack this run trains from, or None when it reads --data as it is."""
    if cfg.pack not in ("raw", "jpeg") or why_not(cfg):
        return None
    return _where(cfg, cfg.pack)[0]


def estimate(folder: Path, files: list, resize: str) -> tuple[float, float]:
    """(raw bytes, JPEG bytes) of the pack, from the headers of HEADERS files spread over the list and the
    resized, encoded pixels of ENCODED of them."""
    picks = [files[i][0] for i in np.linspace(0, len(files) - 1, min(HEADERS, len(files))).astype(int)]
    resizer = Resize(parse_resize(resize))
    raw, ratios = [], []
    for k, rel in enumerate(picks):
        try:
            with Image.open(folder / rel) as img:
                w, h = resizer.target(*img.size)
        except DECODE_ERRORS:
            continue
        raw.append(w * h * 3)
        if k % max(len(picks) // ENCODED, 1) == 0:  # stored as packing stores it
            data, h, w, error, _ = packed.stored_image(str(folder / rel), resize, "jpeg", QUALITY)
            if error is None:
                ratios.append(len(data) / (h * w * 3))
    if not raw:
        raise DataError(f"{folder}: none of {len(picks)} image files sampled could be read; `alexnet data check "
                        f"{folder}` lists the unreadable ones")
    total = float(np.mean(raw)) * len(files)
    return total, total * (float(np.mean(ratios)) if ratios else 0.15)


def _memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def prepare(cfg, log):
    """The settings with `pack` resolved to raw, jpeg or no, once the pack exists (made here when it does
    not, before any process group is joined): see the module's doc."""
    _LISTED.clear()  # the folder is listed again for each run: it may have changed since the last one
    reason = why_not(cfg)
    if reason == "not a folder here":  # a node of a multi-node job without its data: the ranks' agreement says so
        return cfg
    if reason is not None:
        if reason.startswith(("--random", "--val")):
            log(f"reading the files of {cfg.data} every epoch, not packing them: {reason}")
        return replace(cfg, pack="no")
    try:
        _where(cfg, "raw")
    except (DataError, OSError):  # a folder without its splits, or unreadable: the loaders say what is wrong
        return cfg
    try:
        with _one_at_a_time(cfg, log):
            try:
                return _found_or_made(cfg, log)
            except OSError as e:  # a cache folder that cannot be written, or that filled up while packing
                if not _of_the_cache(cfg, e):
                    raise
                if e.errno in FULL:  # removed while this process holds the folder's lock: no other is packing it
                    for encoding in packed.ENCODINGS:
                        shutil.rmtree(partial_of(_where(cfg, encoding)[0]), ignore_errors=True)
                return _unwritable(cfg, e, log)
    except OSError as e:  # the lock file itself could not be made: a cache folder that cannot be written
        if not _of_the_cache(cfg, e):
            raise
        if (encoding := _whole_pack(cfg)) is not None:  # a read-only cache that holds the pack already
            return _use(cfg, encoding, log)
        return _unwritable(cfg, e, log)


FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota (the usual limit of a home folder)
_FELL_BACK: set[Path] = set()  # data folders whose pack the cache folder could not take, in this process


def fell_back(cfg) -> bool:
    """Whether this process found the cache folder unable to take the pack of cfg.data (prepare): the
    launcher then tells its workers --pack no, instead of each trying again."""
    return cfg.data is not None and Path(cfg.data).resolve() in _FELL_BACK


def _of_the_cache(cfg, error: OSError) -> bool:
    """Whether `error` is the cache folder's (not the data's, nor the machine's): a full disk or quota, or
    an error on a path inside the cache folder."""
    if error.errno in FULL:
        return True
    cache = _where(cfg, "raw")[0].parent.parent.resolve()
    return bool(error.filename) and Path(os.fsdecode(error.filename)).resolve().is_relative_to(cache)


def _whole_pack(cfg) -> str | None:
    """The encoding of a complete, whole pack of the folder in the cache (None when there is none)."""
    for encoding in [cfg.pack] if cfg.pack != "auto" else ["raw", "jpeg"]:
        out = _where(cfg, encoding)[0]
        if packed.is_packed(out):
            try:
                packed.check_sizes(out)
            except DataError:
                continue
            return encoding
    return None


def _unwritable(cfg, error: OSError, log):
    """--pack auto trains from the files when the cache folder cannot take the pack; --pack raw or jpeg
    stops."""
    cache = _where(cfg, "raw")[0].parent
    why = cannot_write(cache, error)
    if cfg.pack != "auto":
        raise DataError(f"--pack {cfg.pack}: cannot pack {cfg.data} into {cache}: {why}; put the cache elsewhere "
                        f"(--cache-dir or ALEXNET_CACHE), or use --pack auto or no") from None
    log(f"WARNING: cannot pack {cfg.data} into {cache}: {why}; decoding its files every epoch instead (--cache-dir "
        f"or ALEXNET_CACHE puts the cache elsewhere; --pack no says to read the files)")
    _FELL_BACK.add(Path(cfg.data).resolve())
    return replace(cfg, pack="no")


@contextlib.contextmanager
def _one_at_a_time(cfg, log):
    """Held while this process looks for the folder's pack and makes it, so that runs started together on one
    folder (a sweep of seeds, or the nodes of a job whose cache folder is shared) make one pack: the others
    wait, then train from it."""
    out, _ = _where(cfg, "raw")
    out.parent.mkdir(parents=True, exist_ok=True)
    listed = _LISTED[Path(cfg.data).resolve(), cfg.val_dir][1]
    lock = out.parent / f".{Path(cfg.data).resolve().name}-{listed[:16]}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is packing {cfg.data} into {out.parent}; waiting for it to finish (lock {lock})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _found_or_made(cfg, log):
    folder = Path(cfg.data)
    choices = [cfg.pack] if cfg.pack != "auto" else ["raw", "jpeg"]
    made = [e for e in choices if packed.is_packed(_where(cfg, e)[0])]
    for encoding in made:  # a pack made before is used first, unless it is damaged (then it is made again)
        try:
            packed.check_sizes(_where(cfg, encoding)[0])
        except DataError as e:
            log(f"WARNING: the pack in the cache folder is damaged ({e}); removing it and packing again")
            shutil.rmtree(_where(cfg, encoding)[0])
            continue
        return _use(cfg, encoding, log)
    out, files = _where(cfg, choices[0])
    if not files:
        return cfg  # no images: the loaders say what is wrong
    raw, jpeg = estimate(folder.resolve(), files, cfg.resize)
    free, memory = shutil.disk_usage(out.parent).free, _memory()
    sizes = {"raw": raw, "jpeg": jpeg}
    fits = {"raw": raw <= free / 2 and (not memory or raw <= memory / 2), "jpeg": jpeg <= free / 2}
    chosen = next((e for e in choices if fits[e]), None)
    if chosen is None:
        why = (f"about {_size(raw)} as raw pixels and {_size(jpeg)} as JPEG, against half the {_size(free)} free "
               f"in {out.parent}" + (f" and half the {_size(memory)} of memory" if cfg.pack == "auto" else ""))
        if cfg.pack != "auto":
            raise DataError(f"--pack {cfg.pack}: {folder} would take {why}; free some space, put the cache "
                            f"elsewhere (--cache-dir or ALEXNET_CACHE), or use --pack auto or no")
        log(f"not packing {folder}: it would take {why}; decoding its files every epoch (--pack no to say so)")
        return replace(cfg, pack="no")
    out = _where(cfg, chosen)[0]
    log(f"packing {folder} once, for this and later runs, into {out} ({'raw pixels' if chosen == 'raw' else 'JPEG'},"
        f" about {_size(sizes[chosen])} of the {_size(free)} free; --pack no trains from the files)")
    cores = packed.available_cores() if len(files) >= SMALL else 0  # a pool's start costs more than a few images
    packed.pack(folder, out, cfg.resize, workers=cores, log=log, val_dir=cfg.val_dir, encoding=chosen,
                quality=QUALITY)
    return _use(cfg, chosen, log, packed_now=True)


def _use(cfg, encoding: str, log, packed_now: bool = False):
    out = _where(cfg, encoding)[0]
    meta = packed.read_meta(out)
    # the files packing left out as not images, said again for the runs after the first (by the launcher and
    # rank 0: the one whose log is the run's train.log)
    if not packed_now and os.environ.get("RANK", "0") == "0":
        if note := left_out(Counter(meta.get("left_out", {})), cfg.data):
            log(f"{note}, when it was packed")
    skipped = sum(_left_out_unreadable(meta))
    if skipped and cfg.on_bad_image == "error":
        raise DataError(f"unreadable image {_first_unreadable(meta)} (--on-bad-image skip skips such files)")
    log(f"training from the pack of {cfg.data} in {out} ({'raw pixels' if encoding == 'raw' else 'JPEG'}"
        + (f"; {skipped} unreadable file(s) left out, listed in {out / packed.META}" if skipped else "") + ")")
    return replace(cfg, pack=encoding)


def unreadable(root: Path) -> tuple[int, int]:
    """(training, validation) files a pack left out as unreadable: counted in every epoch's metrics as the
    files would have been."""
    return _left_out_unreadable(packed.read_meta(root))


def _left_out_unreadable(meta: dict) -> tuple[int, int]:
    splits = meta["splits"]
    return len(splits["train"]["skipped"]), len(splits["val"]["skipped"])


def _first_unreadable(meta: dict) -> str:
    return next(s["skipped"][0] for s in meta["splits"].values() if s["skipped"])


def given_pack_left_out(root: Path, on_bad_image: str, say) -> tuple[int, int]:
    """unreadable() of a pack given as --data (one made on first use says it in _use): said at start, and
    with --on-bad-image error a stop, as the files themselves would be."""
    meta = packed.read_meta(root)
    train, val = _left_out_unreadable(meta)
    if train + val:
        if on_bad_image == "error":
            raise DataError(f"unreadable image {_first_unreadable(meta)}, left out when {root} was packed "
                            f"(--on-bad-image skip counts such files)")
        say(f"{train + val} unreadable file(s) were left out when {root} was packed (listed in "
            f"{Path(root) / packed.META}): counted as bad_images and val_bad_images in every epoch")
    return train, val
