"""The one place where datasets become loaders, for `alexnet train`, `alexnet eval` and `alexnet bench`.

It takes plain values (sizes, flags, statistics: the arguments of `train_transform` and `eval_transform`),
never a command's settings object, and picks the path each split takes: a packed dataset or JPEG files;
on the batch path or per image; decoded in the workers or on the GPU; held in the device's memory or read
by the workers (see data.batch, data.jpeg and data.held)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import DataError
from . import packed
from .batch import jpeg_on_gpu, main_process_augment
from .folder import VAL_DIRS, ImageFolder, held_out_folder, left_out, open_splits, val_dir_of
from .loader import make_loader
from .transforms import eval_transform, train_transform


class Loaders(NamedTuple):
    train_set: object  # None when only validation was asked for
    val_set: object  # None when only training was asked for
    train: torch.utils.data.DataLoader | None
    val: torch.utils.data.DataLoader | None
    train_augment: object  # the batch augmentation the main process finishes batches with (or None)
    val_augment: object

    @property
    def classes(self) -> list[str]:
        return (self.train_set if self.train_set is not None else self.val_set).classes


def build_loaders(root: str | Path, device: torch.device, *, train: dict | None, val: dict | None, batch_size: int,
                  eval_batch: int, workers: int, seed: int = 0, rank: int = 0, world: int = 1,
                  on_bad_image: str = "skip", jpeg_decode: str = "auto", data_on_device: str = "no",
                  classes: list[str] | None = None, persistent: bool = True, val_dir: str | None = None,
                  val_fraction: float = 0.0, split_seed: int = 0, val_files: list[str] | None = None,
                  say=print) -> Loaders:
    """Loaders of the train split (`train`: train_transform's arguments) and the validation split (`val`:
    eval_transform's; with `classes`, those of the model it is for), either of which may be None. The
    validation split of an image folder is `val_dir` under `root`, or the first of folder.VAL_DIRS; with
    `val_fraction`, a share of each class held out (folder.held_out), or for evaluation alone the held-out
    `val_files` a run recorded."""
    if val_fraction and packed.is_packed(root):
        raise DataError(f"--val-fraction: {root} is a packed dataset, whose validation split was chosen when it "
                        f"was packed (`alexnet data pack DIR OUT --val-fraction F`); drop --val-fraction")
    if workers > (cores := packed.available_cores()):
        say(f"WARNING: --workers {workers} is more than the {cores} core{'s' * (cores > 1)} this process may use: the "
            f"loader processes take turns on them with the model's threads, so {cores} or fewer is usually faster")
    held = dict(val_dir=val_dir, val_fraction=val_fraction, split_seed=split_seed, val_files=val_files)
    splits = _open(root, device, train, val, seed, on_bad_image, jpeg_decode, classes, held, say)
    packed.hold_on_device([s for s in splits if s is not None], device, data_on_device, say)
    packed.decode_in_main_process([s for s in splits if s is not None], device, workers, jpeg_decode)
    loaders = [make_loader(s, size, workers, train=s is splits[0], seed=seed, pin_memory=device.type == "cuda",
                           rank=rank, world=world, device_type=device.type, persistent=persistent)
               if s is not None else None for s, size in zip(splits, (batch_size, eval_batch))]
    augments = [main_process_augment(s, device) if s is not None else None for s in splits]
    return Loaders(*splits, *loaders, *augments)


def _open(root, device, train, val, seed, on_bad_image, jpeg_decode, classes, held, say) -> list:
    transforms = (train_transform(**train) if train is not None else None,
                  eval_transform(**val) if val is not None else None)
    if packed.is_packed(root):
        resize = (train or val)["resize"]
        if train is not None and train.get("random_resized_crop"):
            warn_smaller_than_source(root, resize, say)
        tf_train, tf_val = transforms
        splits = list(packed.open_splits(root, resize, tf_train or tf_val, tf_val or tf_train, seed))
    elif train is not None:
        splits = list(open_splits(root, *(t or transforms[0] for t in transforms), seed, on_bad_image=on_bad_image,
                                  val_dir=held["val_dir"], val_fraction=held["val_fraction"],
                                  split_seed=held["split_seed"]))
    elif held["val_files"] is not None:
        splits = [None, held_out_folder(Path(root), held["val_files"], classes, transforms[1], seed, on_bad_image)]
    else:
        val_dir = val_dir_of(Path(root), held["val_dir"], hold_out=False) if Path(root).is_dir() else "val"
        splits = [None, ImageFolder(root, val_dir, transforms[1], seed, classes=classes, on_bad_image=on_bad_image)]
    if getattr(splits[1], "held_out", None) is not None:
        unused = next((f"; {Path(root) / v} is not used" for v in VAL_DIRS if (Path(root) / v).is_dir()), "")
        say(f"validation split: {len(splits[1])} images held out of {Path(root) / splits[1].split} "
            f"(--val-fraction {held['val_fraction']:g}, --split-seed {held['split_seed']}){unused}"
            if held["val_files"] is None else f"validation split: the {len(splits[1])} images held out when the "
            f"model was trained")
    elif not packed.is_packed(root) and splits[1].split != "val":
        say(f"validation split: {Path(root) / splits[1].split}")
    splits = [s if t is not None else None for s, t in zip(splits, transforms)]
    if note := left_out(sum((getattr(s, "left_out", Counter()) for s in splits if s is not None), Counter()), root):
        say(note)
    if not packed.is_packed(root) or splits[0 if splits[0] is not None else 1].encoding == "jpeg":
        jpeg_on_gpu([s for s in splits if s is not None], device, jpeg_decode, say)
    return splits


def fingerprint(loaders: Loaders, sizes: bool = True) -> dict:
    """What every rank's copy of the data must agree on (see ImageFolder.fingerprint), split by split;
    without `sizes`, what a checkpoint records of its data (no file read)."""
    return {name: split.fingerprint(sizes) for name, split in (("training", loaders.train_set),
                                                              ("validation", loaders.val_set)) if split is not None}


def changed(before: dict, now: dict) -> str | None:
    """How the data a run resumes on differs from what its checkpoint recorded (fingerprint without sizes);
    None when it does not, or when the checkpoint recorded nothing."""
    for split, then in before.items():
        if split not in now or now[split] == then:
            continue
        mine = now[split]
        if (mine.get("encoding"), mine.get("resize")) != (then.get("encoding"), then.get("resize")):
            continue  # the files, a pack or another pack: neither counts (packs leave unreadable files out) nor hashes compare
        if mine["images"] != then["images"]:
            return f"{mine['images']:,} {split} images where it had {then['images']:,}"
        return f"the same number of {split} images, but other files (names{', sizes' if 'encoding' in mine else ''} or labels)"
    return None


def disagreement(found: list[tuple[str, str, dict]]) -> str | None:
    """What is wrong when the ranks' data differ: `found` holds each rank's (host, data folder, outcome),
    the outcome being {"fingerprint": ...} or {"error": message} for a rank that could not open its data.
    None when every rank opened the same data."""
    for rank, (host, root, outcome) in enumerate(found):
        if "error" in outcome:
            return f"rank {rank} on {host} could not open its data: {outcome['error']}"
    _, root0, first = found[0]
    for rank, (host, root, outcome) in enumerate(found[1:], start=1):
        for split, mine in outcome["fingerprint"].items():
            theirs = first["fingerprint"][split]
            if mine == theirs:
                continue
            if mine.get("encoding") != theirs.get("encoding"):
                return (f"the ranks' data differ: rank {rank} on {host} ({root}) reads "
                        f"{_form(mine)} where rank 0 ({found[0][0]}, {root0}) reads {_form(theirs)}. Give every "
                        f"node the same --data and the same --pack (raw, jpeg or no: auto chooses by each node's "
                        f"own free disk and memory)")
            elif mine["classes"] != theirs["classes"]:
                odd = sorted(set(mine["classes"]) ^ set(theirs["classes"]))
                what = (f"other classes than rank 0 ({found[0][0]}, {root0}): {', '.join(odd[:3])} in one and not "
                        f"the other" if odd else f"its classes in another order than rank 0 ({found[0][0]})")
            elif mine["images"] != theirs["images"]:
                what = f"{mine['images']:,} {split} images where rank 0 ({found[0][0]}, {root0}) has {theirs['images']:,}"
            else:
                what = (f"the same number of {split} images as rank 0 ({found[0][0]}, {root0}), but other files "
                        f"(names, sizes or labels)")
            return (f"the ranks' copies of the data differ: rank {rank} on {host} ({root}) has {what}. Every "
                    f"node must hold the same copy (copy it from one node to the others, whole), or the ranks "
                    f"would train on overlapping shards")
    return None


def _form(fingerprint: dict) -> str:
    return {"raw": "a raw pack", "jpeg": "a JPEG pack"}.get(fingerprint.get("encoding"), "image files")


def warn_smaller_than_source(root: str, resize: str, say) -> None:
    """Random-resized crops of packed images are cut from the stored pixels: where those are fewer than the
    source file's, small crops are enlarged from less detail than the JPEG path would give them."""
    smaller, images = packed.smaller_than_source(root)
    if smaller == 0:
        return
    what = (f"{smaller} of its {images} training images are stored with fewer pixels than their source "
            f"files" if smaller is not None else "it may store images with fewer pixels than their source files "
            f"(packed by an older version, which did not record it; pack again to know)")
    say(f"WARNING: --random-resized-crop on packed data crops the images stored at --resize {resize}, and {what}: "
        f"their small crops are enlarged from less detail than from the JPEG files (pack at a larger --resize "
        f"or train from the JPEG files to avoid it)")


def describe(dataset, device: torch.device) -> str:
    """How a split's images reach the model, for the run's first lines ("" for the plain CPU JPEG path)."""
    kind = "JPEG" if not isinstance(dataset, packed.PackedSplit) else (
        "packed" if dataset.encoding == "raw" else "packed as JPEG")
    if dataset.batch is None:
        if kind == "JPEG" and device.type == "cpu":  # the plain CPU JPEG path
            return ""
        return f" ({kind}; per-image augmentation: rotation has no batch path)"
    batch_decoded = getattr(dataset, "decode_on_device", False)
    decoded = ("" if not batch_decoded else
               "; decoded by the main process" if device.type == "cpu" else "; decoded on the device")
    held = getattr(dataset, "held", False)
    if held:
        decoded += ("; crops read from the memory map by the main process" if device.type == "cpu"
                    else f"; held in {device} memory")
    where = "in the loader workers" if device.type == "cpu" and not held and not batch_decoded else "on " + str(device)
    return f" ({kind}{decoded}; batch augmentation {where})"
