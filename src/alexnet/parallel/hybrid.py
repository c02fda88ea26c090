"""Hybrid parallelism (Krizhevsky 2014, "One weird trick for parallelizing convolutional neural networks"):
the convolutions data-parallel, the fully connected layers model-parallel over all processes.

The convolutions (about 95% of the compute, 4% of the parameters) run on each process's own images and
their gradients are all-reduced by DistributedDataParallel (with --comm-hook applying), overlapping the
backward pass. The three fully connected layers are cut into slices, one per process:

    fc6  by its outputs (rows of the weight): each process computes its slice of fc6's outputs for the
         images of every process, whose fc6 inputs (9,216 values an image) it gathers first;
    fc7  by its inputs (the same slice, so no exchange between fc6 and fc7): each process computes a
         partial sum of all of fc7's outputs; the partial sums are added up and cut by fc7's outputs, so
         that each process holds its slice of fc7's outputs, complete, for every image;
    fc8  by its inputs (that slice): partial logits for every image, added up and cut by images, so that
         each process gets the complete logits of its own images, and computes its own loss.

What crosses the network per process and step is therefore activations, about 2 (W-1) B (9216 + fc +
classes) values (forward and backward), plus the convolutions' gradients, instead of the 58.6M fully
connected gradients that DDP all-reduces. Every exchange is an all-to-all (uneven sizes allowed), which
on gloo sends only what each peer needs. The same update as DDP is computed: each process's loss is its
batch's mean, and the gradients are those of the mean of the processes' losses.

With local SGD (--local-sgd-period H), after the warm-up the convolutions' gradients stay each process's
own and their weights are averaged every H steps instead (parallel.averaging, as for ddp); the
fully connected slices stay exact, as each is computed from every process's images. What crosses the
network is then the activations every step and the convolutions' 2.5M weights once in H steps.

The whole model stays on every process as the plain `model` (torchvision's keys) for evaluation,
checkpoints and export; `refresh()` gathers the slices into it (and averages local SGD's convolutions)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from .averaging import Averaging


def split(total: int, world: int) -> list[int]:
    """`total` cut into `world` slices as equal as can be, the larger first (4096 over 3: 1366, 1365, 1365)."""
    return [total // world + (1 if r < total % world else 0) for r in range(world)]


class _GatherRows(torch.autograd.Function):
    """Every process's rows, in rank order; backward: each process gets the sum of the gradients of its
    rows, times `scale`."""

    @staticmethod
    def forward(ctx, x, sizes, scale, dtype):
        ctx.sizes, ctx.scale, ctx.dtype = sizes, scale, dtype
        if os.environ.get("ALEXNET_HYBRID_UNEXCHANGED") == "1":  # for tests only: the other rows left zero
            out = x.new_zeros((sum(sizes), *x.shape[1:]))
            start = sum(sizes[:distributed.rank()])
            out[start:start + x.shape[0]] = x
            return out
        return distributed.gather_rows(x, sizes, dtype)

    @staticmethod
    def backward(ctx, grad):
        return distributed.scatter_sum_rows(grad, ctx.sizes, ctx.dtype) * ctx.scale, None, None, None


class _ScatterSumRows(torch.autograd.Function):
    """The sum over processes of a tensor of every process's rows, each process keeping its own rows;
    backward: the gradients of every process's rows gathered, times `scale`."""

    @staticmethod
    def forward(ctx, x, sizes, scale, dtype):
        ctx.sizes, ctx.scale, ctx.dtype = sizes, scale, dtype
        return distributed.scatter_sum_rows(x, sizes, dtype)

    @staticmethod
    def backward(ctx, grad):
        return distributed.gather_rows(grad, ctx.sizes, ctx.dtype) * ctx.scale, None, None, None


class _ScatterSumColumns(torch.autograd.Function):
    """The sum over processes, each process keeping its slice of the columns (`widths`); backward: the
    column slices gathered."""

    @staticmethod
    def forward(ctx, x, widths, dtype):
        ctx.widths, ctx.dtype = widths, dtype
        return distributed.scatter_sum_rows(x.t(), widths, dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return distributed.gather_rows(grad.t(), ctx.widths, ctx.dtype).t(), None, None


class _Trunk(nn.Module):
    """The data-parallel part: the convolutions and the pooling, flattened to fc6's inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features, self.avgpool = model.features, model.avgpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


class _Head(nn.Module):
    """This process's slices of fc6, fc7 and fc8, and the exchanges between them."""

    def __init__(self, model: nn.Module, rank: int, world: int, dtype: torch.dtype | None) -> None:
        super().__init__()
        c = model.classifier
        fc6, fc7, fc8 = c[1], c[4], c[6]
        self.p0, self.p1 = c[0].p, c[3].p
        self.rank, self.world, self.dtype = rank, world, dtype
        self.widths6, self.widths7 = split(fc6.out_features, world), split(fc7.out_features, world)
        a6, a7 = sum(self.widths6[:rank]), sum(self.widths7[:rank])
        n6, n7 = self.widths6[rank], self.widths7[rank]
        take = lambda t: nn.Parameter(t.detach().clone())  # noqa: E731
        self.w6, self.b6 = take(fc6.weight[a6:a6 + n6]), take(fc6.bias[a6:a6 + n6])
        self.w7, self.b7 = take(fc7.weight[:, a6:a6 + n6]), take(fc7.bias[a7:a7 + n7])
        self.w8 = take(fc8.weight[:, a7:a7 + n7])
        self.b8 = take(fc8.bias)  # added by rank 0 alone, before the logits are summed

    def forward(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        x = F.dropout(x, self.p0, self.training)  # each process drops on its own images, as one process would
        x = _GatherRows.apply(x, sizes, float(self.world), self.dtype)
        h = F.dropout(F.relu(F.linear(x, self.w6, self.b6)), self.p1, self.training)
        h = F.relu(_ScatterSumColumns.apply(F.linear(h, self.w7), self.widths7, self.dtype) + self.b7)
        logits = F.linear(h, self.w8, self.b8 if self.rank == 0 else None)
        return _ScatterSumRows.apply(logits, sizes, 1.0 / self.world, self.dtype)


class HybridParallel:
    """The strategy (see alexnet.parallel): `strategy(images)` gives this process's logits."""

    name = "hybrid"
    agree_on_overflow = True  # the fp16 scaler's skip decided by all, as each holds other gradients

    def __init__(self, model: nn.Module, device: torch.device, *, comm_hook: str = "none", log=None,
                 local_sgd_period: int = 0, local_sgd_warmup: int = 0, **ddp) -> None:
        self.model, self.rank, self.world = model, distributed.rank(), distributed.world_size()
        self.averaging = Averaging(local_sgd_period, local_sgd_warmup) if local_sgd_period and self.world > 1 else None
        self.step = 0  # global steps taken (local SGD's warm-up counts them)
        self.apart = False  # whether local steps left the processes' convolutions unequal since the last average
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(comm_hook)  # activations on the wire
        self.trunk = distributed.wrap(_Trunk(model), device, comm_hook=comm_hook, log=log, **ddp)
        self.head = _Head(model, self.rank, self.world, dtype).to(device)
        c = model.classifier
        fc6, fc7, fc8 = c[1], c[4], c[6]
        h, w6, w7 = self.head, self.head.widths6, self.head.widths7
        # (slice, whole, dimension cut, widths): in the plain model's parameter order
        self.layout = [(h.w6, fc6.weight, 0, w6), (h.b6, fc6.bias, 0, w6), (h.w7, fc7.weight, 1, w6),
                       (h.b7, fc7.bias, 0, w7), (h.w8, fc8.weight, 1, w7), (h.b8, fc8.bias, None, None)]
        self.fc = {id(whole): (part, dim, widths) for part, whole, dim, widths in self.layout}
        self.stale = False  # whether a step changed the slices since the plain model was made whole

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.trunk(images)
        return self.head(x, distributed.all_sizes(x.shape[0]))

    def train(self) -> None:
        self.trunk.train()
        self.head.train()

    def no_sync(self, sync: bool):
        local = self.averaging is not None and self.averaging.local(self.step)
        return distributed.no_sync(self.trunk, sync and not local)

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer steps, in the plain model's parameter order: slices for the fc layers."""
        return [self.fc[id(p)][0] if id(p) in self.fc else p for p in self.model.parameters()]

    # ------------------------------------------------------------------------------ the whole model

    def _whole(self, part: torch.Tensor, dim: int | None, widths: list[int] | None) -> torch.Tensor:
        """A slice gathered into the whole tensor (collective); fc8's bias is rank 0's."""
        if dim is None:
            return distributed.broadcast_tensor(part.detach().clone())
        moved = part.detach().movedim(dim, 0).contiguous()
        return distributed.gather_rows(moved, widths).movedim(0, dim).contiguous()

    def _slice(self, whole: torch.Tensor, dim: int | None, widths: list[int] | None) -> torch.Tensor:
        if dim is None:
            return whole
        start = sum(widths[:self.rank])
        return whole.narrow(dim, start, widths[self.rank])

    def refresh(self) -> None:
        """The whole model on every process (a collective: every rank calls it): local SGD's convolutions
        averaged, the fc layers gathered from the slices."""
        if self.apart:
            distributed.average_parameters(self.trunk)
            self.apart = False
        self._gather()

    def _gather(self) -> None:
        """The plain model's fc layers made whole from the slices (a collective), unless no step has changed
        the slices since they last were (at an epoch's end, validation then the checkpoint both ask for it:
        the ranks take the same steps, so they skip it alike)."""
        if not self.stale:
            return
        with torch.no_grad():
            for part, whole, dim, widths in self.layout:
                whole.copy_(self._whole(part, dim, widths))
        self.stale = False

    def state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The whole model's and the optimizer's state, as one process training the plain model would have
        them (a collective; rank 0's is complete: fc8's bias is its alone). Local SGD's convolutions are this
        process's own (`own_state`), not averaged: a checkpoint between averagings does not average."""
        self._gather()
        saved = optimizer.state_dict()
        cut = self._cuts(optimizer)
        state = {}
        for index, value in saved["state"].items():
            if index in cut and cut[index][0] is not None:
                value = {k: self._whole(v, *cut[index]) if torch.is_tensor(v) and v.dim() else v
                         for k, v in value.items()}
            state[index] = value
        return self.model.state_dict(), {**saved, "state": state}

    def load(self, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
        """Take this process's slices of a whole model's and optimizer's state."""
        self.model.load_state_dict(model_state)
        with torch.no_grad():
            for part, whole, dim, widths in self.layout:
                part.copy_(self._slice(whole, dim, widths))
        self.stale = False
        cut = self._cuts(optimizer)
        state = {}
        for index, value in optimizer_state["state"].items():
            if int(index) in cut:
                value = {k: self._slice(v, *cut[int(index)]).clone() if torch.is_tensor(v) and v.dim() else v
                         for k, v in value.items()}
            state[index] = value
        optimizer.load_state_dict({**optimizer_state, "state": state})

    def _cuts(self, optimizer: torch.optim.Optimizer) -> dict[int, tuple]:
        """The optimizer's state indices (its parameters in group order) of the slices: (dimension, widths)."""
        order = [p for group in optimizer.param_groups for p in group["params"]]
        cut = {id(part): (dim, widths) for part, _, dim, widths in self.layout}
        return {i: cut[id(p)] for i, p in enumerate(order) if id(p) in cut}

    def clip_grad_norm(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """Scale all gradients so that the global L2 norm of the whole model's gradient is at most
        `max_norm`: the slices' squares summed over processes, the replicated convolutions' counted once
        (fc8's bias is rank 0's alone); under local SGD, the mean over processes of the convolutions'."""
        parts = {id(part) for part, *_ in self.layout}
        pairs = [(p, p.grad) for p in self.parameters() if p.grad is not None]
        squares = [float(g.double().pow(2).sum()) for _, g in pairs]
        sliced = sum(s for (p, _), s in zip(pairs, squares) if id(p) in parts)
        shared = sum(s for (p, _), s in zip(pairs, squares) if id(p) not in parts)
        if self.averaging is not None and self.averaging.local(self.step):
            # local SGD: the convolutions' gradients differ between processes; their mean square is
            # counted, so that every process scales by the same factor
            sliced, shared = distributed.sum_all([sliced, shared])
            total = (sliced + shared / self.world) ** 0.5
        else:
            total = (distributed.sum_all([sliced])[0] + shared) ** 0.5
        coef = min(max_norm / (total + 1e-6), 1.0)
        for _, g in pairs:
            g.mul_(coef)

    def after_step(self, step: int) -> None:
        """After global step `step` (0-based): the slices changed; local SGD averages the convolutions on
        its schedule."""
        self.stale = True
        if self.averaging is not None:
            self.apart = self.averaging.local(step)
            if self.averaging.after(step, self._convolutions()):
                self.apart = False
        self.step = step + 1

    def _convolutions(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if id(p) not in self.fc]

    def own_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Local SGD: this process's convolutions and their optimizer state (they differ between averagings,
        and the momentum even right after one); laid over the whole state when resumed."""
        if self.averaging is None:
            return {}
        order = [p for group in optimizer.param_groups for p in group["params"]]
        convolutions = {id(p) for p in self._convolutions()}
        indices = {i for i, p in enumerate(order) if id(p) in convolutions}
        saved = optimizer.state_dict()["state"]
        fc_keys = {name for name, p in self.model.named_parameters() if id(p) in self.fc}
        return {"model": {k: v for k, v in self.model.state_dict().items() if k not in fc_keys},
                "optimizer": {"state": {i: v for i, v in saved.items() if i in indices}}}

    def resume_at(self, global_step: int) -> None:
        self.step = global_step
        self.apart = self.averaging is not None  # unknown: averaged once more at the epoch's end, alike by all
        if self.averaging is not None:
            distributed.forward_sync_as_after(self.trunk, synced=not self.averaging.local(global_step - 1))
