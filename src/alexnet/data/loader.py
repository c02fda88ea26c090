"""Samplers and loaders."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .packed import collate_batch

# More workers than cores: build_loaders says so in one line of its own, where torch's warning (from its
# source line, once for each loader) names no flag.
warnings.filterwarnings("ignore", message="This DataLoader will create .* worker processes in total",
                        category=UserWarning)


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs, so the dataset can seed each sample's augmentation from
    (seed, epoch, index) whatever process or loader worker draws it.

    Training (`shuffle`): one permutation per epoch, seeded by (seed, epoch) and the same on every rank;
    the tail that does not divide evenly is dropped, and rank r takes every world-th index from r. The
    ranks' shards are disjoint and equal in length (so they run the same number of steps), and together
    the ranks' batches at a step are the same images as one process would see with the global batch.

    Evaluation: indices in order, rank r taking every world-th from r, with nothing dropped and nothing
    repeated, so every sample is counted exactly once whatever the world size.

    `set_epoch(epoch, skip)` starts the epoch's shard after its first `skip` samples: a resume inside an
    epoch continues with exactly the batches that were still to come."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.rank, self.world, self.skip = rank, world, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            order = order[:self.size - self.size % self.world]
        else:
            order = list(range(self.size))
        return order[self.rank::self.world]

    def __iter__(self):
        shard = self.indices()[self.skip:]
        trace = os.environ.get("ALEXNET_TRACE_SAMPLES")  # tests: record which samples each rank draws
        if trace and self.shuffle:
            Path(trace).mkdir(parents=True, exist_ok=True)
            (Path(trace) / f"rank{self.rank}-epoch{self.epoch}.txt").write_text(" ".join(map(str, shard)))
        return ((self.epoch, i) for i in shard)

    def __len__(self) -> int:
        if self.shuffle:
            n = (self.size - self.size % self.world) // self.world
        else:
            n = len(range(self.rank, self.size, self.world))
        return max(n - self.skip, 0)


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, targets, number of unreadable samples dropped from this batch); a batch with no readable
    sample gives empty tensors."""
    good = [b for b in batch if b is not None]
    bad = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, targets = default_collate(good)
    return images, targets, bad


def make_loader(dataset: Dataset, batch_size: int, workers: int, *, train: bool, seed: int = 0,
                pin_memory: bool = False, rank: int = 0, world: int = 1, device_type: str = "cpu",
                persistent: bool = True) -> DataLoader:
    """A loader of (images, targets, unreadable count) batches. A dataset on the batch path (its `batch`
    set, see data.batch) gives its batches finished on the CPU (by the workers), or for a GPU as
    ((uint8 crops, parameters), targets, unreadable count) for data.batch.to_device to finish there; a
    held split (data.held) gives where its crops lie, for data.batch.on_device to gather and finish."""
    sampler = EpochSampler(len(dataset), seed, shuffle=train, rank=rank, world=world)
    augment = getattr(dataset, "batch", None)
    strict = getattr(dataset, "on_bad_image", "skip") == "error"
    collate = (collate_skipping_bad if augment is None
               else collate_batch(augment, finish=device_type == "cpu", strict=strict))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train and len(sampler) >= batch_size,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: starting an epoch's iterator then draws nothing from the global generator,
        # which dropout uses, so a resume inside an epoch continues the same random stream.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_ctrl_c if workers > 0 else None,
    )


def _ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches the whole foreground process group: a loader worker leaves it to the main process,
    which stops the run at a step boundary (train.hooks.StopSignal) and ends the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
