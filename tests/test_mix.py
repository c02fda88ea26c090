"""Mixup and CutMix (data.mix) and the loss that weighs both labels."""

import torch
import torch.nn.functional as F

from alexnet.config import TrainConfig
from alexnet.data.mix import BatchMix
from alexnet.progress import Progress
from alexnet.train import Schedule, Trainer, train_one_epoch

from conftest import TINY, run_here, shas


def batch(n=8, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)


def test_mixup_blends_each_image_with_a_partner():
    x = batch()
    mixed, perm, lam = BatchMix(0.4, 0.0, seed=3)(x, step=7)
    assert sorted(perm.tolist()) == list(range(8)) and perm.tolist() != list(range(8))
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm], atol=1e-6)
    assert mixed.is_contiguous(memory_format=torch.channels_last)
    again, perm2, lam2 = BatchMix(0.4, 0.0, seed=3)(x, step=7)
    assert torch.equal(again, mixed) and torch.equal(perm2, perm) and lam2 == lam  # resumable: seeded by the step
    other = [BatchMix(0.4, 0.0, seed=3)(x, step=8)[2], BatchMix(0.4, 0.0, seed=3, rank=1)(x, step=7)[2],
             BatchMix(0.4, 0.0, seed=3)(x, step=7, micro=1)[2]]
    assert all(v != lam for v in other)
    assert 0 < BatchMix(0.4, 0.0, seed=-5)(x, step=7)[2] < 1  # a negative --seed is a seed like any other


def test_cutmix_pastes_one_box_whose_area_gives_lam():
    x = batch(size=32)
    for step in range(20):
        mixed, perm, lam = BatchMix(0.0, 1.0, seed=0)(x, step=step)
        from_partner = (mixed == x[perm]).all(dim=1) & (mixed != x).any(dim=1)  # (B, H, W)
        own = (mixed == x).all(dim=1)
        assert bool((from_partner | own).all())
        moved = perm != torch.arange(len(perm))  # an image that drew itself as its partner is unchanged
        assert not bool(from_partner[~moved].any())
        box = from_partner[moved].any(dim=0)
        rows, cols = box.any(dim=1).nonzero().flatten(), box.any(dim=0).nonzero().flatten()
        if rows.numel():  # one rectangle, the same for every image of the batch
            assert int(box.sum()) == rows.numel() * cols.numel()
            assert torch.equal(from_partner[moved], box.expand_as(from_partner[moved]))
        assert abs((1 - lam) - box.float().mean().item()) < 1e-6


def test_both_on_takes_one_of_the_two_per_batch():
    x = batch(size=16)
    kinds = []
    for step in range(200):
        mixed, perm, lam = BatchMix(0.4, 1.0, seed=0)(x, step=step)
        kinds.append("mixup" if torch.allclose(mixed, lam * x + (1 - lam) * x[perm], atol=1e-6) and
                     not ((mixed == x).all(dim=1) | (mixed == x[perm]).all(dim=1)).all() else "cutmix")
    assert 70 < kinds.count("cutmix") < 130


def test_the_loss_weighs_both_labels():
    """train_one_epoch's loss for a mixed batch is lam * CE(own labels) + (1 - lam) * CE(partners')."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))  # logits that differ
    x, t = batch(8, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mix = BatchMix(0.4, 0.0, seed=5)
    mixed, perm, lam = mix(x, step=0)
    with torch.no_grad():
        logits = model(mixed)
    expected = lam * F.cross_entropy(logits, t) + (1 - lam) * F.cross_entropy(logits, t[perm])
    plain = F.cross_entropy(logits, t)
    cfg = TrainConfig(schedule="constant", epochs=1, warmup_epochs=0)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), Schedule(cfg, 1, 0.0),
                      torch.nn.CrossEntropyLoss(), torch.device("cpu"), channels_last=True, mix=mix)
    sums = train_one_epoch(trainer, [(x, t, 0)], global_step=0, progress=Progress(1, "t", enabled=False))
    assert abs(sums["loss_sum"] / 8 - expected.item()) < 1e-5
    assert abs(expected.item() - plain.item()) > 1e-3  # the check can tell the two apart


def test_training_with_mixup_and_cutmix_is_reproducible(tiny_data, tmp_path):
    runs = []
    for name, extra in [("a", ["--mixup", "0.4", "--cutmix", "1"]), ("b", ["--mixup", "0.4", "--cutmix", "1"]),
                        ("plain", [])]:
        p = run_here("train", "--data", tiny_data, "--out", tmp_path / name, *TINY, "--deterministic", *extra)
        runs.append(shas(p.stdout)[0])
    assert runs[0] == runs[1] != runs[2]
