"""The 2012 paper's pieces: PCA colour augmentation, 10-crop test-time averaging, the recipes and the run
report; and the principal components `alexnet data stats` computes."""

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from alexnet.config import IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC, ConfigError, TrainConfig, resolve_train
from alexnet.data.transforms import eval_transform, sample_generator, train_transform
from alexnet.evaluate import evaluate
from alexnet.models import create_model
from alexnet.train import batch_sizes, learning_rate
from alexnet.train.plan import augmentation
from conftest import TINY, cli


def position_image(w: int, h: int) -> Image.Image:
    """Red = column, green = row, blue = 200: each pixel says where it is."""
    x = np.zeros((h, w, 3), dtype=np.uint8)
    x[..., 0] = np.arange(w)[None, :]
    x[..., 1] = np.arange(h)[:, None]
    x[..., 2] = 200
    return Image.fromarray(x)


def test_pca_shift_is_one_per_image_with_std_a_tenth_of_each_eigenvalue():
    cfg = TrainConfig(resize="20", crop=16, pca_lighting=0.1)  # small images: quick draws
    plain = train_transform(**augmentation(TrainConfig(resize="20", crop=16)))
    lit = train_transform(**augmentation(cfg))
    std = torch.tensor(cfg.std).view(3, 1, 1)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    eigvec = torch.tensor(IMAGENET_PCA_EIGVEC).view(3, 3)
    projections = []
    for i in range(10_000):
        # the same draws of crop and flip with and without the lighting: the difference is the shift alone
        shift = (lit(img, sample_generator(0, 0, i)) - plain(img, sample_generator(0, 0, i))) * std
        per_pixel = shift.flatten(1)
        assert (per_pixel - per_pixel[:, :1]).abs().max() < 1e-5  # the same shift on every pixel
        projections.append(eigvec.T @ per_pixel[:, 0])
    spread = torch.stack(projections).std(dim=0)
    for got, eigval in zip(spread.tolist(), IMAGENET_PCA_EIGVAL):
        assert got == pytest.approx(0.1 * eigval, rel=0.05)
    # before normalisation: a shift of s in [0, 1] units moves the network's input by s / std per channel
    assert lit.steps[-1].__class__.__name__ == "Normalize" and lit.steps[-2].__class__.__name__ == "PCALighting"


def test_pca_draws_change_with_the_epoch():
    lit = train_transform(**augmentation(TrainConfig(resize="20", crop=16, pca_lighting=0.1, hflip=0)))
    img = position_image(20, 20)
    a, b = (lit(img, sample_generator(0, epoch, 5)) for epoch in (0, 1))
    assert not torch.allclose(a, b)  # each time the image is used, new alphas


@pytest.mark.parametrize("w,h,corners", [
    (40, 40, [(0, 0), (16, 0), (0, 16), (16, 16), (8, 8)]),
    (56, 40, [(0, 0), (32, 0), (0, 16), (32, 16), (16, 8)]),   # wider than high
    (40, 57, [(0, 0), (16, 0), (0, 33), (16, 33), (8, 16)]),   # higher than wide; centre rounds 16.5 to 16
])
def test_ten_crops_are_the_corners_the_centre_and_their_mirrors(w, h, corners):
    # resize to the shorter side, which the image already has: the crops are of the original pixels
    views = eval_transform(str(min(w, h)), 24, [0, 0, 0], [1, 1, 1], tta="10crop")(position_image(w, h))
    assert views.shape == (10, 3, 24, 24)
    pixels = (views * 255).round().to(torch.int64)
    cols, rows = torch.arange(24), torch.arange(24)
    for k, (left, top) in enumerate(corners):
        for view, mirrored in ((pixels[k], False), (pixels[k + 5], True)):
            want_cols = (left + cols).flip(0) if mirrored else left + cols
            assert torch.equal(view[0], want_cols.expand(24, 24)), (k, mirrored)
            assert torch.equal(view[1], (top + rows)[:, None].expand(24, 24)), (k, mirrored)
            assert bool((view[2] == 200).all())
    flip = eval_transform(str(min(w, h)), 24, [0, 0, 0], [1, 1, 1], tta="flip")(position_image(w, h))
    assert torch.equal(flip, views[[4, 9]])  # flip: the centre crop and its mirror


class ViewTable(nn.Module):
    """Logits looked up by the value of the first pixel of each view: a model whose answer per view is set."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].round().long()]


def test_views_are_averaged_as_softmax_outputs_not_logits():
    # view 0 is sure of class 0; view 1 splits between 1 and 2 and is very unlike class 0. Averaged
    # logits pick class 1 (or 2); averaged softmax outputs pick class 0.
    table = [[4.0, 0.0, 0.0], [-4.0, 3.0, 3.0]]
    images = torch.zeros(1, 2, 3, 4, 4)
    images[0, 1] = 1.0
    target = torch.tensor([0])
    m = evaluate(ViewTable(table), [(images, target, 0)], torch.device("cpu"))
    probs = torch.tensor(table).softmax(dim=1).mean(dim=0)
    assert torch.tensor(table).mean(dim=0).argmax() != 0 and probs.argmax() == 0
    assert m["correct1"] == 1 and m["loss"] == pytest.approx(-math.log(probs[0]), rel=1e-6)


def test_recipes_state_the_papers_and_torchvisions_settings_and_mean_the_same_on_any_world():
    paper = resolve_train({"recipe": "paper2012", "data": "."})[0]
    assert (paper.arch, paper.global_batch_size, paper.lr, paper.momentum, paper.weight_decay) == \
        ("alexnet2012", 128, 0.01, 0.9, 0.0005)
    assert (paper.schedule, paper.gamma, paper.epochs, paper.resize, paper.crop, paper.hflip) == \
        ("plateau", 0.1, 90, "256", 224, 0.5)
    assert (paper.pca_lighting, paper.val_tta, paper.warmup_epochs) == (0.1, "10crop", 0.0)
    assert (paper.init, paper.init_bias) == ("paper", 0.1)  # the departure: biases of 0.1, not 1
    assert [round(1 / s) for s in paper.std] == [255] * 3  # centred raw pixels, on their 0-255 scale
    tv = resolve_train({"recipe": "torchvision", "data": "."})[0]
    assert (tv.arch, tv.lr, tv.global_batch_size, tv.weight_decay, tv.schedule, tv.step_size) == \
        ("alexnet", 0.01, 256, 0.0001, "step", 30)
    assert tv.random_resized_crop and tv.pca_lighting == 0
    fast = resolve_train({"recipe": "fast", "data": "."})[0]
    assert fast.label_smoothing > 0 and fast.warmup_epochs > 0 and fast.schedule == "cosine" and fast.epochs <= 30
    for cfg in (paper, tv, fast):
        assert cfg.lr_scaling == "linear" and cfg.recipe
        for world in (1, 2, 4, 8):
            per_process, global_batch = batch_sizes(cfg, world)
            assert per_process * world == global_batch == cfg.global_batch_size
            assert learning_rate(cfg, global_batch) == pytest.approx(cfg.lr * cfg.global_batch_size
                                                                     / cfg.lr_reference_batch)


def test_flags_and_config_files_override_a_recipe(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\n")
    cfg = resolve_train({"recipe": "paper2012", "data": ".", "config": str(tmp_path / "c.yaml"),
                         "batch_size": 16, "pca_lighting": 0.0})[0]
    assert (cfg.epochs, cfg.batch_size, cfg.global_batch_size, cfg.pca_lighting) == (7, 16, 0, 0.0)
    assert cfg.arch == "alexnet2012"
    (tmp_path / "bad.yaml").write_text("arch: alexnet\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=f"--recipe {tmp_path / 'bad.yaml'}: unknown setting 'learning_rate'; known "):
        resolve_train({"recipe": str(tmp_path / "bad.yaml"), "data": "."})
    with pytest.raises(ConfigError, match="paper2012"):
        resolve_train({"recipe": "paper2013", "data": "."})
    (tmp_path / "both.yaml").write_text("batch_size: 8\nglobal_batch_size: 64\n")
    with pytest.raises(ConfigError, match="both batch_size and global_batch_size"):
        resolve_train({"recipe": str(tmp_path / "both.yaml"), "data": "."})
    (tmp_path / "saved.yaml").write_text("epochs: 3\nrecipe: null\nconfig: null\n")  # a run's config.yaml
    assert resolve_train({"recipe": str(tmp_path / "saved.yaml"), "data": "."})[0].epochs == 3


def test_data_stats_prints_the_principal_components_of_the_pixels(tmp_path, capsys):
    rng = np.random.default_rng(1)
    mix = np.array([[1.0, 0.8, 0.2], [0.0, 0.5, 0.3], [0.0, 0.0, 0.4]])
    pixels = []
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            x = np.clip(rng.normal(0, 40, (24, 24, 3)) @ mix + 120, 0, 255).astype(np.uint8)
            Image.fromarray(x).save(tmp_path / "train" / c / f"{i}.png")
            pixels.append(x.reshape(-1, 3) / 255.0)
    code, out, _ = cli(capsys, "data", "stats", tmp_path)
    assert code == 0
    eigval = json.loads(re.search(r"pca eigval: (\[.*\])", out).group(1))
    eigvec = np.array(json.loads(re.search(r"pca eigvec: (\[.*?\])", out).group(1))).reshape(3, 3)
    want_val, want_vec = np.linalg.eigh(np.cov(np.concatenate(pixels).T, bias=True))
    assert eigval == pytest.approx(sorted(want_val, reverse=True), rel=1e-3)
    assert eigval[0] > 2 * eigval[2]  # the mixing made them distinct
    for i, j in enumerate(np.argsort(want_val)[::-1]):
        assert abs(float(eigvec[:, i] @ want_vec[:, j])) == pytest.approx(1.0, abs=1e-3)  # same axis
    assert "--pca-eigval" in out and "--pca-eigvec" in out


def test_a_finished_run_writes_a_report_with_per_class_accuracy(shipped, tiny_data, capsys):
    out, _ = shipped
    text = (out / "report.md").read_text()
    code, stdout, _ = cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data", tiny_data,
                          "--workers", "0", "--json", "--confusion", out.parent / "c.png")
    matrix = json.loads(stdout.strip().splitlines()[-1])["confusion"]
    for i, name in enumerate(["circle", "ring", "square"]):
        row = re.search(rf"^\| {name} \| (\d+) \| (\d+) \| ([\d.]+)% \|$", text, re.M)
        assert row and (int(row.group(1)), int(row.group(2))) == (sum(matrix[i]), matrix[i][i])
    assert "![confusion matrix](confusion.png)" in text
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the matrix also as a table of counts, which needs no matplotlib
    assert "| true \\ predicted | circle | ring | square |" in text
    for i, name in enumerate(["circle", "ring", "square"]):
        assert f"| {name} | " + " | ".join(map(str, matrix[i])) + " |" in text
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"| final (epoch 2) | {last['val_acc1']:.2%} |" in text


def test_a_batch_of_test_time_views_holds_batch_size_crops_not_ten_times_as_many(shipped, tiny_data, capsys,
                                                                                  monkeypatch):
    """With --tta 10crop a batch of --batch-size 20 is 2 images of 10 views (a batch of 128 images would
    hold 1,280 crops, which ran out of memory at 288 px); the metrics are those of one batch of all."""
    from alexnet.data import build
    out, _ = shipped
    sizes, make = [], build.make_loader
    monkeypatch.setattr(build, "make_loader", lambda ds, size, *a, **k: sizes.append(size) or make(ds, size, *a, **k))
    results = {}
    for batch in (20, 1000):
        code, stdout, err = cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data", tiny_data,
                                "--workers", "0", "--json", "--tta", "10crop", "--batch-size", batch)
        assert code == 0, err
        results[batch] = json.loads(stdout.strip().splitlines()[-1])
    assert sizes == [2, 100]
    assert results[20]["count"] == 12 and results[20]["correct1"] == results[1000]["correct1"]
    assert results[20]["loss"] == pytest.approx(results[1000]["loss"], rel=1e-5)


def test_validation_with_ten_crops_during_training_takes_a_tenth_of_the_images_per_batch(tiny_data, tmp_path,
                                                                                         capsys, monkeypatch):
    from alexnet.data import build
    sizes, make = [], build.make_loader
    monkeypatch.setattr(build, "make_loader", lambda ds, size, *a, **k: sizes.append(size) or make(ds, size, *a, **k))
    args = ["train", "--data", tiny_data, *TINY, "--batch-size", "20", "--val-tta", "10crop"]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "run")
    assert code == 0, err
    assert sizes == [20, 2]  # the training loader's batch, then the validation's: 2 images of 10 views
    assert "val_acc1" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("setting, passes", [({}, True), ({"init_bias": "1"}, False),
                                             ({"std": "0.229,0.224,0.225"}, False)])
def test_the_paper_recipe_lets_the_image_through_its_initial_network(setting, passes):
    """At the recipe's initialisation the hidden activations must depend on the image, or the first steps
    learn only the class offsets. On Imagenette the recipe left chance in its first epoch; the literal
    paper's biases of 1, or normalised (unit-variance) pixels, stayed at chance. The measure: the spread
    of fc7's activations across images against their mean (recipe 4.7%; the others 0.02% to 0.9%)."""
    cfg = resolve_train({"recipe": "paper2012", "data": ".", **setting})[0]
    torch.manual_seed(1)
    model = create_model(cfg.arch, 10, cfg.dropout, cfg.fc_width, cfg.init, cfg.init_bias).eval()
    images = torch.rand(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x = (images - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        fc7 = model.classifier[:6](model.avgpool(model.features(x)).flatten(1))
    assert ((fc7.std(dim=0).mean() / fc7.mean()).item() > 0.02) == passes
