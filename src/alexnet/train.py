"""Training: fit() builds everything, then loops over epochs; train_one_epoch() returns its metrics."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, distributed
from .config import ConfigError, TrainConfig, save_yaml, to_dict
from .data import make_loader, open_splits, train_transform, eval_transform
from .data.synthetic import ensure_dataset
from .evaluate import evaluate, topk_correct
from .models import create_model, load_pretrained
from .progress import Progress
from .runtime import configure, resolve_device, seed_everything


class Schedule:
    """Learning rate per step: optional linear warm-up, then step, cosine, constant or plateau."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, peak_lr: float) -> None:
        self.cfg, self.steps_per_epoch, self.peak = cfg, steps_per_epoch, peak_lr
        self.plateau_factor, self.best_loss, self.bad_epochs = 1.0, math.inf, 0

    def lr(self, step: int) -> float:
        c, peak = self.cfg, self.peak
        e = step / self.steps_per_epoch
        if e < c.warmup_epochs:
            return peak * (0.01 + 0.99 * e / c.warmup_epochs)
        if c.schedule == "step":
            return peak * c.gamma ** (int(e) // c.step_size)
        if c.schedule == "cosine":
            t = (e - c.warmup_epochs) / max(c.epochs - c.warmup_epochs, 1e-9)
            return peak * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if c.schedule == "plateau":
            return peak * self.plateau_factor
        return peak

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
                    global_step: int, accum_steps: int, channels_last: bool, progress: Progress) -> dict:
    """One pass over this process's shard. Each optimizer step takes `accum_steps` micro-batches; under
    DDP, gradients are all-reduced only on the last of them (no_sync on the others), which gives the
    same step as one batch of all the images. Returns this process's sums and counts."""
    model.train()
    steps = len(loader) // accum_steps
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    batches = iter(loader)
    for _ in range(steps):
        lr = schedule.lr(global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum_steps):
            images, target = next(batches)
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            target = target.to(device, non_blocking=True)
            last_micro = micro == accum_steps - 1
            with nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync():
                logits = model(images)
                loss = criterion(logits, target)
                (loss / accum_steps).backward()
            n = target.numel()
            loss_sum += loss.item() * n
            correct += topk_correct(logits.detach(), target, ks=(1,))[0]
            seen += n
        optimizer.step()
        global_step += 1
        progress.update(loss=loss_sum / seen, top1=correct / seen,
                        img_s=seen / (time.perf_counter() - start), lr=lr)
    progress.close()
    return {"loss_sum": loss_sum, "correct": correct, "images": seen,
            "seconds": time.perf_counter() - start, "global_step": global_step}


def batch_sizes(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(per-process batch, global batch): from --global-batch-size when given, else from --batch-size."""
    if cfg.global_batch_size:
        per, rest = divmod(cfg.global_batch_size, world * cfg.accum_steps)
        if rest or per < 1:
            raise ConfigError(f"--global-batch-size {cfg.global_batch_size} does not split evenly over "
                              f"{world} processes x {cfg.accum_steps} accumulation steps; use a multiple of "
                              f"{world * cfg.accum_steps}")
        return per, cfg.global_batch_size
    return cfg.batch_size, cfg.batch_size * world * cfg.accum_steps


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


def _silent(*args, **kwargs) -> None:
    pass


def fit(cfg: TrainConfig, log=print) -> dict:
    threads = configure(cfg.deterministic, cfg.threads)
    seed_everything(cfg.seed)
    device = distributed.setup(resolve_device(cfg.device), cfg.backend, cfg.dist_timeout, log)
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    say = log if main else _silent  # one voice: rank 0 reports; every rank reports errors and its weights
    out = Path(distributed.broadcast_object(cfg.out or str(default_out(cfg))))  # one folder, rank 0's name
    cfg.out = str(out)
    ckpt_dir = out / "checkpoints"
    if main:
        check_writable(out)  # before any work, without leaving an empty folder behind on a later error
    cfg.batch_size, global_batch = batch_sizes(cfg, world)
    peak_lr = cfg.lr * global_batch / cfg.lr_reference_batch if cfg.lr_scaling == "linear" else cfg.lr

    data_root = cfg.data
    if data_root is None:
        data_root = str(ensure_dataset(cfg.synthetic_seed, cfg.cache_dir, log=say))
    train_set, val_set = open_splits(data_root, train_transform(cfg),
                                     eval_transform(cfg.resize, cfg.crop, cfg.mean, cfg.std), cfg.seed)
    classes = train_set.classes
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, cfg.batch_size, cfg.workers, train=True, seed=cfg.seed,
                               pin_memory=pin, rank=rank, world=world)
    val_loader = make_loader(val_set, cfg.batch_size, cfg.workers, train=False, pin_memory=pin,
                             rank=rank, world=world)
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch has no full step: {len(train_set)} training images over {world} "
                          f"processes give {len(train_loader.sampler)} each, fewer than --batch-size "
                          f"{cfg.batch_size} x --accum-steps {cfg.accum_steps}")

    model = create_model(cfg.arch, len(classes), cfg.dropout, cfg.fc_width, cfg.init)
    if cfg.weights:
        try:
            replaced = load_pretrained(model, checkpoint.weights_from(cfg.weights))
        except ValueError as e:
            raise checkpoint.CheckpointError(f"--weights {cfg.weights}: {e}") from None
        say(f"weights from {cfg.weights}" + (f"; new head for {len(classes)} classes" if replaced else ""))
    if world > 1:
        torch.manual_seed(cfg.seed + 7919 * rank)  # each rank its own dropout draws
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    ddp_model = distributed.wrap(model, device, comm_hook=cfg.comm_hook, bucket_cap_mb=cfg.bucket_cap_mb,
                                 gradient_as_bucket_view=cfg.gradient_as_bucket_view,
                                 static_graph=cfg.static_graph, powersgd_rank=cfg.powersgd_rank,
                                 powersgd_start_step=cfg.powersgd_start_step, log=say)
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    schedule = Schedule(cfg, steps_per_epoch, peak_lr)
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
        rng = state.get("torch_rng_ranks")
        torch.set_rng_state(rng[rank] if rng is not None and len(rng) == world else state["torch_rng"])
        start_epoch, global_step, best_acc1 = state["epoch"], state["global_step"], state["best_acc1"]
        say(f"resumed from {cfg.resume} at epoch {start_epoch}, step {global_step}")
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
    say(f"run folder {out}; {len(train_set)} train and {len(val_set)} val images in {len(classes)} classes "
        f"from {data_root}; {cfg.arch} (fc width {cfg.fc_width}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters) on {device}, {threads} thread{'s' if threads > 1 else ''}")
    say(f"batch: {cfg.batch_size} per process x {world} process{'es' if world > 1 else ''} x "
        f"{cfg.accum_steps} accumulation step{'s' if cfg.accum_steps > 1 else ''} = {global_batch} global; "
        f"lr {peak_lr:g}" + (f" (--lr {cfg.lr:g} scaled by {global_batch}/{cfg.lr_reference_batch})"
                             if cfg.lr_scaling == "linear" else "") + f"; {steps_per_epoch} steps an epoch")

    last = {}
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", every=cfg.log_every,
                            enabled=main and not cfg.quiet)
        t = train_one_epoch(ddp_model, train_loader, optimizer, schedule, criterion, device, epoch=epoch,
                            global_step=global_step, accum_steps=cfg.accum_steps,
                            channels_last=cfg.channels_last, progress=progress)
        global_step = t["global_step"]
        loss_sum, correct, images, seconds = distributed.sum_all(
            [t["loss_sum"], t["correct"], t["images"], t["seconds"]])
        v = evaluate(model, val_loader, device, cfg.channels_last)
        schedule.end_epoch(v["loss"])
        epoch_seconds = seconds / world
        last = {"epoch": epoch + 1, "train_loss": loss_sum / max(images, 1), "train_acc1": correct / max(images, 1),
                "val_loss": v["loss"], "val_acc1": v["acc1"], "val_acc5": v["acc5"],
                "lr": optimizer.param_groups[0]["lr"], "images_per_sec": images / epoch_seconds,
                "epoch_seconds": epoch_seconds, "global_step": global_step}
        is_best = v["acc1"] > best_acc1
        best_acc1 = max(best_acc1, v["acc1"])
        rng_ranks = distributed.all_gather_objects(torch.get_rng_state())
        if main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            state = {"format_version": checkpoint.FORMAT_VERSION, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "epoch": epoch + 1, "global_step": global_step, "best_acc1": best_acc1,
                     "torch_rng": torch.get_rng_state(), "torch_rng_ranks": rng_ranks, "world_size": world,
                     "classes": classes, "config": to_dict(cfg), "metrics": last}
            checkpoint.save(state, ckpt_dir / "last.pt")
            if is_best:
                checkpoint.save(state, ckpt_dir / "best.pt")
        say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {last['train_loss']:.4f}, val loss {v['loss']:.4f}, "
            f"top-1 {v['acc1']:.2%}, top-5 {v['acc5']:.2%}, lr {last['lr']:.3g}, "
            f"{last['images_per_sec']:.0f} img/s, {epoch_seconds:.1f} s")
    say(f"done: best val top-1 {best_acc1:.2%}; checkpoints in {ckpt_dir}")
    log(f"final weights sha256 {distributed.weights_sha256(model)} (rank {rank} of {world})")
    return last
