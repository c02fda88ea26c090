"""ImageFolder datasets: DIR/<split>/<class>/<image>, checked at start with clear errors."""

from __future__ import annotations

import hashlib
import os
import statistics
from collections import Counter
from pathlib import Path

from PIL import Image

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .images import DECODE_ERRORS, EXTENSIONS, TooLarge, is_image_name, load_rgb, unreadable
from .jpeg import read_encoded
from .transforms import Compose, sample_generator


# Names of the validation split's folder, in the order they are looked for: the ImageFolder habit, then
# what Kaggle-style and other distributed datasets use.
VAL_DIRS = ("val", "valid", "validation", "test")
LAYOUT = "DIR/train/<class>/ and DIR/val/<class>/ (or valid/, validation/, test/)"


def val_dir_of(root: Path, name: str | None = None, hold_out: bool = True) -> str:
    """The validation split's folder under `root`: `name` (--val-dir) when given, else the first of
    VAL_DIRS that exists. `hold_out`: the command takes --val-fraction (its error suggests it)."""
    if name:
        name = name.rstrip("/") or name  # `test/`, as a shell completes it
        if Path(name).name != name or name in (".", ".."):
            raise DataError(f"--val-dir {name!r}: give the name of a folder inside {root}, not a path")
        if not (root / name).is_dir():
            raise DataError(f"--val-dir {name}: {root / name} does not exist")
        if name == "train":
            raise DataError("--val-dir train: that is the training split, which would be validated on the images "
                            "it trains on; give another folder, or hold out a share of it with --val-fraction")
        return name
    for candidate in VAL_DIRS:
        if (root / candidate).is_dir():
            return candidate
    share = 'train/' if (root / 'train').is_dir() else 'the class folders'
    raise DataError(f"{root} has no validation folder (looked for {', '.join(f'{v}/' for v in VAL_DIRS)}); "
                    f"expected the layout {LAYOUT}; name the folder with --val-dir NAME"
                    + (f", or hold out a share of {share} with --val-fraction 0.1" if hold_out else ""))


def not_a_data_folder(root: Path) -> DataError:
    """The error for a --data that is missing or not a folder."""
    if root.exists():
        return DataError(f"data folder {root} is a file, not a folder; expected the layout {LAYOUT}")
    return DataError(f"data folder {root} does not exist")


def check_val_classes(root: Path, val: str, train_classes: list[str]) -> list[str]:
    """The validation split's class folders, refused when some are not among the training classes."""
    classes = find_classes(root / val)
    missing = sorted(set(classes) - set(train_classes))
    if missing:
        raise DataError(f"{root / val} has classes that {root / 'train'} lacks: {', '.join(missing[:5])}")
    return classes


def find_classes(split_dir: Path, hold_out: bool = True) -> list[str]:
    """The class folders of a split. `hold_out`: the command takes --val-fraction (the error for a folder of
    class folders without train/ suggests it)."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} does not exist; expected the layout {LAYOUT}{_as_it_is(split_dir, hold_out)}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        flat = any(e.is_file() and is_image_name(e.name) for e in os.scandir(split_dir))
        imagenet = (f", as ImageNet's validation images come: sort them into a folder per class (the PyTorch "
                    f"ImageNet example's extract_ILSVRC.sh does it for ImageNet)" if split_dir.name in VAL_DIRS
                    else ": put each class's images in a folder of its own")
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>"
                        + (f". Its images lie directly in it{imagenet}" if flat else ""))
    return classes


def _as_it_is(split_dir: Path, hold_out: bool) -> str:
    """What the folder above a missing train/ holds instead, and what to do with it."""
    root = split_dir.parent
    try:
        entries = [e for e in os.scandir(root) if not e.name.startswith(".")] if split_dir.name == "train" else []
    except OSError:
        return ""
    folders = sorted(e.name for e in entries if e.is_dir() and e.name not in VAL_DIRS)
    if root.name == "train" and any((root.parent / v).is_dir() for v in VAL_DIRS):
        return f". {root} is itself a training folder: give the folder above it, --data {root.parent}"
    if folders and hold_out:
        shown = ", ".join(f"{f}/" for f in folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
        return (f". {root} holds {len(folders)} folder(s) ({shown}): if they are the classes, --val-fraction 0.1 "
                f"trains on them and holds a tenth of each out for validation")
    if any(e.is_file() and is_image_name(e.name) for e in entries):
        return f". {root} holds images but no class folders: put each class's images in a folder of its own"
    return ""


def scan(split_dir: Path, classes: list[str], others: Counter | None = None) -> list[tuple[str, int]]:
    """(path, label) of the image files in the class folders of `split_dir`, sorted; `others` counts the
    files left out as not images by their names, by extension (hidden files aside)."""
    samples = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        found = []
        for root, _, files in os.walk(folder, followlinks=True):
            for f in files:
                if is_image_name(f):
                    found.append(os.path.join(root, f))
                elif others is not None and not f.startswith("."):
                    others[extension_of(f)] += 1
        if not found:
            raise DataError(f"class folder {folder} holds no images ({', '.join(EXTENSIONS)})")
        samples += [(p, label) for p in sorted(found)]
    return samples


def extension_of(name: str) -> str:
    """What a file that is not an image by its name is counted under (scan's `others`)."""
    return os.path.splitext(name)[1].lower() or "(no extension)"


def by_extension(others: Counter) -> str:
    """`others` (counts by extension) in words, the most common first: "40 .heic, 2 .txt"."""
    return ", ".join(f"{n} {ext}" for ext, n in sorted(others.items(), key=lambda kv: (-kv[1], kv[0])))


def left_out(others: Counter, root, class_folders: bool = True) -> str:
    """The note for files that are not read, not being images by their names (empty when there are none):
    those of a dataset's class folders, or (`class_folders` false) of the folder `root` itself."""
    if not others:
        return ""
    where = f"{root}'s class folders" if class_folders else str(root)
    return (f"left out {sum(others.values())} file(s) of {where} that are not images by their names "
            f"({by_extension(others)})")


class ImageFolder(Dataset):
    """One split of an ImageFolder tree. Items are fetched by index, or by (epoch, index) so that the
    random augmentation of a sample depends only on (seed, epoch, index)."""

    def __init__(self, root: str | Path, split: str, transform: Compose, seed: int = 0,
                 classes: list[str] | None = None, on_bad_image: str = "skip",
                 samples: list[tuple[str, int]] | None = None) -> None:
        """`samples` ((path, label) pairs, with `classes`): these files of the split's folder, not all of them
        (a held-out split, see held_out)."""
        self.root, self.split = Path(root), split
        split_dir = self.root / split
        own = find_classes(split_dir)
        if classes is None:
            classes = own
        else:
            extra = sorted(set(own) - set(classes))
            if extra and samples is None:
                raise DataError(f"{split_dir} has classes the model does not know: {', '.join(extra[:5])}"
                                + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
        self.classes = list(classes)
        self.left_out = Counter()  # files of its class folders not read: not images by their names
        self.samples = scan(split_dir, self.classes, self.left_out) if samples is None else samples
        if not self.samples:
            raise DataError(f"{split_dir} holds no images")
        self.held_out: list[str] | None = None  # a held-out validation split: its files, relative to split_dir
        self.transform, self.seed, self.on_bad_image = transform, seed, on_bad_image
        self.batch = None  # a BatchAugment: decode and resize here, the rest on whole batches (see data.batch)
        self.decode_on_device = False  # with `batch`: JPEG files decoded on the GPU (see data.jpeg)

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self, sizes: bool = True) -> dict:
        """What two copies of this split must agree on: its image count, its classes, and a hash of each
        file's path relative to the split's folder, size and label (not where the copy lies, nor its
        modification times). Without `sizes`, no file is read (what a checkpoint records)."""
        base = self.root / self.split
        # the paths' common start (scan's and held_out's) sliced off: seconds quicker than pathlib on
        # ImageNet's 1.28 million files (POSIX paths, as everywhere this runs)
        prefix = str(base) + "/"
        h = hashlib.sha256()
        for path, label in self.samples:
            try:
                size = os.stat(path).st_size if sizes else 0
            except OSError:
                size = -1
            rel = path[len(prefix):] if path.startswith(prefix) else Path(path).relative_to(base).as_posix()
            h.update(f"{rel}\t{size}\t{label}\n".encode())
        return {"images": len(self.samples), "classes": list(self.classes), "files": h.hexdigest()}

    def __getitem__(self, key) -> tuple[torch.Tensor, int] | None:
        """The transformed image and its label; None for an unreadable file under on_bad_image="skip"
        (the loader's collate drops it and counts it)."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        self.transform.at_epoch(epoch)
        path, label = self.samples[index]
        if self.decode_on_device:
            encoded = read_encoded(path, self.batch, sample_generator(self.seed, epoch, index))
            if encoded is not None:
                return encoded, label
        try:
            img = load_rgb(path)
        except DECODE_ERRORS as e:  # truncated, corrupt, empty, not an image
            unreadable(path, e, strict=self.on_bad_image == "error")
            return None
        g = sample_generator(self.seed, epoch, index)
        try:
            if self.batch is not None:
                return self.batch.sample(self.batch.resize(img), g), label
            return self.transform(img, g), label
        except TooLarge as e:  # a sliver whose resize would be billions of pixels
            unreadable(path, e, strict=self.on_bad_image == "error")
            return None


def pool_dir(root: Path) -> str:
    """Where --val-fraction holds out from: train/, or with none, the folder itself (only class folders)."""
    return "train" if (root / "train").is_dir() else "."


def held_out(root: Path, fraction: float, split_seed: int,
             others: Counter | None = None) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(classes, train samples, validation samples) of the image folder `root` with a share `fraction` of
    each class of pool_dir(root) held out for validation: round(fraction x n) of a class's n files, at least
    one where it has two or more, chosen by a hash of (split_seed, the file's path relative to the pool).
    The split depends on the file list and `split_seed` only: not on --seed, the machine or the file order.
    `others`: as scan's."""
    pool = root / pool_dir(root)
    classes = find_classes(pool)
    train, val = [], []
    for label in range(len(classes)):
        files = scan(pool, classes[label:label + 1], others)
        ranked = sorted(files, key=lambda f: hashlib.sha256(
            f"{split_seed}/{Path(f[0]).relative_to(pool).as_posix()}".encode()).digest())
        n = len(ranked)
        k = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
        val += [(path, label) for path, _ in sorted(ranked[:k])]
        train += [(path, label) for path, _ in sorted(ranked[k:])]
    if not val:
        raise DataError(f"--val-fraction {fraction:g} holds out no image of {pool}: every class needs two images or more")
    return classes, train, val


def open_splits(root: str | Path, train_transform: Compose, eval_transform: Compose, seed: int,
                on_bad_image: str = "skip", val_dir: str | None = None, val_fraction: float = 0.0,
                split_seed: int = 0):
    """(train, validation) ImageFolders of `root`: train/ and the validation folder (val_dir_of), or with
    `val_fraction`, the two parts of pool_dir(root) (held_out)."""
    root = Path(root)
    if not root.is_dir():
        raise not_a_data_folder(root)
    if val_fraction:
        others = Counter()
        classes, train_samples, val_samples = held_out(root, val_fraction, split_seed, others)
        pool = pool_dir(root)
        train = ImageFolder(root, pool, train_transform, seed, classes, on_bad_image, samples=train_samples)
        train.left_out = others  # the pool's, said once
        val = ImageFolder(root, pool, eval_transform, seed, classes, on_bad_image, samples=val_samples)
        val.held_out = [Path(path).relative_to(root / pool).as_posix() for path, _ in val_samples]
        return train, val
    train = ImageFolder(root, "train", train_transform, seed, on_bad_image=on_bad_image)
    val_dir = val_dir_of(root, val_dir)
    check_val_classes(root, val_dir, train.classes)
    val = ImageFolder(root, val_dir, eval_transform, seed, classes=train.classes, on_bad_image=on_bad_image)
    return train, val


def held_out_folder(root: Path, files: list[str], classes: list[str], transform: Compose, seed: int = 0,
                    on_bad_image: str = "skip") -> ImageFolder:
    """The held-out validation split a run recorded (`files`, relative to pool_dir(root), as
    ImageFolder.held_out), for `alexnet eval` on that run's data."""
    pool = pool_dir(root)
    index = {name: label for label, name in enumerate(classes)}
    samples = []
    for name in files:
        path = root / pool / name
        if not path.is_file():
            raise DataError(f"{path}, held out for validation when the model was trained, is gone; evaluate "
                            f"another folder with --data DIR")
        samples.append((str(path), index[Path(name).parts[0]]))
    folder = ImageFolder(root, pool, transform, seed, classes, on_bad_image, samples=samples)
    folder.held_out = list(files)
    return folder


def median_short_side(root: Path, classes: int = 20, per_class: int = 10) -> int | None:
    """The median shorter side, in pixels, of a sample of the training images of the image folder `root`
    (up to `per_class` files from each of up to `classes` class folders spread over the sorted list), read
    from the files' headers: cheap on ImageNet-sized folders. None when there is nothing to read."""
    split = root / pool_dir(root)
    try:
        folders = sorted(e.path for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return None
    sides = []
    for folder in folders[::max(1, len(folders) // classes)][:classes]:
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name))
        except OSError:
            continue
        for name in names[:per_class]:
            try:
                with Image.open(os.path.join(folder, name)) as img:
                    sides.append(min(img.size))
            except DECODE_ERRORS:
                continue
    return int(statistics.median(sides)) if sides else None
