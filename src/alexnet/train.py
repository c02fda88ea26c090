"""Training: fit() builds everything, then loops over epochs; train_one_epoch() returns its metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, distributed, logs, report
from .config import ConfigError, TrainConfig, eval_crop, images_per_eval_batch, parse_every, save_yaml, to_dict
from .data import held, make_loader, open_splits, packed, train_crop_sizes, train_transform, eval_transform
from .data.batch import jpeg_on_gpu, main_process_augment, on_device, to_device
from .data.mix import BatchMix
from .data.synthetic import ensure_dataset
from .evaluate import evaluate, topk_correct
from .models import add_batchnorm, create_model, folded_state_dict, load_pretrained
from .progress import Progress
from .runtime import (autocast, configure, make_sgd, match_state_layouts, precision_warning, resolve_device,
                      resolve_precision, rng_state, seed_everything, set_rng_state, tune_allocator)


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

    def end_epoch(self, val_loss: float | None) -> None:
        """The paper's rule: divide when the validation error stops improving (None: not validated, which
        the plateau schedule does not allow)."""
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


class NonFiniteLoss(RuntimeError):
    """The loss was not finite for too many steps in a row."""


def train_one_epoch(model, loader, optimizer, schedule: Schedule, criterion, device, *, global_step: int,
                    accum_steps: int, channels_last: bool, progress: Progress, sums: dict | None = None,
                    after_step=None, any_rank=lambda flag: flag, max_nonfinite: int = 10,
                    input_size: int = 224, amp_dtype: torch.dtype | None = None, scaler=None, augment=None,
                    mix: BatchMix | None = None, clip_grad_norm: float = 0.0) -> dict:
    """One pass over this process's shard. Each optimizer step takes `accum_steps` micro-batches; under
    DDP, gradients are all-reduced only on the last of them (no_sync on the others), which gives the
    same step as one batch of all the images. Returns this process's sums and counts, continuing `sums`
    (a resumed epoch's). `after_step(global_step, sums)` runs after each step (checkpoints, agreed
    stops); when it returns True the epoch ends there, with "stopped" set.

    A step whose loss is not finite on any rank (`any_rank` agrees on it) is skipped by all and counted;
    `max_nonfinite` of them in a row raise NonFiniteLoss, with the weights still those of the last good
    step. With `mix` (mixup, CutMix) each micro-batch is mixed with itself in another order and the loss
    weighs both labels; the training top-1 counts the label with the larger weight. With `clip_grad_norm`
    the gradients (all-reduced, unscaled) are scaled down to that global norm when it is exceeded.
    BatchNorm's running statistics (--train-bn) are left as they were by a skipped step and a blank batch."""
    model.train()
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    steps = len(loader) // accum_steps
    sums = dict(sums or {"loss_sum": 0.0, "correct": 0, "images": 0, "seconds": 0.0, "skipped": 0, "bad": 0})
    loss_sum, correct, seen, skipped = sums["loss_sum"], sums["correct"], sums["images"], sums.get("skipped", 0)
    bad = sums.get("bad", 0)
    in_a_row = 0
    start = time.perf_counter() - sums["seconds"]
    stopped = False
    batches = iter(loader)
    for _ in range(steps):
        lr = schedule.lr(global_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_correct, step_seen = 0.0, 0, 0
        at_step_start = [b.clone() for b in buffers]
        for micro in range(accum_steps):
            images, target, n_bad = on_device(next(batches), device, channels_last, augment)
            bad += n_bad
            if target.numel() == 0:
                # Every image of this micro-batch was unreadable: a zero-weighted step on a blank image keeps
                # this rank in step with the others (DDP all-reduces on every rank at every step).
                images = to_device(torch.zeros(1, 3, input_size, input_size), device, channels_last)
                target = torch.zeros(1, dtype=torch.long, device=device)
                blank, before = True, [b.clone() for b in buffers]
            else:
                blank = False
            partner, lam = target, 1.0
            if mix is not None and not blank:
                images, perm, lam = mix(images, global_step, micro)
                partner = target[perm]
            last_micro = micro == accum_steps - 1
            with nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync():
                with autocast(device, amp_dtype):
                    logits = model(images).float()
                loss = criterion(logits, target) * (0.0 if blank else 1.0)
                if lam < 1.0:
                    loss = lam * loss + (1.0 - lam) * criterion(logits, partner)
                scaled = loss / accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if blank:
                restore(buffers, before)
                continue
            n = target.numel()
            step_loss += loss.item() * n
            step_correct += topk_correct(logits.detach(), target if lam >= 0.5 else partner, ks=(1,))[0]
            step_seen += n
        if any_rank(not math.isfinite(step_loss)):
            optimizer.zero_grad(set_to_none=True)  # skipped by every rank: the weights stay as they are
            restore(buffers, at_step_start)  # and so do the statistics, which a non-finite batch would poison
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if in_a_row >= max_nonfinite:
                raise NonFiniteLoss(f"the loss was not finite for {in_a_row} steps in a row (up to global step "
                                    f"{global_step + 1}); the weights are those of the last finite step")
        elif scaler is not None:
            if clip_grad_norm:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                clip_gradients(optimizer, clip_grad_norm)
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skips the update when the scaled gradients overflowed, and lowers the scale
            scaler.update()
            if scaler.get_scale() < scale:  # skipped by the scaler: counted like a non-finite loss
                restore(buffers, at_step_start)
                skipped, in_a_row = skipped + 1, in_a_row + 1
                if in_a_row >= max_nonfinite:
                    raise NonFiniteLoss(f"the gradients were not finite for {in_a_row} steps in a row (up to global "
                                        f"step {global_step + 1}, fp16 loss scale now {scaler.get_scale():g})")
            else:
                loss_sum, correct, seen, in_a_row = loss_sum + step_loss, correct + step_correct, seen + step_seen, 0
        else:
            if clip_grad_norm:
                clip_gradients(optimizer, clip_grad_norm)
            optimizer.step()
            loss_sum, correct, seen, in_a_row = loss_sum + step_loss, correct + step_correct, seen + step_seen, 0
        global_step += 1
        progress.update(loss=loss_sum / max(seen, 1), top1=correct / max(seen, 1),
                        img_s=seen / (time.perf_counter() - start), lr=lr)
        sums = {"loss_sum": loss_sum, "correct": correct, "images": seen, "seconds": time.perf_counter() - start,
                "skipped": skipped, "bad": bad}
        if after_step is not None and after_step(global_step, sums):
            stopped = True
            break
    progress.close()
    return {**sums, "seconds": time.perf_counter() - start, "global_step": global_step, "stopped": stopped}


def restore(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)


def clip_gradients(optimizer, max_norm: float) -> None:
    """Scale all gradients by one factor so that their global L2 norm is at most `max_norm`."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def param_groups(model: nn.Module, bias_decay: bool) -> list[dict]:
    """One group, or without bias decay two: the weights of convolutions and linear layers (more than one
    dimension) with the optimizer's weight decay, the biases and BatchNorm scales and shifts (one dimension) without."""
    params = list(model.parameters())
    if bias_decay:
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


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


def learning_rate(cfg: TrainConfig, global_batch: int) -> float:
    """The peak learning rate: --lr, or with --lr-scaling linear, --lr x global batch / reference batch."""
    return cfg.lr * global_batch / cfg.lr_reference_batch if cfg.lr_scaling == "linear" else cfg.lr


def datasets(cfg: TrainConfig, root: str, device: torch.device, say):
    """(train, val): from a packed dataset, or from JPEG files (on a GPU decoded there a batch at a time,
    or in the workers with --jpeg-decode workers, the rest on batches on the GPU); see data.batch for the
    batch path, data.jpeg for the decoding and data.held for packed data held in the device's memory."""
    transforms = (train_transform(cfg), eval_transform(cfg.resize, eval_crop(to_dict(cfg)), cfg.mean, cfg.std, cfg.val_tta))
    if packed.is_packed(root):
        if cfg.random_resized_crop:
            warn_smaller_than_source(root, cfg.resize, say)
        splits = packed.open_splits(root, cfg.resize, *transforms, cfg.seed)
    else:
        splits = open_splits(root, *transforms, cfg.seed, on_bad_image=cfg.on_bad_image)
        jpeg_on_gpu(splits, device, cfg.jpeg_decode, say)
    packed.hold_on_device(splits, device, cfg.data_on_device, say)
    return splits


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


def data_path(dataset, device: torch.device) -> str:
    kind = "packed" if isinstance(dataset, packed.PackedSplit) else "JPEG"
    if dataset.batch is None:
        if kind == "JPEG" and device.type == "cpu":
            return ""
        return f" ({kind}; per-image augmentation: rotation has no batch path)"
    decoded = "; decoded on the device" if getattr(dataset, "decode_on_device", False) else ""
    held = getattr(dataset, "held", False)
    if held:
        decoded += ("; crops read from the memory map by the main process" if device.type == "cpu"
                    else f"; held in {device} memory")
    where = "in the loader workers" if device.type == "cpu" and not held else "on " + str(device)
    return f" ({kind}{decoded}; batch augmentation {where})"


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


class StopSignal:
    """Notes a SIGTERM (preemption by Slurm or Kubernetes) so that the loop stops at a step boundary."""

    def __init__(self) -> None:
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second SIGTERM: the launcher is tearing the workers down; go now
            raise SystemExit(128 + signum)
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def newest_agreed(ckpt_dir: Path, rank: int, say) -> tuple[Path | None, dict | None]:
    """The newest usable checkpoint that any rank holds, on every rank. Without shared storage only some
    machines hold it: the ranks agree on the newest global step any of them has, and one holder sends
    it to the others, so that no rank silently starts afresh while others resume."""
    found = checkpoint.newest_valid(ckpt_dir, log=say)
    steps = distributed.all_gather_objects(found[1]["global_step"] if found else -1)
    newest = max(steps)
    if newest < 0:
        say(f"no checkpoint in {ckpt_dir}: starting afresh")
        return None, None
    if all(s == newest for s in steps):
        return found
    holder = steps.index(newest)
    say(f"the newest checkpoint (global step {newest}) is on rank {holder}'s machine only: sending it to the others")
    state = distributed.broadcast_object(found[1] if rank == holder else None, src=holder)
    return f"{checkpoint.step_path(ckpt_dir, newest)} (from rank {holder})", state


def fit(cfg: TrainConfig, log=print) -> dict:
    early = logs.hold_early()  # what is said before the run folder exists goes into its train.log too
    try:
        return _fit(cfg, log, early)
    finally:
        logs.drop_early(early)
        held.release()  # on every exit, an error before the first epoch too: no held split stays mapped


def _fit(cfg: TrainConfig, log, early) -> dict:
    tune_allocator()
    threads = configure(cfg.deterministic, cfg.threads)
    seed_everything(cfg.seed)
    device = distributed.setup(resolve_device(cfg.device), cfg.backend, cfg.dist_timeout, log)
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    say = log if main else _silent  # one voice: rank 0 reports; every rank reports errors and its weights
    if not main:
        logs.drop_early(early)  # no run folder here to write them to
    out = Path(distributed.broadcast_object(cfg.out or str(default_out(cfg))))  # one folder, rank 0's name
    cfg.out = str(out)
    ckpt_dir = out / "checkpoints"
    if main:
        check_writable(out)  # before any work, without leaving an empty folder behind on a later error
    cfg.batch_size, global_batch = batch_sizes(cfg, world)
    peak_lr = learning_rate(cfg, global_batch)

    data_root = cfg.data
    if data_root is None:
        data_root = str(ensure_dataset(cfg.synthetic_seed, cfg.cache_dir, log=say))
    train_set, val_set = datasets(cfg, data_root, device, say)
    classes = train_set.classes
    pin = device.type == "cuda"
    # validation with test-time views: batches of as many crops as a training batch holds, not 10 times as many
    train_loader, val_loader = (make_loader(dataset, size, cfg.workers, train=dataset is train_set,
                                            seed=cfg.seed, pin_memory=pin, rank=rank, world=world,
                                            device_type=device.type)
                                for dataset, size in ((train_set, cfg.batch_size),
                                                      (val_set, images_per_eval_batch(cfg.batch_size, cfg.val_tta))))
    # the batch path's pixel work: here on a GPU and for held data, else in the loader's workers (data.batch)
    train_augment, val_augment = (main_process_augment(d, device) for d in (train_set, val_set))
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
    if cfg.train_bn:
        add_batchnorm(model)
    if world > 1:
        torch.manual_seed(cfg.seed + 7919 * rank)  # each rank its own dropout draws
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    ddp_model = distributed.wrap(model, device, comm_hook=cfg.comm_hook, bucket_cap_mb=cfg.bucket_cap_mb,
                                 gradient_as_bucket_view=cfg.gradient_as_bucket_view,
                                 static_graph=cfg.static_graph, powersgd_rank=cfg.powersgd_rank,
                                 powersgd_start_step=cfg.powersgd_start_step, log=say)
    if cfg.compile:  # the DDP wrapper is compiled (its buckets then split the graph); `model` stays the plain one
        # progressive resizing meets a few input sizes: one static graph each, not a slower dynamic one
        ddp_model = torch.compile(ddp_model, backend=os.environ.get("ALEXNET_COMPILE_BACKEND", "inductor"),
                                  dynamic=False if cfg.progressive_crop else None)
    optimizer = make_sgd(param_groups(model, cfg.bias_decay), cfg.sgd, device, lr=peak_lr,
                         momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    amp_dtype = resolve_precision(cfg.precision, device, cfg.deterministic)
    # fp16 needs its gradients scaled up so that small ones do not flush to zero; bf16 has fp32's range.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 with a gradient scaler"}[amp_dtype]
    schedule = Schedule(cfg, steps_per_epoch, peak_lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    mix = BatchMix(cfg.mixup, cfg.cutmix, cfg.seed, rank) if cfg.mixup or cfg.cutmix else None

    start_epoch, skip_steps, partial, global_step, best_acc1, resumed = 0, 0, None, 0, -1.0, ""
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    resume = cfg.resume or ("auto" if restarted else None)  # restarted workers continue by themselves
    source = None
    if resume == "auto":
        source, state = newest_agreed(ckpt_dir, rank, say)
    elif resume:
        source, state = Path(resume), checkpoint.load_run(resume)
    if source is not None:
        if list(state["classes"]) != classes:
            raise checkpoint.CheckpointError(f"{source} was trained on other classes than {data_root}")
        try:
            model.load_state_dict(state.get("model_with_bn", state["model"]) if cfg.train_bn else state["model"])
            optimizer.load_state_dict(state["optimizer"])
            match_state_layouts(optimizer)
            for group in optimizer.param_groups:  # the implementation asked for now, not the saved one
                group["fused"], group["foreach"] = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
        except (RuntimeError, ValueError) as e:
            raise checkpoint.CheckpointError(
                f"--resume {source}: the checkpoint does not fit this model (was --arch, --fc-width, "
                f"--train-bn or --bias-decay changed?): {str(e).splitlines()[0]}") from None
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ranks = state.get("ranks")
        saved_on = (state.get("world_size", 1), state.get("device_type", device.type))
        if ranks is not None and saved_on == (world, device.type):
            set_rng_state(ranks[rank]["rng"])
            partial = ranks[rank]["sums"]
        else:
            torch.set_rng_state(state["torch_rng"])
            say(f"WARNING: {source} was saved by {saved_on[0]} process(es) on {saved_on[1]}; resuming with "
                f"{world} on {device.type} works but is not bit-exact")
        start_epoch, global_step, best_acc1 = state["epoch"], state["global_step"], state["best_acc1"]
        skip_steps = state.get("step_in_epoch", 0)
        resumed = f"resumed from {source} at epoch {start_epoch + 1}, step {skip_steps} of it (global step {global_step})"
    # The run folder is made once data, model and checkpoint are known to work: errors before leave none.
    log_file, scalars = None, logs.Scalars(None)
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
        log_file = logs.to_file(out / "train.log", early)
        if cfg.tensorboard:
            scalars = logs.Scalars(out / "tensorboard")
    if resumed:
        say(resumed)
    say(f"run folder {out}; {len(train_set)} train and {len(val_set)} val images in {len(classes)} classes "
        f"from {data_root}{data_path(train_set, device)}; {cfg.arch}"
        f"{' with BatchNorm while training' if cfg.train_bn else ''} (fc width {cfg.fc_width}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters) on {device}, {threads} thread{'s' if threads > 1 else ''}, "
        f"{precision}{', channels_last' if cfg.channels_last else ''}{', compiled' if cfg.compile else ''}")
    if warning := precision_warning(amp_dtype, device):
        say(f"WARNING: {warning}")
    say(f"batch: {cfg.batch_size} per process x {world} process{'es' if world > 1 else ''} x "
        f"{cfg.accum_steps} accumulation step{'s' if cfg.accum_steps > 1 else ''} = {global_batch} global; "
        f"lr {peak_lr:g}" + (f" (--lr {cfg.lr:g} scaled by {global_batch}/{cfg.lr_reference_batch})"
                             if cfg.lr_scaling == "linear" else "") + f"; {steps_per_epoch} steps an epoch")

    def save(epoch: int, step_in_epoch: int, sums: dict | None, metrics: dict, is_best: bool = False) -> None:
        """Every rank calls this at the same step (it gathers their random states); rank 0 writes."""
        ranks = distributed.all_gather_objects({"rng": rng_state(), "sums": sums})
        if not main:
            return
        weights = model.state_dict()
        state = {"format_version": checkpoint.FORMAT_VERSION,
                 "model": folded_state_dict(weights) if cfg.train_bn else weights,
                 **({"model_with_bn": weights} if cfg.train_bn else {}),
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                 "best_acc1": best_acc1, "torch_rng": torch.get_rng_state(), "ranks": ranks, "world_size": world, "device_type": device.type,
                 "classes": classes, "config": to_dict(cfg), "metrics": metrics,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        checkpoint.save_step(state, ckpt_dir, cfg.keep_last)
        if is_best:
            checkpoint.save(state, ckpt_dir / "best.pt")

    every_steps, every_minutes = parse_every(cfg.checkpoint_every)
    last_save = time.monotonic()
    preempted = StopSignal()

    def after_step(step: int, sums: dict) -> bool:
        """Checkpoint inside the epoch when due; stop, agreed by all ranks, on SIGTERM."""
        nonlocal last_save, global_step
        global_step = step
        timed = every_minutes > 0 and time.monotonic() - last_save >= every_minutes * 60
        if world > 1:  # the ranks must take the same decision at the same step
            stop, timed = (v > 0 for v in distributed.sum_all([float(preempted.requested), float(timed)]))
        else:
            stop = preempted.requested
        in_epoch = (step - epoch_start_step) + skip
        if step % cfg.log_every == 0:
            scalars.add(step, {"train/loss": sums["loss_sum"] / max(sums["images"], 1),
                               "train/top1": sums["correct"] / max(sums["images"], 1),
                               "train/lr": optimizer.param_groups[0]["lr"]})
        if in_epoch < steps_per_epoch and (stop or timed or every_steps and step % every_steps == 0):
            save(epoch, in_epoch, sums, last)
            last_save = time.monotonic()
        return stop

    def any_rank(flag: bool) -> bool:
        return distributed.sum_all([float(flag)])[0] > 0 if world > 1 else flag

    crops = train_crop_sizes(cfg)  # the training crop of each epoch: --crop, or growing to it (--progressive-crop)
    last, v = {}, {}
    stopped = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            skip = skip_steps if epoch == start_epoch else 0
            train_loader.sampler.set_epoch(epoch, skip=skip * cfg.batch_size * cfg.accum_steps)
            epoch_start_step = global_step
            if cfg.progressive_crop and (epoch == start_epoch or crops[epoch] != crops[epoch - 1]):
                say(f"epoch {epoch + 1}: training crops of {crops[epoch]} px (progressive resizing to {cfg.crop})")
            progress = Progress(steps_per_epoch - skip, f"epoch {epoch + 1}/{cfg.epochs}", every=cfg.log_every,
                                enabled=main and not cfg.quiet)
            try:
                t = train_one_epoch(ddp_model, train_loader, optimizer, schedule, criterion, device,
                                    global_step=global_step, accum_steps=cfg.accum_steps,
                                    channels_last=cfg.channels_last, progress=progress,
                                    sums=partial if skip else None, after_step=after_step,
                                    any_rank=any_rank, max_nonfinite=cfg.max_nonfinite_steps, input_size=crops[epoch],
                                    amp_dtype=amp_dtype, scaler=scaler, augment=train_augment, mix=mix,
                                    clip_grad_norm=cfg.clip_grad_norm)
            except NonFiniteLoss as e:
                save(epoch, (global_step - epoch_start_step) + skip, None, last)
                raise NonFiniteLoss(f"{e}. Checkpoint saved: {ckpt_dir / 'last.pt'}. A lower --lr, a longer "
                                    f"--warmup-epochs or checking the data usually helps") from None
            finally:
                progress.close()  # also on an error: its message then starts on a clean line
            global_step = t["global_step"]
            if t["stopped"] and (global_step - epoch_start_step) + skip < steps_per_epoch:
                stopped = True
                break
            loss_sum, correct, images, seconds, bad = distributed.sum_all(
                [t["loss_sum"], t["correct"], t["images"], t["seconds"], t["bad"]])
            distributed.average_buffers(model)  # BatchNorm's statistics (--train-bn), the same on every rank
            final = epoch + 1 == cfg.epochs  # its validation also counts the confusion matrix, for the report
            validated = final or (epoch + 1) % cfg.val_every == 0
            v = evaluate(model, val_loader, device, cfg.channels_last, confusion_classes=len(classes) if final else 0,
                         amp_dtype=amp_dtype, augment=val_augment) if validated else {}
            schedule.end_epoch(v.get("loss"))
            epoch_seconds = seconds / world
            last = {"epoch": epoch + 1, "train_loss": loss_sum / max(images, 1), "train_acc1": correct / max(images, 1),
                    **({"val_loss": v["loss"], "val_acc1": v["acc1"], "val_acc5": v["acc5"]} if validated else {}),
                    "lr": optimizer.param_groups[0]["lr"], "images_per_sec": images / epoch_seconds,
                    "epoch_seconds": epoch_seconds, "global_step": global_step, "skipped_steps": t["skipped"],
                    "bad_images": int(bad), **({"val_bad_images": v["bad_images"]} if validated else {}),
                    "train_crop": crops[epoch]}
            is_best = validated and v["acc1"] > best_acc1
            best_acc1 = max(best_acc1, v.get("acc1", -1.0))
            if main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(last) + "\n")
                scalars.add(global_step, {f"epoch/{k}": v for k, v in last.items()
                                          if k not in ("epoch", "global_step")})
                scalars.flush()
            save(epoch + 1, 0, None, last, is_best)
            last_save = time.monotonic()
            if bad or v.get("bad_images"):
                say(f"WARNING: epoch {epoch + 1}: {int(bad)} training and {v.get('bad_images', 0)} validation images "
                    f"were unreadable and skipped (`alexnet data check` lists them)")
            if t["skipped"]:
                say(f"WARNING: {t['skipped']} step(s) of epoch {epoch + 1} skipped: the loss was not finite")
            scores = (f"val loss {v['loss']:.4f}, top-1 {v['acc1']:.2%}, top-5 {v['acc5']:.2%}" if validated
                      else f"not validated (--val-every {cfg.val_every})")
            say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {last['train_loss']:.4f}, {scores}, lr {last['lr']:.3g}, "
                f"{last['images_per_sec']:.0f} img/s, {epoch_seconds:.1f} s")
            if t["stopped"]:
                stopped = True
                break
        preempted.restore()
        if stopped:
            say(f"stopped on SIGTERM at global step {global_step}, checkpoint saved; continue with "
                f"`alexnet train --resume auto --out {out}`")
            return last
        if main:
            history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            say("epochs (* best top-1):\n" + logs.summary_table(history))
            if "confusion" in v:
                say(f"report: {report.write(out, history, v['confusion'], classes, to_dict(cfg))}")
        say(f"done: best val top-1 {best_acc1:.2%}; checkpoints in {ckpt_dir}")
        log(f"final weights sha256 {distributed.weights_sha256(model)} (rank {rank} of {world})")
        return last
    finally:
        scalars.close()
        logs.close_file(log_file)
