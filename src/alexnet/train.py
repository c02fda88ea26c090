"""Training: fit() builds everything, then loops over epochs; train_one_epoch() returns its metrics."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .config import TrainConfig, save_yaml, to_dict
from .data import make_loader, open_splits, train_transform, eval_transform
from .data.synthetic import ensure_dataset
from .distributed import is_main
from .evaluate import evaluate, topk_correct
from .models import create_model, load_pretrained
from .progress import Progress
from .runtime import configure, resolve_device, seed_everything


class Schedule:
    """Learning rate per step: optional linear warm-up, then step, cosine, constant or plateau."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.plateau_factor, self.best_loss, self.bad_epochs = 1.0, math.inf, 0

    def lr(self, step: int) -> float:
        c = self.cfg
        e = step / self.steps_per_epoch
        if e < c.warmup_epochs:
            return c.lr * (0.01 + 0.99 * e / c.warmup_epochs)
        if c.schedule == "step":
            return c.lr * c.gamma ** (int(e) // c.step_size)
        if c.schedule == "cosine":
            t = (e - c.warmup_epochs) / max(c.epochs - c.warmup_epochs, 1e-9)
            return c.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if c.schedule == "plateau":
            return c.lr * self.plateau_factor
        return c.lr

    def end_epoch(self, val_loss: float) -> None:
        """The paper's rule: divide when the validation error stops improving."""
        if self.cfg.schedule != "plateau":
            return
        if val_loss < self.best_loss - 1e-4:
            self.best_loss, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.cfg.patience:
                self.plateau_factor *= self.cfg.gamma
                self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"plateau_factor": self.plateau_factor, "best_loss": self.best_loss, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_factor, self.best_loss, self.bad_epochs = (
            state["plateau_factor"], state["best_loss"], state["bad_epochs"])


def train_one_epoch(model, loader, optimizer, schedule: Schedule, criterion, device, *, epoch: int,
                    global_step: int, channels_last: bool, progress: Progress) -> dict:
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for images, target in loader:
        lr = schedule.lr(global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        global_step += 1
        n = target.numel()
        loss_sum += loss.item() * n
        correct += topk_correct(logits.detach(), target, ks=(1,))[0]
        seen += n
        progress.update(loss=loss_sum / seen, top1=correct / seen,
                        img_s=seen / (time.perf_counter() - start), lr=lr)
    progress.close()
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "train_acc1": correct / max(seen, 1),
            "images": seen, "seconds": seconds, "global_step": global_step}


def default_out(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_writable(folder: Path) -> None:
    """Fail now, with the path in the message, if `folder` cannot be created or written."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(existing))


def fit(cfg: TrainConfig, log=print) -> dict:
    threads = configure(cfg.deterministic, cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    main = is_main()
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    ckpt_dir = out / "checkpoints"
    if main:
        check_writable(out)  # before any work, without leaving an empty folder behind on a later error

    data_root = cfg.data
    if data_root is None:
        data_root = str(ensure_dataset(cfg.synthetic_seed, cfg.cache_dir, log=log))
    train_set, val_set = open_splits(data_root, train_transform(cfg),
                                     eval_transform(cfg.resize, cfg.crop, cfg.mean, cfg.std), cfg.seed)
    classes = train_set.classes
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, cfg.batch_size, cfg.workers, train=True, seed=cfg.seed, pin_memory=pin)
    val_loader = make_loader(val_set, cfg.batch_size, cfg.workers, train=False, pin_memory=pin)

    model = create_model(cfg.arch, len(classes), cfg.dropout, cfg.fc_width, cfg.init)
    if cfg.weights:
        try:
            replaced = load_pretrained(model, checkpoint.weights_from(cfg.weights))
        except ValueError as e:
            raise checkpoint.CheckpointError(f"--weights {cfg.weights}: {e}") from None
        log(f"weights from {cfg.weights}" + (f"; new head for {len(classes)} classes" if replaced else ""))
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    schedule = Schedule(cfg, len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    start_epoch, global_step, best_acc1 = 0, 0, -1.0
    if cfg.resume:
        state = checkpoint.load_run(cfg.resume)
        if list(state["classes"]) != classes:
            raise checkpoint.CheckpointError(f"{cfg.resume} was trained on other classes than {data_root}")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise checkpoint.CheckpointError(
                f"--resume {cfg.resume}: the checkpoint does not fit this model (was --arch or --fc-width "
                f"changed?): {str(e).splitlines()[0]}") from None
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, global_step, best_acc1 = state["epoch"], state["global_step"], state["best_acc1"]
        log(f"resumed from {cfg.resume} at epoch {start_epoch}, step {global_step}")
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
    log(f"run folder {out}; {len(train_set)} train and {len(val_set)} val images in {len(classes)} classes "
        f"from {data_root}; {cfg.arch} (fc width {cfg.fc_width}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters) on {device}, {threads} threads; "
        f"batch {cfg.batch_size}, {len(train_loader)} steps an epoch")

    last = {}
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        progress = Progress(len(train_loader), f"epoch {epoch + 1}/{cfg.epochs}", every=cfg.log_every,
                            enabled=main and not cfg.quiet)
        t = train_one_epoch(model, train_loader, optimizer, schedule, criterion, device, epoch=epoch,
                            global_step=global_step, channels_last=cfg.channels_last, progress=progress)
        global_step = t["global_step"]
        v = evaluate(model, val_loader, device, cfg.channels_last)
        schedule.end_epoch(v["loss"])
        last = {"epoch": epoch + 1, "train_loss": t["train_loss"], "train_acc1": t["train_acc1"],
                "val_loss": v["loss"], "val_acc1": v["acc1"], "val_acc5": v["acc5"],
                "lr": optimizer.param_groups[0]["lr"], "images_per_sec": t["images"] / t["seconds"],
                "epoch_seconds": t["seconds"], "global_step": global_step}
        is_best = v["acc1"] > best_acc1
        best_acc1 = max(best_acc1, v["acc1"])
        if main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            state = {"format_version": checkpoint.FORMAT_VERSION, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "epoch": epoch + 1, "global_step": global_step, "best_acc1": best_acc1,
                     "torch_rng": torch.get_rng_state(), "classes": classes, "config": to_dict(cfg),
                     "metrics": last}
            checkpoint.save(state, ckpt_dir / "last.pt")
            if is_best:
                checkpoint.save(state, ckpt_dir / "best.pt")
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {t['train_loss']:.4f}, val loss {v['loss']:.4f}, "
            f"top-1 {v['acc1']:.2%}, top-5 {v['acc5']:.2%}, lr {last['lr']:.3g}, "
            f"{last['images_per_sec']:.0f} img/s, {t['seconds']:.1f} s")
    log(f"done: best val top-1 {best_acc1:.2%}; checkpoints in {ckpt_dir}")
    return last
