"""Progressive resizing: random-resized crops that grow from --progressive-crop to --crop over the epochs."""

import json

import pytest
import torch

from alexnet.config import TrainConfig
from alexnet.data import make_loader, packed, train_transform
from alexnet.data.batch import BatchAugment
from alexnet.data.folder import ImageFolder
from alexnet.models import _AlexNetShape
from alexnet.train.plan import augmentation, crop_sizes

from conftest import cli, write_folder


def progressive(**kw) -> TrainConfig:
    return TrainConfig(**{"random_resized_crop": True, **kw})


def test_crop_sizes_hold_then_grow_in_steps_of_32_to_the_crop():
    cfg = progressive(epochs=30, crop=288, progressive_crop=192, progressive_start=14, progressive_end=26)
    sizes = crop_sizes(cfg)
    # worked by hand: 192 + 96 (e - 14) / 12 for epochs 15 to 25, to the nearest multiple of 32
    assert sizes == [192] * 16 + [224] * 3 + [256] * 5 + [288] * 6
    for epoch, size in enumerate(sizes, start=1):
        linear = 192 + 96 * min(max((epoch - 14) / 12, 0), 1)
        assert size % 32 == 0 and abs(size - linear) <= 16
    # the defaults: from the first epoch to the last; off: --crop throughout
    assert crop_sizes(progressive(epochs=5, crop=224, progressive_crop=96)) == [96, 128, 160, 192, 224]
    assert crop_sizes(progressive(epochs=3, crop=224)) == [224] * 3
    # a --crop that is no multiple of 32 is reached exactly at the end, never passed
    sizes = crop_sizes(progressive(epochs=4, crop=100, progressive_crop=64))
    assert sizes[0] == 64 and sizes[-1] == 100 and max(sizes) == 100


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("progressive") / "src", classes=2, train_per_class=4, val_per_class=2,
                        size=80)


@pytest.mark.parametrize("source", ["packed", "jpeg"])
def test_a_persistent_loader_worker_crops_each_epoch_at_its_size(folder, tmp_path, source):
    """The size travels with each sample's epoch, so a loader worker started in the first epoch (a copy of
    the dataset made then) crops the later epochs at their sizes too, on the batch path and per image."""
    cfg = progressive(resize="96", crop=96, epochs=3, progressive_crop=64, rrc_min_scale=0.3)
    sizes = crop_sizes(cfg)
    assert sizes == [64, 64, 96]
    if source == "packed":
        data = packed.pack(folder, tmp_path / "packed", "96", workers=0, log=lambda *_: None)
        transform = train_transform(**augmentation(cfg))
        ds = packed.PackedSplit(data, "train", transform, seed=1, batch=BatchAugment(transform))
    else:
        ds = ImageFolder(folder, "train", train_transform(**augmentation(cfg)), seed=1)
    loader = make_loader(ds, 4, workers=1, train=True, seed=1)
    seen = []
    for epoch in range(cfg.epochs):
        loader.sampler.set_epoch(epoch)
        seen.append({tuple(images.shape[1:]) for images, _, _ in loader})
    assert seen == [{(3, s, s)} for s in sizes]


def test_batch_path_equals_per_image_at_every_size(folder, tmp_path):
    cfg = progressive(resize="96", crop=96, epochs=3, progressive_crop=64, hflip=0.5, brightness=0.3)
    data = packed.pack(folder, tmp_path / "packed", "96", workers=0, log=lambda *_: None)
    transform = train_transform(**augmentation(cfg))
    aug = BatchAugment(transform)
    on_batches = packed.PackedSplit(data, "train", transform, seed=2, batch=aug)
    per_image = packed.PackedSplit(data, "train", train_transform(**augmentation(cfg)), seed=2)
    for epoch, size in enumerate(crop_sizes(cfg)):
        items = [on_batches[(epoch, i)] for i in range(len(on_batches))]
        batch = aug(torch.stack([c for (c, _), _ in items]), torch.stack([p for (_, p), _ in items]))
        expected = torch.stack([per_image[(epoch, i)][0] for i in range(len(per_image))])
        assert batch.shape[-1] == size and expected.shape == batch.shape
        assert float((batch - expected).abs().max()) <= 1e-5


def test_training_feeds_the_model_each_epochs_size(tiny_data, tmp_path, capsys, monkeypatch):
    """A real run: the model's training inputs are the schedule's sizes epoch by epoch, validation stays at
    the evaluation crop, and the log and metrics say which size each epoch trained at."""
    seen, forward = [], _AlexNetShape.forward
    monkeypatch.setattr(_AlexNetShape, "forward", lambda self, x: seen.append((self.training, x.shape[-1]))
                        or forward(self, x))
    code, _, err = cli(capsys, "train", "--data", tiny_data, "--resize", "104", "--crop", "96", "--val-crop", "96",
                         "--random-resized-crop", "--progressive-crop", "64", "--epochs", "4", "--batch-size", "8",
                         "--fc-width", "32", "--workers", "0", "--quiet", "--out", tmp_path / "run")
    assert code == 0, err
    sizes = [64, 64, 96, 96]  # 64 + 32 (e - 1) / 3 for epochs 1 to 4, to the nearest multiple of 32
    steps = 24 // 8
    train = [s for training, s in seen if training]
    assert train == [s for s in sizes for _ in range(steps)]
    assert {s for training, s in seen if not training} == {96}
    log = (tmp_path / "run" / "train.log").read_text()
    assert "epoch 1: training crops of 64 px" in log and "epoch 3: training crops of 96 px" in log
    assert "epoch 2: training crops" not in log  # said only when the size changes
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_crop"] for m in metrics] == sizes


def test_progressive_settings_are_checked_before_any_work(tmp_path, capsys):
    base = ["--random-resized-crop", "--crop", "96", "--resize", "104", "--epochs", "10"]
    for args, message in [
        (["--crop", "96", "--resize", "104", "--progressive-crop", "64"], "--progressive-crop: needs --random-resized-crop"),
        ([*base, "--progressive-crop", "96"], "--progressive-crop: must be 0 (off) or from AlexNet's smallest input"),
        ([*base, "--progressive-crop", "32"], "--progressive-crop: must be 0 (off) or from AlexNet's smallest input"),
        ([*base, "--progressive-crop", "64", "--progressive-start", "10"], "--progressive-start: must be at least 1 and before"),
        ([*base, "--progressive-crop", "64", "--progressive-start", "5", "--progressive-end", "4"], "--progressive-start"),
        ([*base, "--progressive-crop", "64", "--progressive-end", "11"], "--progressive-end: must be at most --epochs 10"),
    ]:
        code, _, stderr = cli(capsys, "train", *args, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache")
        assert code == 2, (args, stderr)
        assert message in stderr, (args, stderr)
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
