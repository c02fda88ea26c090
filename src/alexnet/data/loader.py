"""Samplers and loaders."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs: a fresh permutation each epoch, seeded by (seed, epoch), so the
    dataset can seed each sample's augmentation from (seed, epoch, index)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = range(self.size)
        return ((self.epoch, i) for i in order)

    def __len__(self) -> int:
        return self.size


def make_loader(dataset: Dataset, batch_size: int, workers: int, *, train: bool, seed: int = 0,
                pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed, shuffle=train),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train and len(dataset) >= batch_size,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
