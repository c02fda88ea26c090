"""Periodic model averaging, the step local SGD takes every H steps (under ddp and under hybrid)."""

from __future__ import annotations

import torch
from torch import nn


class Averaging:
    """Periodic model averaging (torch.distributed.algorithms.model_averaging, as its PeriodicModelAverager
    schedules it): parameters averaged over all processes after each `period` local steps that follow
    `warmup` synchronous ones, i.e. after global steps warmup + period - 1, + 2 period - 1, ... counted from
    the global step, so that a resumed run averages where it would have. Every parameter given is averaged,
    also after a step skipped for a non-finite loss (torch's averager would leave out those without a
    gradient, and fail when none has one)."""

    def __init__(self, period: int, warmup: int) -> None:
        self.period, self.warmup = period, warmup

    def local(self, step: int) -> bool:
        """Whether global step `step` (0-based) keeps its gradients to each process."""
        return step >= self.warmup

    def averages_after(self, step: int) -> bool:
        first = self.warmup + self.period - 1
        return step >= first and (step - first) % self.period == 0

    def after(self, step: int, params: list[nn.Parameter]) -> bool:
        """After global step `step`: average `params` if it is an averaging step (whether it was)."""
        if not self.averages_after(step):
            return False
        from torch.distributed.algorithms.model_averaging.utils import average_parameters
        layouts = [_layout(p) for p in params]
        average_parameters(iter(params), None)
        # torch's averaging gives each parameter a view of one flat NCHW buffer: channels_last weights would
        # then no longer match their (fused) optimizer's momentum buffers, which it reads in memory order,
        # and a checkpoint would save the whole buffer once for each view. Each gets its own storage and
        # layout back.
        for p, layout in zip(params, layouts):
            p.data = p.data.clone(memory_format=layout)
        return True


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
