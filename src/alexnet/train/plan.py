"""The plan of a run: every value derived from the settings and the world, computed once and frozen.

The settings (`TrainConfig`) are never changed after they are resolved; what a run works out from them
(per-process and global batch, peak learning rate, steps per epoch, the crop of each epoch) lives here,
and `resolved` is the config as the run saves it (its folder and per-process batch filled in)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..config import TrainConfig, eval_crop, images_per_eval_batch, to_dict
from ..data import crop_schedule
from ..errors import ConfigError


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


def crop_sizes(cfg: TrainConfig) -> list[int]:
    """The training crop of each epoch: --crop, or growing to it (--progressive-crop)."""
    return crop_schedule(cfg.crop, cfg.epochs, cfg.progressive_crop, cfg.progressive_start, cfg.progressive_end)


def augmentation(cfg: TrainConfig) -> dict:
    """The training augmentation's settings as the data layer takes them (data.train_transform's
    arguments): plain values, not the settings object."""
    return dict(resize=cfg.resize, crop=cfg.crop, mean=cfg.mean, std=cfg.std,
                random_resized_crop=cfg.random_resized_crop, rrc_min_scale=cfg.rrc_min_scale,
                crop_sizes=crop_sizes(cfg) if cfg.progressive_crop else None, hflip=cfg.hflip,
                brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue,
                rotation=cfg.rotation, pca_lighting=cfg.pca_lighting, pca_eigval=cfg.pca_eigval,
                pca_eigvec=cfg.pca_eigvec)


def evaluation(cfg: TrainConfig) -> dict:
    """The validation transform's settings (data.eval_transform's arguments)."""
    return dict(resize=cfg.resize, crop=eval_crop(to_dict(cfg)), mean=cfg.mean, std=cfg.std, tta=cfg.val_tta)


def default_out(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class Plan:
    rank: int
    world: int
    out: Path
    batch_size: int  # per process and micro-batch
    global_batch: int  # over all processes and accumulation steps
    eval_batch: int  # images per validation batch (fewer with test-time views)
    peak_lr: float
    crops: tuple[int, ...]  # the training crop of each epoch
    resolved: TrainConfig  # the settings as saved: the run folder and per-process batch filled in
    steps_per_epoch: int = 0  # known once the loader is: see with_steps

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def describe(self) -> str:
        """The batch and learning rate, for the run's first lines."""
        c, world = self.resolved, self.world
        return (f"batch: {self.batch_size} per process x {world} process{'es' if world > 1 else ''} x "
                f"{c.accum_steps} accumulation step{'s' if c.accum_steps > 1 else ''} = {self.global_batch} global; "
                f"lr {self.peak_lr:g}" + (f" (--lr {c.lr:g} scaled by {self.global_batch}/{c.lr_reference_batch})"
                                          if c.lr_scaling == "linear" else "") + f"; {self.steps_per_epoch} step{'s' if self.steps_per_epoch != 1 else ''} an epoch")

    def with_steps(self, batches: int, train_images: int, per_process: int) -> "Plan":
        """The plan completed with the optimizer steps an epoch takes from `batches` loader batches."""
        steps = batches // self.resolved.accum_steps
        if steps < 1:
            raise ConfigError(f"an epoch has no full step: {train_images} training images over {self.world} "
                              f"processes give {per_process} each, fewer than --batch-size "
                              f"{self.batch_size} x --accum-steps {self.resolved.accum_steps}")
        return dataclasses.replace(self, steps_per_epoch=steps)


def unused_images(train_images: int, steps: int, global_batch: int, unit: int) -> str | None:
    """A warning when the tail that does not fill a step is a large share (over 10%) of the training set:
    it is left out of every epoch. It names a global batch (a multiple of `unit`, processes x accumulation
    steps) that leaves out at most 5%. None otherwise."""
    dropped = train_images - steps * global_batch
    if dropped <= 0.1 * train_images:
        return None
    better = next((b for b in range(global_batch - global_batch % unit, 0, -unit)
                   if train_images % b <= 0.05 * train_images), unit)
    return (f"{dropped} of {train_images} training images ({dropped / train_images:.0%}) are left out of every "
            f"epoch: {steps} step{'s' if steps != 1 else ''} of {global_batch} images take "
            f"{steps * global_batch}. --global-batch-size {better} (or a --batch-size that gives it) leaves out "
            f"{train_images % better}")


def make_plan(cfg: TrainConfig, rank: int, world: int, out: Path) -> Plan:
    per, global_batch = batch_sizes(cfg, world)
    resolved = dataclasses.replace(cfg, out=str(out), batch_size=per)
    return Plan(rank=rank, world=world, out=out, batch_size=per, global_batch=global_batch,
                eval_batch=images_per_eval_batch(per, cfg.val_tta), peak_lr=learning_rate(cfg, global_batch),
                crops=tuple(crop_sizes(cfg)), resolved=resolved)
