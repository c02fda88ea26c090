"""One optimizer step, and an epoch of them.

A step takes `accum_steps` micro-batches: forward under autocast, loss (mixed labels with mixup/CutMix),
backward with the fp16 scaler; the parallelism strategy exchanges gradients on the last micro-batch only,
which gives the same step as one batch of all the images. Then clipping and the optimizer step, unless the
loss was not finite on any rank (all skip it) or the fp16 scaler found the gradients overflowed. A skipped
step leaves the weights and BatchNorm's running statistics as they were; too many in a row raise
NonFiniteLoss."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import checkpoint, distributed
from ..config import TrainConfig
from ..data.batch import on_device, to_device
from ..data.mix import BatchMix
from ..errors import CheckpointError, NonFiniteLoss
from ..evaluate import topk_correct
from ..models import add_batchnorm, create_model, load_pretrained
from ..parallel import DataParallel, choose, local, make
from ..progress import Progress
from ..runtime import autocast, make_sgd, resolve_precision
from .schedule import Schedule
from .state import restarted

SUM_KEYS = ("loss_sum", "correct", "images", "seconds", "skipped", "bad")


@dataclass
class Trainer:
    """What a step works with. `parallel` wraps `model` (see alexnet.parallel); `model` is the plain one."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    criterion: nn.Module
    device: torch.device
    parallel: DataParallel | None = None
    accum_steps: int = 1
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    mix: BatchMix | None = None
    clip_grad_norm: float = 0.0
    max_nonfinite: int = 10
    any_rank: object = distributed.any_rank  # the vote on a non-finite loss, taken by every rank each step
    skipped_in_a_row: int = 0  # steps skipped in a row, counted across epochs (a short epoch ends no run of them)

    def __post_init__(self) -> None:
        if self.parallel is None:
            self.parallel = local(self.model)


def build_trainer(cfg: TrainConfig, plan, device: torch.device, classes: int, say) -> Trainer:
    """The model (with --weights, --train-bn), wrapped by the parallelism strategy, and what steps it."""
    model = create_model(cfg.arch, classes, cfg.dropout, cfg.fc_width, cfg.init, cfg.init_bias)
    if cfg.weights:
        try:
            replaced = load_pretrained(model, checkpoint.weights_from(cfg.weights))
        except ValueError as e:
            raise CheckpointError(f"--weights {cfg.weights}: {e}") from None
        say(f"weights from {cfg.weights}" + (f"; new head for {classes} classes" if replaced else ""))
    if cfg.train_bn:
        add_batchnorm(model)
    if plan.world > 1:
        torch.manual_seed(cfg.seed + 7919 * plan.rank)  # each rank its own dropout draws
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    parallel = wrap(cfg, plan, model, device, say)
    optimizer = make_sgd(param_groups(parallel.parameters(), cfg.bias_decay), cfg.sgd, device, lr=plan.peak_lr,
                         momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    amp_dtype = resolve_precision(cfg.precision, device, cfg.deterministic)
    # fp16 needs its gradients scaled up so that small ones do not flush to zero; bf16 has fp32's range.
    # Where the processes hold different gradients (hybrid), they agree on skipping an overflowed step.
    scaler = None
    if amp_dtype == torch.float16:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        scaler = ShardedGradScaler(device.type) if parallel.agree_on_overflow else torch.amp.GradScaler(device.type)
    mix = BatchMix(cfg.mixup, cfg.cutmix, cfg.seed, plan.rank) if cfg.mixup or cfg.cutmix else None
    return Trainer(model, optimizer, Schedule(cfg, plan.steps_per_epoch, plan.peak_lr),
                   nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), device, parallel=parallel,
                   accum_steps=cfg.accum_steps, channels_last=cfg.channels_last, amp_dtype=amp_dtype, scaler=scaler,
                   mix=mix, clip_grad_norm=cfg.clip_grad_norm, max_nonfinite=cfg.max_nonfinite_steps)


def _idle(cfg: TrainConfig, world: int) -> list[str]:
    """The settings given for several processes that this run cannot use (not said for a resumed run, whose
    settings are its checkpoint's, not given now)."""
    if cfg.resume is not None or restarted():
        return []
    one = world == 1
    return [flag for flag, idle in (
        ("--parallel " + cfg.parallel, cfg.parallel != "auto" and one),
        ("--local-sgd-period", cfg.local_sgd_period and one),
        ("--local-sgd-warmup", cfg.local_sgd_warmup and not (cfg.local_sgd_period and not one)),
        ("--comm-hook " + cfg.comm_hook, cfg.comm_hook != "none" and one),
        ("--backend " + cfg.backend, cfg.backend != "auto" and one)) if idle]


def wrap(cfg: TrainConfig, plan, model: nn.Module, device: torch.device, say):
    """The parallelism strategy (alexnet.parallel) around `model`: --parallel, or for auto the one that sends
    fewer bytes a step among those the other settings allow; local SGD with --local-sgd-period."""
    name, why = choose(cfg.parallel, plan.world, plan.batch_size, model, cfg.accum_steps, cfg.local_sgd_period)
    if cfg.parallel == "auto" and name == "hybrid" and (cfg.compile or cfg.comm_hook == "powersgd"):
        need = " and ".join(n for n, on in (("--compile", cfg.compile), ("PowerSGD", cfg.comm_hook == "powersgd")) if on)
        name, why = "ddp", f"{why}; ddp, as {need} need{'s' * (' and ' not in need)} it"
    if idle := _idle(cfg, plan.world):
        one = len(idle) == 1
        say(f"note: {', '.join(idle)} {'has' if one else 'have'} no effect here: " + (
            "it goes with --local-sgd-period" if plan.world > 1 else
            f"{'it acts' if one else 'they act'} between processes, and this run has one"))
    if cfg.local_sgd_period and plan.world > 1:
        averaged = "the convolutions' weights" if name == "hybrid" else "weights"
        name = "hybrid" if name == "hybrid" else "local-sgd"
        why = (f"{why}; local SGD: {averaged} averaged every {cfg.local_sgd_period} steps after "
               f"{cfg.local_sgd_warmup} synchronous ones")
    if plan.world > 1:
        say(f"parallel: {name} ({why})")
    options = dict(comm_hook=cfg.comm_hook, bucket_cap_mb=cfg.bucket_cap_mb, gradient_as_bucket_view=cfg.gradient_as_bucket_view,
                   static_graph=cfg.static_graph, powersgd_rank=cfg.powersgd_rank,
                   powersgd_start_step=cfg.powersgd_start_step, log=say)
    if name != "hybrid":  # progressive resizing meets a few input sizes: one static graph each, not a dynamic one
        options.update(compile=cfg.compile, dynamic=False if cfg.progressive_crop else None)
    return make(name, model, device, local_sgd_period=cfg.local_sgd_period, local_sgd_warmup=cfg.local_sgd_warmup,
                **options)


def describe(cfg: TrainConfig, t: Trainer, threads: int) -> str:
    """The model and how it runs, for the run's first lines."""
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 with a gradient scaler"}[t.amp_dtype]
    return (f"{cfg.arch}{' with BatchNorm while training' if cfg.train_bn else ''} (fc width {cfg.fc_width}, "
            f"{sum(p.numel() for p in t.model.parameters()):,} parameters) on {t.device}, {threads} "
            f"thread{'s' if threads > 1 else ''}, {precision}{', channels_last' if cfg.channels_last else ''}"
            f"{', compiled' if cfg.compile else ''}")


def train_one_epoch(t: Trainer, loader, *, global_step: int, progress: Progress, sums: dict | None = None,
                    after_step=None, input_size: int = 224, augment=None) -> dict:
    """One pass over this process's shard, continuing `sums` (a resumed epoch's). Returns this process's
    sums and counts, the global step reached, and "stopped" when `after_step(global_step, sums)` (run
    after each step: checkpoints, agreed stops) returned True and ended the epoch there."""
    t.parallel.train()
    buffers = [b for b in t.model.buffers() if b.is_floating_point()]
    sums = {k: 0 if k in ("correct", "images", "skipped", "bad") else 0.0 for k in SUM_KEYS} | dict(sums or {})
    start, stopped = time.perf_counter() - sums["seconds"], False
    batches = iter(loader)
    for _ in range(len(loader) // t.accum_steps):
        lr, outcome, step = one_step(t, batches, global_step, buffers, input_size, augment)
        t.parallel.after_step(global_step)  # local SGD averages the weights here, on its schedule
        sums["bad"] += step["bad"]
        if outcome == "done":
            t.skipped_in_a_row = 0
            for key in ("loss_sum", "correct", "images"):
                sums[key] += step[key]
        else:
            sums["skipped"], t.skipped_in_a_row = sums["skipped"] + 1, t.skipped_in_a_row + 1
            if t.skipped_in_a_row >= t.max_nonfinite:
                raise NonFiniteLoss(_skip_message(t, outcome, t.skipped_in_a_row, global_step))
        global_step += 1
        seen = sums["images"]
        progress.update(loss=sums["loss_sum"] / max(seen, 1), top1=sums["correct"] / max(seen, 1),
                        img_s=seen / (time.perf_counter() - start), lr=lr)
        sums["seconds"] = time.perf_counter() - start
        if after_step is not None and after_step(global_step, dict(sums)):
            stopped = True
            break
    progress.close()
    return {**sums, "seconds": time.perf_counter() - start, "global_step": global_step, "stopped": stopped}


def _skip_message(t: Trainer, outcome: str, in_a_row: int, global_step: int) -> str:
    if outcome == "nonfinite":
        return (f"the loss was not finite for {in_a_row} steps in a row (up to global step {global_step + 1}); "
                f"the weights are those of the last finite step")
    return (f"the gradients were not finite for {in_a_row} steps in a row (up to global step {global_step + 1}, "
            f"fp16 loss scale now {t.scaler.get_scale():g})")


def one_step(t: Trainer, batches, global_step: int, buffers: list, input_size: int, augment):
    """(lr, outcome, this step's sums): outcome "done", "nonfinite" (the loss was not finite on some rank:
    skipped by all) or "overflow" (the fp16 scaler skipped it)."""
    lr = t.schedule.lr(global_step)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.optimizer.zero_grad(set_to_none=True)
    step = {"loss_sum": 0.0, "correct": 0, "images": 0, "bad": 0}
    at_step_start = [b.clone() for b in buffers]
    for micro in range(t.accum_steps):
        for key, value in zip(step, micro_batch(t, next(batches), micro, global_step, buffers, input_size, augment)):
            step[key] += value
    if t.any_rank(not math.isfinite(step["loss_sum"])):
        t.optimizer.zero_grad(set_to_none=True)  # skipped by every rank: the weights stay as they are
        restore(buffers, at_step_start)  # and so do the statistics, which a non-finite batch would poison
        return lr, "nonfinite", step
    if t.scaler is not None:
        if t.clip_grad_norm or t.parallel.agree_on_overflow:
            t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the scaled ones; agree on an overflow
        if t.clip_grad_norm:
            t.parallel.clip_grad_norm(t.optimizer, t.clip_grad_norm)
        scale = t.scaler.get_scale()
        t.scaler.step(t.optimizer)  # skips the update when the scaled gradients overflowed, and lowers the scale
        t.scaler.update()
        if t.scaler.get_scale() < scale:  # skipped by the scaler: counted like a non-finite loss
            restore(buffers, at_step_start)
            return lr, "overflow", step
        return lr, "done", step
    if t.clip_grad_norm:
        t.parallel.clip_grad_norm(t.optimizer, t.clip_grad_norm)
    t.optimizer.step()
    return lr, "done", step


def micro_batch(t: Trainer, batch, micro: int, global_step: int, buffers: list, input_size: int, augment):
    """Forward and backward of one micro-batch: (loss sum, top-1 correct, images, unreadable images)."""
    images, target, n_bad = on_device(batch, t.device, t.channels_last, augment)
    blank = target.numel() == 0
    if blank:
        # Every image of this micro-batch was unreadable: a zero-weighted step on a blank image keeps
        # this rank in step with the others (DDP all-reduces on every rank at every step).
        images = to_device(torch.zeros(1, 3, input_size, input_size), t.device, t.channels_last)
        target = torch.zeros(1, dtype=torch.long, device=t.device)
        before = [b.clone() for b in buffers]
    partner, lam = target, 1.0
    if t.mix is not None and not blank:
        images, perm, lam = t.mix(images, global_step, micro)
        partner = target[perm]
    with t.parallel.no_sync(micro == t.accum_steps - 1):
        with autocast(t.device, t.amp_dtype):
            logits = t.parallel(images).float()
        loss = t.criterion(logits, target) * (0.0 if blank else 1.0)
        if lam < 1.0:
            loss = lam * loss + (1.0 - lam) * t.criterion(logits, partner)
        scaled = loss / t.accum_steps
        (t.scaler.scale(scaled) if t.scaler is not None else scaled).backward()
    if blank:
        restore(buffers, before)  # BatchNorm's statistics are left as they were by a blank batch
        return 0.0, 0, 0, n_bad
    n = target.numel()
    return loss.item() * n, topk_correct(logits.detach(), target if lam >= 0.5 else partner, ks=(1,))[0], n, n_bad


def restore(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)


def param_groups(params, bias_decay: bool) -> list[dict]:
    """One group, or without bias decay two: the weights of convolutions and linear layers (more than one
    dimension) with the optimizer's weight decay, the biases and BatchNorm scales and shifts (one dimension)
    without. `params`: a model, or the parameters a parallelism strategy steps."""
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    if bias_decay:
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
