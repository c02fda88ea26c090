"""Evaluation: loss, top-1 and top-5 as sums and counts, reduced over processes; the `alexnet eval` command.

Each process evaluates its own disjoint part of the split (no padding, no repeats); the sums and counts
are added up over processes, so the result is the same for any number of processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, distributed
from .config import EvalConfig, check_crop, eval_crop, images_per_eval_batch
from .data import packed
from .data.batch import on_device
from .data.build import build_loaders
from .data.folder import VAL_DIRS, pool_dir
from .data.synthetic import ensure_dataset
from .errors import CheckpointError, ConfigError
from .runtime import autocast, resolve_device, resolve_precision, tune_allocator


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, channels_last: bool = False,
             confusion_classes: int = 0, amp_dtype: torch.dtype | None = None, augment=None) -> dict[str, float]:
    """Loss, top-1 and top-5 over the whole split; with `confusion_classes` = C also the C x C matrix of
    counts (row: true class, column: top-1 prediction) as "confusion". Batches of (images, views, 3, H, W)
    (test-time augmentation) are scored by the mean of the views' softmax outputs, the loss being the
    negative log of that mean at the true class."""
    model.eval()
    loss_sum, correct1, correct5, count, bad = 0.0, 0, 0, 0, 0
    c = confusion_classes
    confusion = torch.zeros(c * c, dtype=torch.int64)
    for batch in loader:
        views = batch[0].shape[1] if torch.is_tensor(batch[0]) and batch[0].dim() == 5 else 0  # test-time views per image
        images, target, n_bad = on_device(batch, device, channels_last, augment)
        bad += n_bad
        if target.numel() == 0:
            continue
        with autocast(device, amp_dtype):
            outputs = model(images)
        if views:  # the softmax outputs averaged over the views (the paper's 10-patch prediction)
            scores = outputs.float().softmax(dim=1).view(target.numel(), views, -1).mean(dim=1)
            loss_sum += float(nn.functional.nll_loss(scores.clamp_min(1e-12).log(), target, reduction="sum"))
        else:
            scores = outputs.float()  # logits: the same ranking as their softmax
            loss_sum += float(nn.functional.cross_entropy(scores, target, reduction="sum"))
        c1, c5 = topk_correct(scores, target)
        correct1, correct5, count = correct1 + c1, correct5 + c5, count + target.numel()
        if c:
            confusion += torch.bincount((target * c + scores.argmax(dim=1)).cpu(), minlength=c * c)
    summed = distributed.sum_all([loss_sum, correct1, correct5, count, bad, *confusion.tolist()])
    loss_sum, correct1, correct5, count, bad = summed[:5]
    count = int(count)
    metrics = {"loss": loss_sum / max(count, 1), "acc1": correct1 / max(count, 1),
               "acc5": correct5 / max(count, 1), "count": count, "correct1": int(correct1),
               "correct5": int(correct5), "bad_images": int(bad)}
    if c:
        metrics["confusion"] = [[int(v) for v in summed[5 + i * c:5 + (i + 1) * c]] for i in range(c)]
    return metrics


def _moved(given: str | None, held_out: list[str] | None) -> bool:
    """Whether --data is the run's folder moved or copied: it has no validation folder, and holds every file
    the run held out for validation (--val-fraction), which are then what is evaluated."""
    if not given or held_out is None or not Path(given).is_dir() or packed.is_packed(given):
        return False
    root = Path(given)
    pool = root / pool_dir(root)
    return not any((root / name).is_dir() for name in VAL_DIRS) and all((pool / f).is_file() for f in held_out)


def _same_data(given: str | None, trained_on: str | None) -> bool:
    """Whether --data (None: not given) is the folder the model was trained on."""
    return given is None or trained_on is not None and Path(given).resolve() == Path(trained_on).resolve()


def split_name(val_set) -> str:
    """Which images a validation split holds, in words: a folder of the data, a pack's split, or the files
    that training held out."""
    folder = Path(val_set.root) / val_set.split
    if getattr(val_set, "held_out", None) is not None:
        return f"the images of {folder} held out from training"
    return f"the {val_set.split} split of {val_set.root}" if packed.is_packed(val_set.root) else str(folder)


def _say(note: str) -> None:
    """What evaluating says of the data, on stderr, so that stdout holds the result alone (--json): notes
    once (rank 0), the same for every rank; warnings, which may be a rank's own (its device), by every rank."""
    if note.startswith("WARNING"):
        print(f"[rank {distributed.rank()}] {note}" if distributed.world_size() > 1 else note, file=sys.stderr,
              flush=True)
    elif distributed.is_main():
        print(note, file=sys.stderr, flush=True)


def run(cfg: EvalConfig, log=print) -> dict[str, float]:
    tune_allocator()
    state = checkpoint.load_run(cfg.checkpoint)
    tcfg = state["config"]
    resize = cfg.resize if cfg.resize is not None else tcfg["resize"]
    crop = cfg.crop if cfg.crop is not None else eval_crop(tcfg)
    data = cfg.data or tcfg["data"]
    if cfg.data is None and data is not None and not Path(data).exists():
        relative = "" if Path(data).is_absolute() else ", a path relative to the folder the training started in"
        raise ConfigError(f"{cfg.checkpoint} was trained on {data!r}{relative}, which does not exist here: give "
                          f"the data's folder with --data")
    if data is not None and packed.is_packed(data):  # the stored size first: it is what --resize must be
        packed.check_resize(data, resize)
    check_crop(resize, crop)
    device = distributed.setup(resolve_device(cfg.device), cfg.backend, cfg.dist_timeout, log)
    if data is None:
        data = ensure_dataset(tcfg["synthetic_seed"], cfg.cache_dir or tcfg["cache_dir"],
                              log=log if distributed.is_main() else (lambda *a: None))
    # the run's model (train.state knows what a checkpoint holds; imported here, as training uses this module)
    from .train.state import model_from_checkpoint
    loaders = build_loaders(data, device, train=None, val=dict(resize=resize, crop=crop, mean=tcfg["mean"],
                                                             std=tcfg["std"], tta=cfg.tta),
                          batch_size=cfg.batch_size, eval_batch=images_per_eval_batch(cfg.batch_size, cfg.tta),
                          workers=cfg.workers, rank=distributed.rank(), world=distributed.world_size(),
                          jpeg_decode=cfg.jpeg_decode, classes=list(state["classes"]),
                          val_dir=cfg.val_dir or (tcfg.get("val_dir") if cfg.data is None else None),
                          val_files=state.get("val_files") if not cfg.val_dir and (
                              _same_data(cfg.data, tcfg["data"]) or _moved(cfg.data, state.get("val_files"))) else None,
                          say=_say)
    if loaders.val_set.classes != list(state["classes"]):
        raise CheckpointError(f"{cfg.checkpoint} was trained on other classes than {data} holds")
    loader, augment = loaders.val, loaders.val_augment
    model = model_from_checkpoint(state).to(device)
    classes = list(state["classes"])
    # the run's own precision, as its validation used (checkpoints from before --precision were fp32)
    amp_dtype = resolve_precision(tcfg.get("precision", "fp32"), device, tcfg.get("deterministic", False))
    metrics = evaluate(model, loader, device, confusion_classes=len(classes) if cfg.confusion else 0,
                       amp_dtype=amp_dtype, augment=augment)
    if not distributed.is_main():
        return metrics
    if cfg.json:
        json.dump({**metrics, "resize": resize, "crop": crop, "tta": cfg.tta}, sys.stdout)
        print(flush=True)
    else:
        views = {"none": "", "flip": ", 2 views each", "10crop": ", 10 views each"}[cfg.tta]
        skipped = (f"; {metrics['bad_images']} unreadable, left out (alexnet data check lists them)"
                   if metrics["bad_images"] else "")
        print(f"{cfg.checkpoint} on {split_name(loaders.val_set)} ({metrics['count']} images{skipped}, resize {resize}, "
              f"crop {crop}{views}): "
              f"loss {metrics['loss']:.4f}  "
              f"top-1 {metrics['acc1']:.2%}  top-5 {metrics['acc5']:.2%}", flush=True)
    if cfg.confusion:  # after the figures are out: a failed write loses no result
        from .plots import confusion_figure, save
        title = (f"{Path(cfg.checkpoint).name} on {split_name(loaders.val_set)}: top-1 {metrics['acc1']:.2%} of "
                 f"{metrics['count']}")
        save(confusion_figure(metrics["confusion"], classes, title), cfg.confusion)
        if not cfg.json:
            print(f"confusion matrix: {cfg.confusion}")
    return metrics
