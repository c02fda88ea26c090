"""How the model is spread over the processes: the seam where the training step wraps and steps it.

One interface for every strategy: `strategy(images)` runs the forward pass of this process's share,
`no_sync(sync)` is the context of a micro-batch whose gradients are not to be exchanged yet (gradient
accumulation), and `model` is the plain, whole model that checkpoints, evaluation and export read.

`DataParallel` is the strategy today: every process holds the whole model and DistributedDataParallel
all-reduces the gradients (on CPUs too), with an optional compression hook; in a world of one it is the
model itself."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn

from . import distributed


class DataParallel:
    name = "ddp"

    def __init__(self, model: nn.Module, device: torch.device, *, comm_hook: str = "none",
                 bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = False, static_graph: bool = False,
                 powersgd_rank: int = 2, powersgd_start_step: int = 1000, compile: bool = False,
                 dynamic: bool | None = None, log=None) -> None:
        self.model = model
        self.module = distributed.wrap(model, device, comm_hook=comm_hook, bucket_cap_mb=bucket_cap_mb,
                                       gradient_as_bucket_view=gradient_as_bucket_view, static_graph=static_graph,
                                       powersgd_rank=powersgd_rank, powersgd_start_step=powersgd_start_step, log=log)
        if compile:  # the DDP wrapper is compiled (its buckets then split the graph); `model` stays the plain one
            self.module = torch.compile(self.module, backend=os.environ.get("ALEXNET_COMPILE_BACKEND", "inductor"),
                                        dynamic=dynamic)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def train(self) -> None:
        self.module.train()

    def no_sync(self, sync: bool):
        """The context of one micro-batch's backward pass: DDP's no_sync unless `sync` (the last one)."""
        return nullcontext() if sync or not hasattr(self.module, "no_sync") else self.module.no_sync()


def local(model: nn.Module) -> DataParallel:
    """A model on its own, as a strategy (for tools and tests that step a model in one process)."""
    return DataParallel(model, torch.device("cpu"))
