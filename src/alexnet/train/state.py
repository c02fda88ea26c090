"""What a checkpoint holds, both ways: the one place that writes it (`to_checkpoint`), reads it back into
a run (`from_checkpoint`), and reads the model out of it for evaluation and export (`model_from_checkpoint`).

A checkpoint (format 1) holds the model with torchvision's keys ("model"; with --train-bn the BatchNorms
folded away, and the unfolded weights as "model_with_bn"), the optimizer, schedule and fp16 scaler states,
where the run is (epoch, step_in_epoch, global_step), the best top-1 so far, every rank's random state and
its sums of the epoch so far ("ranks"), the world it was saved by, the classes, the resolved config and
the last epoch's metrics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint, distributed
from ..config import to_dict
from ..errors import CheckpointError
from ..models import create_model, folded_state_dict
from ..runtime import match_state_layouts, rng_state, set_rng_state
from .hooks import written


@dataclass
class TrainState:
    """Where a run is; with `partial`, this rank's sums of the epoch it resumes inside."""
    epoch: int = 0  # epochs done: the next one to train
    step_in_epoch: int = 0  # steps of that epoch already done (a resume inside it)
    global_step: int = 0
    best_acc1: float = -1.0
    partial: dict | None = None
    resumed: str = ""  # what was resumed from, for the log


def to_checkpoint(trainer, state: TrainState, *, epoch: int, step_in_epoch: int, ranks: list, metrics: dict,
                  classes: list[str], config: dict, world: int, train_bn: bool, weights: dict | None = None,
                  optimizer: dict | None = None, held_out: list[str] | None = None, data: dict | None = None) -> dict:
    """The checkpoint; `weights` and `optimizer`: the whole model's and optimizer's state where the
    parallelism strategy holds slices (default: the trainer's own); `held_out`: the validation files held
    out of the training folder (--val-fraction), which `alexnet eval` evaluates again; `data`: what the
    run's data was (data.build.fingerprint without sizes), which a resumed run compares with its own."""
    weights = trainer.model.state_dict() if weights is None else weights
    return {"format_version": checkpoint.FORMAT_VERSION,
            "model": folded_state_dict(weights) if train_bn else weights,
            **({"model_with_bn": weights} if train_bn else {}),
            "optimizer": trainer.optimizer.state_dict() if optimizer is None else optimizer,
            "schedule": trainer.schedule.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": state.global_step,
            "best_acc1": state.best_acc1, "torch_rng": torch.get_rng_state(), "ranks": ranks, "world_size": world,
            "device_type": trainer.device.type, "classes": classes, "config": config, "metrics": metrics,
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            **({"val_files": held_out} if held_out is not None else {}), **({"data": data} if data else {})}


def save(trainer, state: TrainState, plan, classes: list[str], *, epoch: int, step_in_epoch: int,
         sums: dict | None, metrics: dict, is_best: bool = False, held_out: list[str] | None = None,
         data: dict | None = None) -> None:
    """Every rank calls this at the same step (it gathers their random states and sums); rank 0 writes
    step-N.pt, points last.pt at it, and with `is_best` writes best.pt."""
    own = trainer.parallel.own_state(trainer.optimizer)  # local SGD: each process's weights and momentum
    ranks = distributed.all_gather_objects({"rng": rng_state(), "sums": sums, **own})
    weights, optimizer = trainer.parallel.state(trainer.optimizer)  # the whole model (hybrid gathers its slices)
    cfg = plan.resolved
    saved = to_checkpoint(trainer, state, epoch=epoch, step_in_epoch=step_in_epoch, ranks=ranks, metrics=metrics,
                          classes=classes, config=to_dict(cfg), world=plan.world, train_bn=cfg.train_bn,
                          weights=weights, optimizer=optimizer, held_out=held_out, data=data) if plan.main else None
    step = checkpoint.step_path(plan.ckpt_dir, state.global_step)
    written("the checkpoint", step, lambda: checkpoint.save_step(saved, plan.ckpt_dir, cfg.keep_last), plan)
    if is_best:  # the step just saved: best.pt is linked to it, not a second copy
        best = plan.ckpt_dir / "best.pt"
        written("the checkpoint", best, lambda: checkpoint.point(best, step, saved), plan)


def from_checkpoint(trainer, saved: dict, source, *, train_bn: bool, rank: int, world: int, say) -> TrainState:
    """Load a checkpoint into the trainer's model, optimizer, schedule and scaler and this process's random
    state; the state of the run it continues. Saved by another world size or device: not bit-exact (said)."""
    ranks = saved.get("ranks")
    saved_on = (saved.get("world_size", 1), saved.get("device_type", trainer.device.type))
    exact = ranks is not None and saved_on == (world, trainer.device.type)
    own = ranks[rank] if exact else {}  # local SGD: this process's own weights and momentum
    weights = saved.get("model_with_bn", saved["model"]) if train_bn else saved["model"]
    weights, optimizer = {**weights, **own.get("model", {})}, saved["optimizer"]
    if "optimizer" in own:  # laid over the whole state: all of it (ddp) or the convolutions' (hybrid)
        optimizer = {**optimizer, "state": {**optimizer["state"], **own["optimizer"]["state"]}}
    try:
        trainer.parallel.load(trainer.optimizer, weights, optimizer)
        match_state_layouts(trainer.optimizer)
        defaults = trainer.optimizer.defaults
        for group in trainer.optimizer.param_groups:  # the implementation asked for now, not the saved one
            group["fused"], group["foreach"] = defaults.get("fused"), defaults.get("foreach")
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"--resume {source}: the checkpoint does not fit this model (was --arch, --fc-width, "
            f"--train-bn or --bias-decay changed?): {_first_detail(e)}") from None
    trainer.schedule.load_state_dict(saved["schedule"])
    if trainer.scaler is not None and saved.get("scaler"):
        trainer.scaler.load_state_dict(saved["scaler"])
    partial = None
    trainer.parallel.resume_at(saved["global_step"])
    if exact:
        set_rng_state(ranks[rank]["rng"])
        partial = ranks[rank]["sums"]
    else:
        torch.set_rng_state(saved["torch_rng"])
        say(f"WARNING: {source} was saved by {saved_on[0]} process(es) on {saved_on[1]}; resuming with "
            f"{world} on {trainer.device.type} works but is not bit-exact")
    skip = saved.get("step_in_epoch", 0)
    return TrainState(epoch=saved["epoch"], step_in_epoch=skip, global_step=saved["global_step"],
                      best_acc1=saved["best_acc1"], partial=partial,
                      resumed=f"resumed from {source} at epoch {saved['epoch'] + 1}, step {skip} of it "
                              f"(global step {saved['global_step']})")


def saved_config(resume: str, out: str | None) -> dict:
    """The settings saved in the checkpoint that --resume names (auto: the newest in OUT/checkpoints; an
    empty dict when there is none), which a resumed run starts from (config.resolve_train)."""
    if resume != "auto":
        return checkpoint.load_run(resume)["config"]
    found = checkpoint.newest_valid(Path(out) / "checkpoints")
    return found[1]["config"] if found else {}


def restarted() -> bool:
    """Whether this worker was started again by its launcher (ours, or torchrun's --max-restarts): it
    continues from the newest checkpoint by itself."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or os.environ.get("ALEXNET_RESTARTED") == "1"


def earlier_run(out: str | None) -> str | None:
    """What stops a new run (no --resume) in `out`: the checkpoints of an earlier run there, which a new
    run would mix with its own (--resume auto takes the newest step file, whichever run wrote it)."""
    folder = Path(out) / "checkpoints" if out else None
    if folder is None or not folder.is_dir():
        return None
    found = checkpoint.newest_step(folder) or next((folder / n for n in ("last.pt", "best.pt") if (folder / n).exists()),
                                                   None)
    if found is None:
        return None
    return (f"--out {out} holds the checkpoints of an earlier run (the newest: {found.name}): continue it with "
            f"--resume auto (with a larger --epochs to train it on), or give another --out for a new run")


def find_resume(resume: str | None, ckpt_dir: Path, rank: int, say) -> tuple[Path | str | None, dict | None]:
    """The checkpoint to continue from: --resume's file, or with auto (and in a restarted worker) the newest
    that the ranks agree on; (None, None) for a fresh start."""
    if resume == "auto":
        return newest_agreed(ckpt_dir, rank, say)
    if resume:
        return Path(resume), checkpoint.load_run(resume)
    return None, None


def newest_agreed(ckpt_dir: Path, rank: int, say) -> tuple[Path | str | None, dict | None]:
    """The newest usable checkpoint that any rank holds, on every rank. Without shared storage only some
    machines hold it: the ranks agree on the newest global step any of them has, and one holder sends
    it to the others, so that no rank silently starts afresh while others resume."""
    found = checkpoint.newest_valid(ckpt_dir, log=say)
    held = [] if found else checkpoint.unusable(ckpt_dir)
    steps = distributed.all_gather_objects((found[1]["global_step"] if found else -1, held))
    newest = max(step for step, _ in steps)
    if newest < 0 and any(files for _, files in steps):
        rank_, files = next((r, files) for r, (_, files) in enumerate(steps) if files)
        where = f" (on rank {rank_}'s machine)" if len(steps) > 1 else ""
        raise CheckpointError(
            f"--resume auto: {ckpt_dir}{where} holds checkpoints, but none that the run can continue from "
            f"({', '.join(files)}). Nothing in the run folder was changed. Copy good checkpoints there (or give "
            f"one with --resume FILE), or move these away to start the run afresh")
    steps = [step for step, _ in steps]
    if newest < 0:
        say(f"no checkpoint in {ckpt_dir}: starting afresh")
        return None, None
    if all(s == newest for s in steps):
        return found
    holder = steps.index(newest)
    say(f"the newest checkpoint (global step {newest}) is on rank {holder}'s machine only: sending it to the others")
    saved = distributed.broadcast_object(found[1] if rank == holder else None, src=holder)
    return f"{checkpoint.step_path(ckpt_dir, newest)} (from rank {holder})", saved


def model_from_checkpoint(saved: dict) -> nn.Module:
    """The trained model of a checkpoint (the plain architecture, with torchvision's keys), in eval mode."""
    cfg = saved["config"]
    model = create_model(cfg["arch"], len(saved["classes"]), cfg["dropout"], cfg["fc_width"])
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as e:  # weights that are not those its own settings and classes describe: edited by hand
        raise CheckpointError(f"the checkpoint's weights do not fit its own settings ({cfg['arch']}, fc width "
                              f"{cfg['fc_width']}, {len(saved['classes'])} classes): {_first_detail(e)}; it was "
                              f"changed since it was saved: use another checkpoint of the run") from None
    return model.eval()


def _first_detail(e: Exception) -> str:
    """load_state_dict's first particular ("size mismatch for classifier.1.weight: ..."), not its heading
    ("Error(s) in loading state_dict for AlexNet:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]).rstrip(".")
