"""Training: `fit(cfg)` sets up, builds, resumes, then per epoch trains, validates, records and saves.

Its parts: plan (values derived once from the settings and the world), step (one optimizer step and an
epoch of them; the parallelism strategy), state (what a checkpoint holds), hooks (checkpoint cadence and
agreed stops), record (metrics, log lines, report), schedule (the learning rate of each step)."""

from __future__ import annotations

import socket
from pathlib import Path

from .. import checkpoint, distributed, logs
from ..config import TrainConfig
from ..data import autopack, held, packed
from ..data.build import build_loaders, changed, describe, disagreement
from ..data.build import fingerprint as data_fingerprint
from ..data.synthetic import ensure_dataset
from ..errors import CheckpointError, ConfigError, DataError, DistributedError, NonFiniteLoss
from ..evaluate import evaluate
from ..progress import Progress
from ..runtime import configure, precision_warning, resolve_device, seed_everything, tune_allocator
from . import record as record_lock
from . import state as states
from .hooks import Hooks
from .plan import Plan, augmentation, batch_sizes, default_out, evaluation, learning_rate, make_plan, unused_images
from .record import Record, check_writable
from .schedule import Schedule
from .step import Trainer, build_trainer, param_groups, train_one_epoch
from .step import describe as describe_model

__all__ = ["fit", "Plan", "Schedule", "Trainer", "batch_sizes", "learning_rate", "param_groups", "train_one_epoch"]


def fit(cfg: TrainConfig, log=print, early=None) -> dict:
    """Train as `cfg` says; returns the last epoch's metrics. `early` (logs.hold_early) holds what was said
    before, while the settings were resolved: it goes into the run's train.log too."""
    early = early or logs.hold_early()  # what is said before the run folder exists goes into its train.log too
    try:
        return _fit(cfg, log, early)
    finally:
        logs.drop_early(early)
        held.release()  # on every exit, an error before the first epoch too: no held split stays mapped
        record_lock.let_go()


def _fit(cfg: TrainConfig, log, early) -> dict:
    plan, device, threads, say = set_up(cfg, log, early)
    try:
        return _train(cfg, plan, device, threads, say, log, early)
    except RuntimeError as e:
        if (lost := distributed.lost_node(e)) is None:
            raise
        raise node_lost(lost, plan, e) from None


def open_data(cfg: TrainConfig, plan: Plan, device, say):
    """(data folder, loaders). With several processes, only once every rank has opened the same data: a rank
    whose copy differs (another image count, other files or classes), or that could not open its own, stops
    every rank at once with one message, instead of overlapping shards or a wait until the timeout."""
    data_root = cfg.data or "the built-in dataset"
    try:
        data_root = cfg.data or str(ensure_dataset(cfg.synthetic_seed, cfg.cache_dir, log=say))
        data = build_loaders(autopack.location(cfg) or data_root, device, train=augmentation(cfg), val=evaluation(cfg),
                             batch_size=plan.batch_size, eval_batch=plan.eval_batch, workers=cfg.workers,
                             seed=cfg.seed, rank=plan.rank, world=plan.world, on_bad_image=cfg.on_bad_image,
                             jpeg_decode=cfg.jpeg_decode, data_on_device=cfg.data_on_device, val_dir=cfg.val_dir,
                             val_fraction=cfg.val_fraction, split_seed=cfg.split_seed, say=say)
        outcome = {"fingerprint": data_fingerprint(data)} if plan.world > 1 else {}
    except (DataError, OSError) as e:
        if plan.world == 1:
            raise
        data, outcome = None, {"error": str(e)}
    if plan.world > 1:
        found = distributed.all_gather_objects((socket.gethostname(), data_root, outcome))
        if problem := disagreement(found):
            raise DataError(problem)
    return data_root, data


def _train(cfg: TrainConfig, plan: Plan, device, threads: int, say, log, early) -> dict:
    data_root, data = open_data(cfg, plan, device, say)
    plan = plan.with_steps(len(data.train), len(data.train_set), len(data.train.sampler))
    trainer = build_trainer(cfg, plan, device, len(data.classes), say)
    recorded = data_fingerprint(data, sizes=False) if plan.main else None  # what checkpoints record of the data
    state = resume(cfg, plan, trainer, data.classes, recorded, data_root, say)
    left_out = (autopack.unreadable(pack) if (pack := autopack.location(cfg)) else
                autopack.given_pack_left_out(Path(data_root), cfg.on_bad_image, say) if packed.is_packed(data_root)
                else (0, 0))
    record = Record(plan, say, log, left_out)
    record.open(early, state.epoch, held_out=getattr(data.val_set, "held_out", None))
    if state.resumed:
        say(state.resumed)
    say(f"run folder {plan.out}; {len(data.train_set)} train and {len(data.val_set)} val images in "
        f"{len(data.classes)} classes from {data_root}{describe(data.train_set, device)}; {describe_model(cfg, trainer, threads)}")
    if warning := precision_warning(trainer.amp_dtype, device):
        say(f"WARNING: {warning}")
    say(plan.describe())
    if len(data.train.sampler) < plan.batch_size:  # the loader keeps the short batch: the only one there is
        say(f"WARNING: the batch ({plan.batch_size} per process, {plan.global_batch} global) is more than the "
            f"{len(data.train_set)} training images: an epoch is one step, of the {len(data.train.sampler)} images "
            f"each process has ({len(data.train.sampler) * plan.world} in all); a smaller --batch-size (or "
            f"--global-batch-size) makes more steps an epoch")
    elif tail := unused_images(len(data.train_set), plan.steps_per_epoch, plan.global_batch,
                               plan.world * cfg.accum_steps):
        say(f"WARNING: {tail}")
    try:
        return run_epochs(plan, trainer, data, state, record, say, recorded)
    finally:
        record.close()


def set_up(cfg: TrainConfig, log, early) -> tuple[Plan, object, int, object]:
    """Threads, seeds, the process group, the run folder's name (rank 0's) and the plan."""
    tune_allocator()
    threads = configure(cfg.deterministic, cfg.threads)
    seed_everything(cfg.seed)
    device = distributed.setup(resolve_device(cfg.device), cfg.backend, cfg.dist_timeout, log)
    rank, world = distributed.rank(), distributed.world_size()
    say = log if rank == 0 else _silent  # one voice: rank 0 reports; every rank reports errors and its weights
    if rank != 0:
        logs.drop_early(early)  # no run folder here to write them to
    out = Path(distributed.broadcast_object(cfg.out or str(default_out(cfg))))  # one folder, rank 0's name
    problem = None
    if rank == 0:
        check_writable(out)  # before any work, without leaving an empty folder behind on a later error
        try:  # a run folder another run is writing (--resume auto while it runs): refused before any work
            if out.is_dir():
                record_lock.hold(out, start=False)  # the folder as it is, until the run starts writing it
        except ConfigError as e:
            problem = str(e)
    if world > 1:  # every rank stops with rank 0's message, not with a lost peer
        problem = distributed.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    return make_plan(cfg, rank, world, out), device, threads, say


def resume(cfg: TrainConfig, plan: Plan, trainer: Trainer, classes: list[str], recorded: dict | None,
           data_root: str, say) -> states.TrainState:
    """The state to start from: a fresh one, or a checkpoint's (--resume; restarted workers continue by
    themselves from the newest checkpoint the ranks agree on). `recorded`: what the data is now (rank 0's
    data.build.fingerprint without sizes), compared with what the checkpoint recorded."""
    source, saved = states.find_resume(cfg.resume or ("auto" if states.restarted() else None), plan.ckpt_dir,
                                       plan.rank, say)
    if source is None:
        return states.TrainState()
    if list(saved["classes"]) != classes:
        raise CheckpointError(f"{source} was trained on other classes than {data_root}")
    if recorded is not None and (what := changed(saved.get("data", {}), recorded)):
        split = [f"--{k.replace('_', '-')}" for k in ("val_dir", "val_fraction", "split_seed")
                 if saved["config"].get(k) != getattr(cfg, k)]
        cause = (f"the validation split is chosen otherwise now ({', '.join(split)})" if split else
                 f"{data_root} changed since {source} was saved")
        say(f"WARNING: the data differs from {source}'s: {what}; {cause}. Training goes on with the data as it is "
            f"now, so the run no longer follows the one an uninterrupted run would have taken")
    before = saved.get("world_size", plan.world)
    if before != plan.world:  # an elastic job that lost or regained a node, or a resume on another machine
        per, accum = saved["config"].get("batch_size", plan.batch_size), saved["config"].get("accum_steps", 1)
        was = per * before * accum
        why = ((f"--global-batch-size {'keeps' if was == plan.global_batch else 'sets'} it") if cfg.global_batch_size
               else "--batch-size is per process")
        say(f"the world size changed from {before} to {plan.world} processes: the global batch is "
            f"{plan.global_batch} {'as before' if was == plan.global_batch else f'now (it was {was})'}, the peak "
            f"learning rate {plan.peak_lr:g} ({why}{'; --lr-scaling linear follows it' if cfg.lr_scaling == 'linear' else ''})")
    state = states.from_checkpoint(trainer, saved, source, train_bn=cfg.train_bn, rank=plan.rank, world=plan.world,
                                   say=say)
    per, accum = saved["config"].get("batch_size", plan.batch_size), saved["config"].get("accum_steps", 1)
    if state.step_in_epoch and per * before * accum != plan.global_batch:
        state.step_in_epoch = min(within_epoch(state.step_in_epoch, per * before * accum, plan.global_batch, say),
                                  plan.steps_per_epoch)
    if state.epoch >= cfg.epochs:
        state.resumed = (f"the run is already complete: {source} holds all {saved['epoch']} epoch{'s' if saved['epoch'] != 1 else ''} (--epochs "
                         f"{cfg.epochs}); nothing more to train. To train on, give a larger --epochs with --resume")
    return state


def within_epoch(steps: int, before: int, now: int, say) -> int:
    """Where a run stopped inside an epoch, `steps` steps of global batch `before` in, continues with global
    batch `now`: after the images it had trained on (the epoch's order is the same whatever the batch); a
    part of a step left over is trained on again, and said."""
    done = steps * before
    again = done % now
    if again:
        say(f"WARNING: the run stopped {done} images into the epoch, which is not a whole number of steps of the "
            f"global batch of {now} now: the epoch goes on after {done - again} of them, so {again} are seen again")
    return done // now


def run_epochs(plan: Plan, trainer: Trainer, data, state, record: Record, say, recorded: dict | None = None) -> dict:
    cfg, classes, first = plan.resolved, data.classes, state.epoch
    last, v = {}, {}

    def save(epoch: int, step_in_epoch: int, sums: dict | None, is_best: bool = False) -> None:
        states.save(trainer, state, plan, classes, epoch=epoch, step_in_epoch=step_in_epoch, sums=sums,
                    metrics=last, is_best=is_best, held_out=getattr(data.val_set, "held_out", None), data=recorded)

    hooks = Hooks(state, checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                  steps_per_epoch=plan.steps_per_epoch, world=plan.world, save=save, scalars=record.scalars,
                  lr=lambda: trainer.optimizer.param_groups[0]["lr"])
    for epoch in range(first, cfg.epochs):
        t = train_epoch(plan, trainer, data, state, hooks, epoch, epoch == first, say)
        if t["stopped"] and hooks.in_epoch(t["global_step"]) < plan.steps_per_epoch:
            return stopped(hooks, state, plan, last, say)
        v = validate(plan, trainer, data, epoch)
        last = record.epoch(epoch, t, v, lr=trainer.optimizer.param_groups[0]["lr"], crop=plan.crops[epoch])
        is_best = bool(v) and v["acc1"] > state.best_acc1
        state.best_acc1 = max(state.best_acc1, v.get("acc1", -1.0))
        save(epoch + 1, 0, None, is_best)
        hooks.saved()
        record.say_epoch(last, v, t)
        if t["stopped"]:
            return stopped(hooks, state, plan, last, say)
    hooks.close()
    record.finish(v, classes, state.best_acc1, trainer.model)
    return last


def train_epoch(plan: Plan, trainer: Trainer, data, state, hooks: Hooks, epoch: int, first: bool, say) -> dict:
    """One epoch's training, from the resumed step in the first; a NonFiniteLoss saves a checkpoint first."""
    cfg, crops = plan.resolved, plan.crops
    skip = state.step_in_epoch if first else 0
    data.train.sampler.set_epoch(epoch, skip=skip * plan.batch_size * cfg.accum_steps)
    hooks.start_epoch(epoch, skip)
    if cfg.progressive_crop and (first or crops[epoch] != crops[epoch - 1]):
        say(f"epoch {epoch + 1}: training crops of {crops[epoch]} px (progressive resizing to {cfg.crop})")
    progress = Progress(plan.steps_per_epoch - skip, f"epoch {epoch + 1}/{cfg.epochs}", every=cfg.log_every,
                        enabled=plan.main and not cfg.quiet)
    try:
        t = train_one_epoch(trainer, data.train, global_step=state.global_step, progress=progress,
                            sums=state.partial if skip else None, after_step=hooks.after_step,
                            input_size=crops[epoch], augment=data.train_augment)
    except NonFiniteLoss as e:
        hooks.save(epoch, hooks.in_epoch(state.global_step), None)
        raise NonFiniteLoss(f"{e}. Checkpoint saved: {plan.ckpt_dir / 'last.pt'}. A lower --lr, a longer "
                            f"--warmup-epochs or checking the data usually helps") from None
    finally:
        progress.close()  # also on an error: its message then starts on a clean line
    state.global_step = t["global_step"]
    return t


def validate(plan: Plan, trainer: Trainer, data, epoch: int) -> dict:
    """The validation metrics after `epoch` (empty when --val-every skips it); BatchNorm's statistics
    (--train-bn) are averaged over the ranks first. The last epoch's also counts the confusion matrix."""
    cfg = plan.resolved
    trainer.parallel.refresh()  # the whole model: hybrid's slices gathered, local SGD's weights averaged
    distributed.average_buffers(trainer.model)
    final = epoch + 1 == cfg.epochs
    if not (final or (epoch + 1) % cfg.val_every == 0):
        trainer.schedule.end_epoch(None)
        return {}
    v = evaluate(trainer.model, data.val, trainer.device, cfg.channels_last,
                 confusion_classes=len(data.classes) if final else 0, amp_dtype=trainer.amp_dtype,
                 augment=data.val_augment)
    trainer.schedule.end_epoch(v["loss"])
    return v


def stopped(hooks: Hooks, state, plan: Plan, last: dict, say) -> dict:
    hooks.close()
    say(f"stopped on {hooks.preempted.name or 'a signal'} at global step {state.global_step}, checkpoint saved; continue with "
        f"`alexnet train --resume auto --out {plan.out}`")
    return last


def node_lost(lost: dict, plan: Plan, e: RuntimeError) -> DistributedError:
    """The error of a rank whose collective with another node failed: which node, when it was last heard
    from, the newest checkpoint here; the same facts left for this node's launcher, which adds how to
    continue. Nothing is saved now: the failed collective left the step half done on the ranks still
    here, and a checkpoint needs every rank's part."""
    newest = checkpoint.newest_step(plan.ckpt_dir)
    distributed.note_for_launcher({"lost": lost, "out": str(plan.out), "checkpoint": str(newest) if newest else None})
    ranks = ", ".join(map(str, lost["ranks"]))
    where = f"the newest checkpoint here is {newest}" if newest else f"no checkpoint in {plan.ckpt_dir} here"
    return DistributedError(f"lost node {lost['node']} (host {lost['host']}, {lost['addr']}; rank(s) {ranks}), last "
                            f"heard from at {lost['seen']}: it stopped or the link to it failed ({distributed.failure_text(e)}); "
                            f"{where}")


def _silent(*args, **kwargs) -> None:
    pass
