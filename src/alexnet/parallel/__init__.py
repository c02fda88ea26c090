"""How the model is spread over the processes: the seam where the training step wraps and steps it.

One interface for every strategy:
- `strategy(images)`: this process's logits for its images; `train()`; `no_sync(sync)`: the context of a
  micro-batch whose gradients are not to be exchanged yet (gradient accumulation);
- `model`: the plain, whole model (torchvision's keys) that evaluation, checkpoints and export read;
  `refresh()` makes it whole where the strategy holds slices (a collective: every rank calls it);
- `parameters()`: what the optimizer steps, in the plain model's parameter order;
- `state(optimizer)` / `load(optimizer, model_state, optimizer_state)`: the whole model's and optimizer's
  state, as one process training the plain model would hold them, and back;
- `clip_grad_norm(optimizer, max_norm)`: clipping by the global norm of the whole model's gradient;
- `after_step(step)`: run after every optimizer step (local SGD averages there).

`DataParallel` (ddp): every process holds the whole model and DistributedDataParallel all-reduces the
gradients (on CPUs too), with an optional compression hook; in a world of one it is the model itself.
`LocalSGD`: the same, with the gradients exchanged only in the first steps, then the weights averaged
every H steps. `HybridParallel` (hybrid, parallel.hybrid): the convolutions data-parallel, the fully
connected layers model-parallel."""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import distributed

# values a process sends per image and step under hybrid (forward and backward): fc6's inputs, fc7's and
# fc8's outputs, each way
FC6_INPUTS = 256 * 6 * 6


def fc_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.classifier.parameters())


def bytes_per_step(name: str, world: int, batch: int, model: nn.Module, accum_steps: int = 1,
                   value_bytes: int = 4, local_sgd_period: int = 1, activation_bytes: int | None = None) -> float:
    """What one process sends per optimizer step (the README's formulas): ddp all-reduces every
    gradient (a ring: 2 (W-1)/W of them); local SGD all-reduces every weight once in H steps; hybrid
    all-reduces the convolutions' gradients and sends activations, 2 (W-1) B (9216 + fc width + classes)
    values for each micro-batch of B images. `value_bytes`: of a gradient on the wire (2 with a bf16 or
    fp16 hook); `activation_bytes`: of an activation (2 under bf16 autocast or with such a hook; default
    `value_bytes`)."""
    activation_bytes = value_bytes if activation_bytes is None else activation_bytes
    if world < 2:
        return 0.0
    total = sum(p.numel() for p in model.parameters())
    if name in ("ddp", "local-sgd"):
        return 2 * (world - 1) / world * total * value_bytes / (local_sgd_period if name == "local-sgd" else 1)
    c = model.classifier
    per_image = FC6_INPUTS + c[4].out_features + c[6].out_features
    conv = total - fc_parameters(model)
    return (2 * (world - 1) / world * conv * value_bytes
            + accum_steps * 2 * (world - 1) * batch * per_image * activation_bytes)


def choose(requested: str, world: int, batch: int, model: nn.Module, accum_steps: int = 1) -> tuple[str, str]:
    """(strategy, why): `requested`, or for auto the one that sends fewer bytes per step: hybrid while the
    global batch is below the crossover, fc parameters / (9216 + fc width + classes) (about 4,100 for
    AlexNet with 1,000 classes)."""
    if world < 2:
        return "ddp", "one process"
    ddp, hybrid = (bytes_per_step(n, world, batch, model, accum_steps) for n in ("ddp", "hybrid"))
    words = f"per process and step: ddp sends {ddp / 1e6:.1f} MB, hybrid {hybrid / 1e6:.1f} MB"
    if requested != "auto":
        return requested, f"--parallel {requested}; {words}"
    return ("hybrid" if hybrid < ddp else "ddp"), f"--parallel auto; {words}"


class DataParallel:
    name = "ddp"
    agree_on_overflow = False  # every process holds the same gradients: the fp16 scaler agrees by itself

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
        return distributed.no_sync(self.module, sync)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def refresh(self) -> None:
        pass

    def state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        return self.model.state_dict(), optimizer.state_dict()

    def load(self, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
        self.model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    def clip_grad_norm(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """Scale all gradients by one factor so that their global L2 norm is at most `max_norm`."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def after_step(self, step: int) -> None:
        pass

    def own_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """What of this process's state a checkpoint must hold besides the whole model's: nothing here."""
        return {}

    def resume_at(self, global_step: int) -> None:
        """A run resumed at `global_step` (steps done)."""


def local(model: nn.Module) -> DataParallel:
    """A model on its own, as a strategy (for tools and tests that step a model in one process)."""
    return DataParallel(model, torch.device("cpu"))


class LocalSGD(DataParallel):
    """Local SGD (Lin et al. 2020, "Don't use large mini-batches, use local SGD"): DDP's gradient all-reduce
    for the first `warmup` steps, then none, each process stepping on its own gradients, and the weights
    averaged over all processes every `period` steps by torch's PeriodicModelAverager (and at the end of
    every epoch, so that validation and checkpoints see one model). The processes' momentum buffers stay
    their own: checkpoints hold each process's weights and optimizer state (`own_state`)."""

    name = "local-sgd"

    def __init__(self, model: nn.Module, device: torch.device, *, period: int, warmup: int = 0, **ddp) -> None:
        super().__init__(model, device, **ddp)
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        self.period, self.warmup, self.step = period, warmup, 0
        # averaging after each `period` local steps: at steps warmup + period - 1, + 2 period - 1, ...
        self.averager = PeriodicModelAverager(period=period, warmup_steps=warmup + period - 1) if distributed.active() else None

    def no_sync(self, sync: bool):
        return super().no_sync(sync and self.step < self.warmup)

    def after_step(self, step: int) -> None:
        """After global step `step` (0-based) was taken (or skipped by all)."""
        self.step = step + 1
        if self.averager is not None:
            self.averager.step = step  # from the global step, so that a resumed run averages where it would have
            params = list(self.model.parameters())
            before = [(p.untyped_storage().data_ptr(), _layout(p)) for p in params]
            self.averager.average_parameters(params)
            # torch's averager, on the steps it averages, gives each parameter a view of one flat NCHW
            # buffer: channels_last weights would then no longer match their (fused) optimizer's momentum
            # buffers, which it reads in memory order, and a checkpoint would save the whole buffer once
            # for each view. Those get their own storage and layout back.
            for p, (storage, layout) in zip(params, before):
                if p.untyped_storage().data_ptr() != storage:
                    p.data = p.data.clone(memory_format=layout)

    def refresh(self) -> None:
        """The weights averaged over the processes (a collective)."""
        if distributed.active():
            distributed.average_parameters(self.model)

    def own_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return {"model": self.model.state_dict(), "optimizer": optimizer.state_dict()}

    def resume_at(self, global_step: int) -> None:
        self.step = global_step


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def make(name: str, model: nn.Module, device: torch.device, *, local_sgd_period: int = 0, local_sgd_warmup: int = 0,
         **options):
    """The strategy `name` (ddp, hybrid, local-sgd) around `model`."""
    if name == "hybrid":
        from .hybrid import HybridParallel
        return HybridParallel(model, device, **options)
    if name == "local-sgd":
        return LocalSGD(model, device, period=local_sgd_period, warmup=local_sgd_warmup, **options)
    return DataParallel(model, device, **options)
