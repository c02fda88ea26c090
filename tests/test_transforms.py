import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.config import TrainConfig
from alexnet.data import ImageFolder, make_loader
from alexnet.data.transforms import (CenterCrop, ColorJitter, RandomCrop, RandomHorizontalFlip,
                                     RandomResizedCrop, Resize, ToTensorNormalize, sample_generator,
                                     train_transform)
from alexnet.train.plan import augmentation


def gradient_image(w, h) -> Image.Image:
    x = np.zeros((h, w, 3), dtype=np.uint8)
    x[..., 0] = (np.arange(w)[None, :] * 255 // max(w - 1, 1))
    x[..., 1] = (np.arange(h)[:, None] * 255 // max(h - 1, 1))
    x[..., 2] = 77
    return Image.fromarray(x)


def test_resize_shorter_side_keeps_aspect_ratio():
    assert Resize(256)(gradient_image(400, 300)).size == (341, 256)
    assert Resize(256)(gradient_image(300, 600)).size == (256, 512)


def test_resize_exact():
    assert Resize((256, 256))(gradient_image(400, 300)).size == (256, 256)


def test_random_crop_size_and_position_vary():
    img = gradient_image(256, 300)
    tops = set()
    for i in range(50):
        out = RandomCrop(224)(img, sample_generator(0, 0, i))
        assert out.size == (224, 224)
        tops.add(np.asarray(out)[0, 0, 1])
    assert len(tops) > 10


def test_center_crop_is_centred():
    img = gradient_image(256, 300)
    out = np.asarray(CenterCrop(224)(img))
    src = np.asarray(img)
    top, left = (300 - 224) // 2, (256 - 224) // 2
    assert np.array_equal(out, src[top:top + 224, left:left + 224])


def test_flip_about_half_the_time_and_really_flips():
    img = gradient_image(64, 64)
    flipped = 0
    n = 2000
    for i in range(n):
        out = RandomHorizontalFlip(0.5)(img, sample_generator(1, 0, i))
        if out is not img:
            assert np.array_equal(np.asarray(out), np.asarray(img)[:, ::-1])
            flipped += 1
    assert abs(flipped / n - 0.5) < 0.05  # 4.5 standard deviations


def test_random_resized_crop_output_size():
    for i in range(20):
        assert RandomResizedCrop(64)(gradient_image(120, 90), sample_generator(0, 0, i)).size == (64, 64)


def test_normalisation_statistics():
    # Pixels drawn uniformly: after normalising with their own mean and std they have mean 0 and std 1.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    f = x.reshape(-1, 3) / 255.0
    t = ToTensorNormalize(f.mean(0), f.std(0))(Image.fromarray(x))
    assert t.shape == (3, 128, 128) and t.dtype == torch.float32
    assert torch.allclose(t.mean(dim=(1, 2)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(t.std(dim=(1, 2), unbiased=False), torch.ones(3), atol=1e-4)
    # and a known pixel maps to (v/255 - mean) / std
    t2 = ToTensorNormalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(Image.fromarray(x))
    expected = (x[5, 7] / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(t2[:, 5, 7].numpy(), expected, atol=1e-5)


def test_colour_jitter_changes_and_is_reproducible():
    img = gradient_image(64, 64)
    j = ColorJitter(0.4, 0.4, 0.4, 0.1)
    a = np.asarray(j(img, sample_generator(0, 3, 9)))
    b = np.asarray(j(img, sample_generator(0, 3, 9)))
    c = np.asarray(j(img, sample_generator(0, 3, 10)))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, np.asarray(img))


def test_train_transform_has_every_requested_step():
    cfg = TrainConfig(brightness=0.2, hue=0.05, rotation=10, crop=64, resize="72")
    names = [type(s).__name__ for s in train_transform(**augmentation(cfg)).steps]
    assert names == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ColorJitter", "RandomRotation",
                     "ToTensorNormalize"]
    cfg = TrainConfig(random_resized_crop=True, crop=64, hflip=0.0)
    assert [type(s).__name__ for s in train_transform(**augmentation(cfg)).steps] == ["RandomResizedCrop", "ToTensorNormalize"]


def _epoch_batches(tiny_data, workers):
    cfg = TrainConfig(resize="72", crop=64, brightness=0.3, rotation=5)
    ds = ImageFolder(tiny_data, "train", train_transform(**augmentation(cfg)), seed=3)
    loader = make_loader(ds, 4, workers, train=True, seed=3)
    out = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        out.append([(x.clone(), y.clone()) for x, y, _ in loader])
    return out


def test_same_draws_with_0_and_2_workers(tiny_data):
    a = _epoch_batches(tiny_data, 0)
    b = _epoch_batches(tiny_data, 2)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb) > 1
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # and the epochs differ from each other (order and augmentation both change)
    assert not all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(a[0], a[1]))
