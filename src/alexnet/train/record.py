"""What a run records: the run folder (config.yaml, train.log, TensorBoard), one metrics.jsonl line and
one log line per epoch, and at the end the table of epochs and report.md. Rank 0 writes; every rank says
its errors and its final weights' hash."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .. import distributed, logs, report
from ..config import save_yaml, to_dict
from ..errors import ConfigError
from .hooks import written


def check_writable(folder: Path) -> None:
    """Fail now, with the path in the message, if `folder` cannot be created or written."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(existing))


LOCK = ".run.lock"  # in the run folder: held by the process that writes the folder while it runs
_HELD: dict[Path, int] = {}  # run folder -> the lock's descriptor, in this process


def hold(out: Path, start: bool = True) -> None:
    """Take the run folder `out` for this process (an fcntl record lock on out/.run.lock, which the system
    lets go of when the process ends, however it ends, and which forked loader workers do not share); a
    folder this process holds already stays held. A folder another live run holds is refused: two runs in
    one folder would interleave their metrics.jsonl lines and checkpoints. Where the lock cannot be taken
    (a file system without locks, a lock file of another user's), the run goes on unguarded, as before."""
    import fcntl
    if out in _HELD:
        if start:
            _mark(_HELD[out])
        return
    try:  # `start` False: checked before any work, where nothing in the folder may change yet
        fd = os.open(out / LOCK, os.O_RDWR | (os.O_CREAT if start else 0), 0o666)  # the umask decides
    except OSError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        host = holder.split(" on ")[-1].split(",")[0] if " on " in holder else ""
        stale = (f"; if {host} is down, its lock may outlive it on a network file system: delete {out / LOCK}"
                 if host and host != socket.gethostname() else "")
        raise ConfigError(f"--out {out} is in use by another run ({holder or 'which process, it did not say'}): let "
                          f"it finish, or stop it (it saves a checkpoint on SIGTERM) and continue with --resume "
                          f"auto; or give another --out{stale}") from None
    except OSError:
        os.close(fd)
        return
    _HELD[out] = fd
    if start:
        _mark(fd)


def _mark(fd: int) -> None:
    """Write this process into the lock file, for the message of a run refused while it holds the folder."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)


def let_go() -> None:
    """Let go of every run folder this process holds (at the end of a run, however it ends)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


class Record:
    def __init__(self, plan, say, log, left_out: tuple[int, int] = (0, 0)) -> None:
        """`left_out`: the (training, validation) files that the pack made on first use (data.autopack) left
        out as unreadable, counted in every epoch as the files themselves would be."""
        self.plan, self.say, self.log, self.left_out = plan, say, log, left_out
        self.file, self.scalars = None, logs.Scalars(None)

    def open(self, early, epochs_done: int = 0, held_out: list[str] | None = None) -> None:
        """Make the run folder: once data, model and checkpoint are known to work, so that errors before
        leave none. metrics.jsonl keeps the lines of the `epochs_done` epochs the run starts after: a run
        stopped between an epoch's line and its checkpoint repeats that epoch, and records it once.
        `held_out`: the validation files held out of the training folder (--val-fraction), listed in
        val_files.txt."""
        if not self.plan.main:
            return
        out = self.plan.out
        self.plan.ckpt_dir.mkdir(parents=True, exist_ok=True)
        hold(out)  # before anything in the folder changes (set_up took it already where the folder was there)
        if epochs_done >= self.plan.resolved.epochs and (out / "metrics.jsonl").exists():
            # a complete run (a checkpoint at --epochs or past it): nothing is trained, so its record stays
            self.file = logs.to_file(out / "train.log", early)
            return
        self._keep_epochs(out / "metrics.jsonl", epochs_done)
        save_yaml(self.plan.resolved, out / "config.yaml")
        if held_out is not None:
            (out / "val_files.txt").write_text("".join(f"{name}\n" for name in held_out))
        self.file = logs.to_file(out / "train.log", early)
        if self.plan.resolved.tensorboard:
            self.scalars = logs.Scalars(out / "tensorboard")

    def _keep_epochs(self, path: Path, epochs_done: int) -> None:
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if _epoch_of(line) <= epochs_done]
        if len(kept) < len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
            self.say(f"metrics.jsonl: {len(lines) - len(kept)} line(s) of epochs after the checkpoint's "
                     f"(epoch {epochs_done}) removed; those epochs are trained again")

    def epoch(self, epoch: int, t: dict, v: dict, *, lr: float, crop: int) -> dict:
        """The epoch's metrics over all ranks (`t`: this rank's training sums; `v`: the validation's, or
        empty when not validated), written to metrics.jsonl and TensorBoard and said in one line."""
        loss_sum, correct, images, seconds, bad = distributed.sum_all(
            [t["loss_sum"], t["correct"], t["images"], t["seconds"], t["bad"]])
        validated = bool(v)
        epoch_seconds = seconds / self.plan.world
        none = float("nan")  # an epoch whose every step was skipped (not finite) has no training loss to show
        last = {"epoch": epoch + 1, "train_loss": loss_sum / images if images else none,
                "train_acc1": correct / images if images else none,
                **({"val_loss": v["loss"], "val_acc1": v["acc1"], "val_acc5": v["acc5"]} if validated else {}),
                "lr": lr, "images_per_sec": images / epoch_seconds, "epoch_seconds": epoch_seconds,
                "global_step": t["global_step"], "skipped_steps": t["skipped"], "bad_images": int(bad) + self.left_out[0],
                **({"val_bad_images": v["bad_images"] + self.left_out[1]} if validated else {}), "train_crop": crop}
        def line() -> None:
            with open(self.plan.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
        written("a line of", self.plan.out / "metrics.jsonl", line, self.plan)
        if self.plan.main:
            self.scalars.add(t["global_step"], {f"epoch/{k}": v for k, v in last.items()
                                                if k not in ("epoch", "global_step")})
            self.scalars.flush()
        return last

    def say_epoch(self, last: dict, v: dict, t: dict) -> None:
        """The epoch's warnings (unreadable images, skipped steps) and its line."""
        cfg, epoch = self.plan.resolved, last["epoch"]
        if last["bad_images"] or last.get("val_bad_images"):
            self.say(f"WARNING: epoch {epoch}: {last['bad_images']} training and {last.get('val_bad_images', 0)} validation "
                     f"images were unreadable and skipped (`alexnet data check` lists them)")
        if t["skipped"]:
            self.say(f"WARNING: {t['skipped']} step(s) of epoch {epoch} skipped: the loss was not finite")
        scores = (f"val loss {v['loss']:.4f}, top-1 {v['acc1']:.2%}, top-5 {v['acc5']:.2%}" if v
                  else f"not validated (--val-every {cfg.val_every})")
        self.say(f"epoch {epoch}/{cfg.epochs}: train loss {last['train_loss']:.4f}, {scores}, lr {last['lr']:.3g}, "
                 f"{last['images_per_sec']:.0f} img/s, {last['epoch_seconds']:.1f} s")

    def finish(self, v: dict, classes: list[str], best_acc1: float, model) -> None:
        """The table of epochs and report.md (rank 0), the best top-1, and every rank's weights hash."""
        metrics = self.plan.out / "metrics.jsonl"  # none in a new run folder resumed from a complete run's checkpoint
        if self.plan.main and metrics.exists():
            history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            self.say("epochs (* best top-1):\n" + logs.summary_table(history))
            if "confusion" in v:
                self.say(f"report: {report.write(self.plan.out, history, v['confusion'], classes, to_dict(self.plan.resolved))}")
        saved = (f"checkpoints in {self.plan.ckpt_dir}" if any(self.plan.ckpt_dir.glob("*.pt"))
                 else "nothing trained, so no checkpoint written")  # a complete run's checkpoint, resumed elsewhere
        self.say(f"done: best val top-1 {best_acc1:.2%}; {saved}")
        self.log(f"final weights sha256 {distributed.weights_sha256(model)} (rank {self.plan.rank} of {self.plan.world})")

    def close(self) -> None:
        self.scalars.close()
        logs.close_file(self.file)
        let_go()


def _epoch_of(line: str) -> float:
    """The epoch a metrics.jsonl line records (a line that cannot be read counts as after every epoch)."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
