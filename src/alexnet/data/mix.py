"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019): a training batch mixed with itself in another
order, on the device, after the batch augmentation.

Mixup blends each image with its partner, x = lam * x + (1 - lam) * x[perm]; CutMix pastes a box of the
partner into it, and lam is then the share of the image's own pixels. The loss is lam * loss(own label)
+ (1 - lam) * loss(partner's label). lam is drawn from Beta(alpha, alpha), once per batch; with both on,
each batch takes one of the two with even odds. Every draw comes from a generator seeded by (seed, rank,
step, micro-batch), so a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch


class BatchMix:
    def __init__(self, mixup: float, cutmix: float, seed: int, rank: int = 0) -> None:
        self.mixup, self.cutmix, self.seed, self.rank = mixup, cutmix, seed, rank

    def __call__(self, images: torch.Tensor, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mixed images, the partners' positions in the batch, lam) for this step's micro-batch."""
        rng = np.random.default_rng([self.seed % 2**64, self.rank, step, micro])  # (any --seed, negative too)
        cut = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < 0.5)
        alpha = self.cutmix if cut else self.mixup
        lam = float(rng.beta(alpha, alpha))
        perm = torch.from_numpy(rng.permutation(images.shape[0])).to(images.device)
        partners = torch.empty_like(images)  # in the images' memory layout (channels_last stays so)
        torch.index_select(images, 0, perm, out=partners)
        if not cut:
            return torch.lerp(partners, images, lam), perm, lam
        h, w = images.shape[-2:]
        side = np.sqrt(1.0 - lam)
        ch, cw = int(h * side), int(w * side)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        top, bottom = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        left, right = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
        return mixed, perm, 1.0 - (bottom - top) * (right - left) / (h * w)

    def __repr__(self) -> str:
        return f"BatchMix(mixup={self.mixup}, cutmix={self.cutmix})"
