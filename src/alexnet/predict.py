"""`alexnet predict`: top-k classes with probabilities for image files and folders."""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import Counter

import torch

from .config import PredictConfig
from .data import eval_transform, load_rgb
from .data.folder import extension_of, left_out
from .data.images import DECODE_ERRORS, TooLarge, is_image_name, unreadable
from .export import load_predictor
from .errors import ConfigError, DataError
from .runtime import resolve_device


def expand(paths) -> list[str]:
    """Image files in the order given: files as they are, folders walked (sorted), and glob patterns
    ('shots/*.jpg', 'data/**/*.png', quoted so that the shell leaves them to us) expanded, sorted."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = [(r, f) for r, _, fs in os.walk(p) for f in fs]
            named = [os.path.join(r, f) for r, f in found if is_image_name(f)]
            special = [f for f in named if os.path.exists(f) and not os.path.isfile(f)]  # a broken link: unreadable
            files += sorted(set(named) - set(special))
            others = Counter(extension_of(f) for _, f in found if not is_image_name(f) and not f.startswith("."))
            if note := left_out(others, p, class_folders=False):
                print(note, file=sys.stderr, flush=True)
            if special:  # a pipe would wait for a writer forever
                print(f"{p}: {len(special)} entr{'ies' if len(special) > 1 else 'y'} named like images but not regular "
                      f"files (pipes, sockets, devices) left out, such as {special[0]}", file=sys.stderr, flush=True)
        elif os.path.exists(p):  # a file; or named on purpose, a pipe: `alexnet predict <(curl -s URL)`
            files.append(p)
        elif glob.has_magic(p):
            matched = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f) and is_image_name(f))
            if not matched:
                raise ConfigError(f"no image file matches {p!r}")
            files += matched
        else:
            raise ConfigError(f"{p!r} is not a file, folder or glob pattern")
    if not files:
        raise ConfigError("no images given (pass image files, folders or glob patterns)")
    return files


def run(cfg: PredictConfig) -> tuple[list[dict], int]:
    """Predict and print; (the predictions, how many images were unreadable and skipped)."""
    files = expand(cfg.images)
    device = resolve_device(cfg.device)
    predictor = load_predictor(cfg.checkpoint, device, device_asked=cfg.device != "auto")
    device = predictor.device
    meta, classes = predictor.meta, predictor.classes
    transform = eval_transform(meta["resize"], meta["crop"], meta["mean"], meta["std"])
    k = min(cfg.topk, len(classes))
    results, skipped = [], 0
    for i in range(0, len(files), cfg.batch_size):
        asked = files[i:i + cfg.batch_size]
        opened = [(f, x) for f in asked if (x := _open(f, transform)) is not None]
        skipped += len(asked) - len(opened)
        if not opened:
            continue
        batch = torch.stack([x for _, x in opened]).to(device)
        probs = predictor(batch).float().softmax(dim=1)
        top = probs.topk(k, dim=1)
        for (f, _), p, idx in zip(opened, top.values.tolist(), top.indices.tolist()):
            r = {"image": f, "top": [{"class": classes[j], "prob": q} for j, q in zip(idx, p)]}
            results.append(r)
            _say(json.dumps(r) if cfg.json else f"{f}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
        _say(None)  # each batch as it is done: an interrupted run keeps what it predicted
    if skipped == len(files):
        raise DataError(f"{files[0] if len(files) == 1 else f'none of the {len(files)} images'} could not be read "
                        f"(see above)")
    if skipped:
        print(f"alexnet predict: {skipped} of {len(files)} images were unreadable and skipped (listed above)",
              file=sys.stderr)
    return results, skipped


def _say(line: str | None) -> None:
    """A line of predictions on stdout (None: flush them). When the reader has closed the pipe (`alexnet
    predict DIR | head`), the command ends quietly, as a process ended by SIGPIPE does."""
    try:
        if line is None:
            sys.stdout.flush()
        else:
            print(line)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        raise SystemExit(141) from None


def _open(path: str, transform) -> torch.Tensor | None:
    """The image at `path` as the model takes it; None, said on stderr, when it cannot be read, or its resize
    would be too large (the others are still predicted)."""
    try:
        img = load_rgb(path)
    except DECODE_ERRORS as e:
        unreadable(path, e, strict=False)
        return None
    try:
        return transform(img)
    except TooLarge as e:  # its resize would be too large; any other error of the transform is not the file's
        unreadable(path, e, strict=False)
        return None
