"""The learning rate of each step: optional linear warm-up, then step, cosine, constant or plateau; the
plateau rule's state is saved in checkpoints."""

from __future__ import annotations

import math

from ..config import TrainConfig


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
