"""What runs after every optimizer step: the checkpoint cadence inside epochs (every N steps or minutes),
the stop on SIGTERM that all ranks agree on, and the step's scalars for TensorBoard; and the agreed stop
when rank 0 cannot write to the run folder (`written`).

The stop vote is taken after the optimizer step (so that every rank stops at the same step and rank 0
saves it); the non-finite vote, before it, is the step's own (train.step)."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from .. import checkpoint, distributed
from ..config import parse_every
from ..errors import WriteError


class StopSignal:
    """Notes a SIGTERM (preemption by Slurm or Kubernetes), a Ctrl-C (SIGINT) or a hang-up (SIGHUP: the
    terminal closed) so that the loop stops at a step boundary; `name` is the signal's. A second one ends
    the process at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested, self.name = False, ""
        # A worker of `alexnet train --nproc-per-node` leaves Ctrl-C to the launcher (launch.CtrlC), which
        # sends it SIGTERM: a Ctrl-C that reached it too would otherwise count as the second request.
        ignore_int = distributed.launched() and os.environ.get("ALEXNET_SIGINT") == "launcher"
        try:
            self._previous = {s: signal.signal(s, signal.SIG_IGN if ignore_int and s == signal.SIGINT else self._handle)
                              for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second one: the user (or the launcher tearing the workers down) means now
            raise SystemExit(128 + signum)
        self.requested, self.name = True, signal.Signals(signum).name

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


class Hooks:
    """`after_step(step, sums)` for train_one_epoch: True when the ranks agreed to stop. `save(epoch,
    step_in_epoch, sums)` writes a checkpoint; `state` (train.state.TrainState) follows the global step."""

    def __init__(self, state, *, checkpoint_every: str, log_every: int, steps_per_epoch: int, world: int,
                 save, scalars, lr) -> None:
        self.state, self.save, self.scalars, self.lr = state, save, scalars, lr
        self.every_steps, self.every_minutes = parse_every(checkpoint_every)
        self.log_every, self.steps_per_epoch, self.world = log_every, steps_per_epoch, world
        self.last_save = time.monotonic()
        self.preempted = StopSignal()
        self.epoch = self.epoch_start_step = self.skip = 0

    def start_epoch(self, epoch: int, skip: int) -> None:
        """An epoch begins at the state's global step, `skip` of its steps done already (a resume)."""
        self.epoch, self.epoch_start_step, self.skip = epoch, self.state.global_step, skip

    def in_epoch(self, step: int) -> int:
        """Steps of the current epoch done at global step `step`."""
        return (step - self.epoch_start_step) + self.skip

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def after_step(self, step: int, sums: dict) -> bool:
        """Checkpoint inside the epoch when due; stop, agreed by all ranks, on SIGTERM."""
        self.state.global_step = step
        timed = self.every_minutes > 0 and time.monotonic() - self.last_save >= self.every_minutes * 60
        if self.world > 1:  # the ranks must take the same decision at the same step
            stop, timed = (v > 0 for v in distributed.sum_all([float(self.preempted.requested), float(timed)]))
        else:
            stop = self.preempted.requested
        in_epoch = self.in_epoch(step)
        if step % self.log_every == 0:
            self.scalars.add(step, {"train/loss": sums["loss_sum"] / max(sums["images"], 1),
                                    "train/top1": sums["correct"] / max(sums["images"], 1), "train/lr": self.lr()})
        if in_epoch < self.steps_per_epoch and (stop or timed or self.every_steps and step % self.every_steps == 0):
            self.save(self.epoch, in_epoch, sums)
            self.saved()
        return stop

    def close(self) -> None:
        self.preempted.restore()


def written(what: str, path: Path, write, plan) -> None:
    """Rank 0 runs `write` (which writes `what` to `path`); then every rank learns whether it worked, and
    on a failure (no space, a quota, permissions, a vanished mount) every rank raises the same WriteError
    at the same point: no rank is left waiting for rank 0 in a collective until the timeout. Timed and
    step checkpoints stop the run too: a run that cannot save would lose its work at the next fault."""
    cause = None
    if plan.main:
        try:
            write()
        except (OSError, RuntimeError) as e:  # torch.save's RuntimeError carries the OSError as its context
            cause = _cause(e)
    cause = distributed.broadcast_object(cause)
    if cause is None:
        return
    newest = checkpoint.newest_step(plan.ckpt_dir)
    newest = (f"the newest complete checkpoint is {newest}" if newest else f"there is no complete checkpoint in "
              f"{plan.ckpt_dir} yet")
    text, number = cause
    fix = {errno.ENOSPC: "Make room (or move the run folder to a disk with room)",
           errno.EDQUOT: "Make room within your quota (or move the run folder to a disk with room)",
           errno.EACCES: f"Give yourself permission to write in {path.parent} (or move the run folder)",
           errno.EPERM: f"Give yourself permission to write in {path.parent} (or move the run folder)",
           errno.EROFS: "The disk is mounted read-only: move the run folder to one you can write"}.get(
        number, "Fix the cause")
    raise WriteError(f"could not write {what} {path}: {text}; {newest}. {fix} and continue with "
                     f"`alexnet train --resume auto --out {plan.out}`")


def _cause(e: BaseException) -> tuple[str, int | None]:
    """What went wrong, in words, and the OSError's number where there is one."""
    seen = e
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if isinstance(seen, OSError) and seen.strerror:
        return f"{seen.strerror} (errno {seen.errno})", seen.errno
    return (str(e).splitlines()[0] if str(e) else type(e).__name__), None
