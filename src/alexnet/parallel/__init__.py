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
- `after_step(step)`: run after every optimizer step (local SGD averages there);
- `own_state(optimizer)`: what of this process's state differs from the other processes' (local SGD: its
  weights and momentum), which a checkpoint keeps for each process and a resume lays over the whole state.

`DataParallel` (ddp): every process holds the whole model and DistributedDataParallel all-reduces the
gradients (on CPUs too), with an optional compression hook; in a world of one it is the model itself.
`LocalSGD`: the same, with the gradients exchanged only in the first steps, then the weights averaged
every H steps (on several nodes of several processes, hierarchically: the gradients all-reduced within
each node every step, the weights averaged across the nodes every H steps). `HybridParallel` (hybrid,
parallel.hybrid): the convolutions data-parallel, the fully connected layers model-parallel; with local SGD,
the convolutions' weights averaged every H steps instead of their gradients every step."""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import distributed
from .averaging import Averaging

# values a process sends per image and step under hybrid (forward and backward): fc6's inputs, fc7's and
# fc8's outputs, each way
FC6_INPUTS = 256 * 6 * 6


def fc_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.classifier.parameters())


def bytes_per_step(name: str, world: int, batch: int, model: nn.Module, accum_steps: int = 1,
                   value_bytes: int = 4, local_sgd_period: int = 1, activation_bytes: int | None = None) -> float:
    """What one process sends per optimizer step (the README's formulas): ddp all-reduces every
    gradient (a ring: 2 (W-1)/W of them); local SGD all-reduces every weight once in H steps; hybrid
    all-reduces the convolutions' gradients (with local SGD, their weights once in H steps) and sends
    activations, 2 (W-1) B (9216 + fc width + classes) values for each micro-batch of B images.
    `value_bytes`: of a gradient on the wire (2 with a bf16 or fp16 hook); `activation_bytes`: of an
    activation (2 under bf16 autocast or with such a hook; default `value_bytes`). Local SGD averages fp32
    weights: 4 bytes each, once in H steps."""
    activation_bytes = value_bytes if activation_bytes is None else activation_bytes
    if world < 2:
        return 0.0
    total = sum(p.numel() for p in model.parameters())
    ring = 2 * (world - 1) / world
    if name == "ddp":
        return ring * total * value_bytes
    if name == "local-sgd":
        return ring * total * 4 / local_sgd_period
    c = model.classifier
    per_image = FC6_INPUTS + c[4].out_features + c[6].out_features
    conv = total - fc_parameters(model)
    convolutions = ring * conv * (4 / local_sgd_period if local_sgd_period > 1 else value_bytes)
    return convolutions + accum_steps * 2 * (world - 1) * batch * per_image * activation_bytes


def choose(requested: str, world: int, batch: int, model: nn.Module, accum_steps: int = 1,
           local_sgd_period: int = 0) -> tuple[str, str]:
    """(ddp or hybrid, why): `requested`, or for auto the one that sends fewer bytes per step: hybrid while
    the global batch is below the crossover, fc parameters / (9216 + fc width + classes) (about 4,100 for
    AlexNet with 1,000 classes). With local SGD (period H), ddp's bytes are the whole model's weights once
    in H steps, hybrid's the convolutions' weights once in H steps and the activations every step."""
    if world < 2:
        return "ddp", "one process"
    ddp = bytes_per_step("local-sgd" if local_sgd_period else "ddp", world, batch, model, accum_steps,
                         local_sgd_period=local_sgd_period or 1)
    hybrid = bytes_per_step("hybrid", world, batch, model, accum_steps, local_sgd_period=local_sgd_period or 1)
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
        self.module = self.ddp = distributed.wrap(
            model, device, comm_hook=comm_hook, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
            static_graph=static_graph, powersgd_rank=powersgd_rank, powersgd_start_step=powersgd_start_step, log=log)
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
    averaged over all processes every `period` steps (parallel.averaging, on torch's model averaging; and at the end of
    every epoch, so that validation and checkpoints see one model). The processes' momentum buffers stay
    their own: checkpoints hold each process's weights and optimizer state (`own_state`).

    On several nodes of several processes each (torchrun's LOCAL_WORLD_SIZE below the world size),
    hierarchical: after the warm-up the gradients are still all-reduced every step, but within each node
    only (torch's post-local-SGD hook over one subgroup a node), so a node's processes stay equal and only
    the weight averaging every H steps crosses between nodes. With --comm-hook bf16/fp16 the flat form is
    used (one DDP hook at a time).

    After the warm-up the processes hold different gradients: the fp16 scaler's skip is agreed by all
    (torch's ShardedGradScaler), so that every process skips the same steps and keeps the same scale."""

    name = "local-sgd"
    agree_on_overflow = True

    def __init__(self, model: nn.Module, device: torch.device, *, period: int, warmup: int = 0, log=None, **ddp) -> None:
        super().__init__(model, device, log=log, **ddp)
        self.period, self.warmup, self.step = period, warmup, 0
        self.averaging = Averaging(period, warmup) if distributed.active() else None
        nodes, per_node = distributed.nodes()
        self.hierarchical = None
        if self.averaging is not None and nodes > 1 and per_node > 1:
            if ddp.get("comm_hook", "none") == "none":
                self.hierarchical = distributed.average_gradients_within_nodes(self.ddp, warmup)
                if log:
                    log(f"local SGD, hierarchical: {nodes} nodes of {per_node} processes; after {warmup} synchronous "
                        f"steps the gradients are all-reduced within each node, the weights averaged across "
                        f"nodes every {period} steps")
            elif log:
                log(f"local SGD over {nodes} nodes: flat (every process on its own between averagings), as "
                    f"--comm-hook {ddp['comm_hook']} takes DDP's one hook")

    def no_sync(self, sync: bool):
        # hierarchical: torch's hook decides (all processes, then the node's); flat: no exchange after the warm-up
        return super().no_sync(sync and (self.hierarchical is not None or self.step < self.warmup))

    def after_step(self, step: int) -> None:
        """After global step `step` (0-based) was taken (or skipped by all)."""
        self._count(step + 1)
        if self.averaging is not None:
            self.averaging.after(step, list(self.model.parameters()))

    def refresh(self) -> None:
        """The weights averaged over the processes (a collective)."""
        if distributed.active():
            distributed.average_parameters(self.model)

    def own_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return {"model": self.model.state_dict(), "optimizer": optimizer.state_dict()}

    def _count(self, steps: int) -> None:
        """`steps` global steps taken."""
        self.step = steps
        if self.hierarchical is not None:  # the hook's count of steps, which it compares with the warm-up
            self.hierarchical.iter = steps

    def resume_at(self, global_step: int) -> None:
        self._count(global_step)
        if self.averaging is not None and self.hierarchical is None:
            distributed.forward_sync_as_after(self.ddp, synced=not self.averaging.local(global_step - 1))


def make(name: str, model: nn.Module, device: torch.device, *, local_sgd_period: int = 0, local_sgd_warmup: int = 0,
         **options):
    """The strategy `name` (ddp, hybrid, local-sgd) around `model`."""
    if name == "hybrid":
        from .hybrid import HybridParallel
        return HybridParallel(model, device, local_sgd_period=local_sgd_period, local_sgd_warmup=local_sgd_warmup,
                              **options)
    if name == "local-sgd":
        return LocalSGD(model, device, period=local_sgd_period, warmup=local_sgd_warmup, **options)
    return DataParallel(model, device, **options)
