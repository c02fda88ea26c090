import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.data import synthetic
from alexnet.data.synthetic import CLASSES, ensure_dataset, make_image


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_images_are_a_pure_function_of_seed_split_index():
    a, la = make_image(0, "train", 17)
    b, lb = make_image(0, "train", 17)
    c, _ = make_image(1, "train", 17)
    d, _ = make_image(0, "val", 17)
    assert la == lb == 17 % len(CLASSES)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(d))


def test_dataset_is_large_enough_by_default():
    n = synthetic.counts()
    assert len(CLASSES) >= 10
    assert n["train"] >= 500 * len(CLASSES) and n["val"] >= 100 * len(CLASSES)


def test_written_once_same_for_same_seed(tmp_path):
    a = ensure_dataset(5, tmp_path / "a", train_per_class=3, val_per_class=2, log=lambda *_: None)
    b = ensure_dataset(5, tmp_path / "b", train_per_class=3, val_per_class=2, log=lambda *_: None)
    c = ensure_dataset(6, tmp_path / "c", train_per_class=3, val_per_class=2, log=lambda *_: None)
    assert digest(a) == digest(b) != digest(c)
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(CLASSES)
    assert len(list((a / "train").rglob("*.jpg"))) == 30 and len(list((a / "val").rglob("*.jpg"))) == 20
    assert Image.open(next((a / "val").rglob("*.jpg"))).format == "JPEG"
    # A second call finds it complete and writes nothing.
    mtime = (a / "COMPLETE").stat().st_mtime_ns
    assert ensure_dataset(5, tmp_path / "a", train_per_class=3, val_per_class=2) == a
    assert (a / "COMPLETE").stat().st_mtime_ns == mtime


def test_concurrent_generation_one_writer(tmp_path):
    code = ("import sys; from alexnet.data.synthetic import ensure_dataset;"
            "ensure_dataset(2, sys.argv[1], train_per_class=20, val_per_class=5,"
            " log=lambda m: print('GEN', m, flush=True))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("generating" in o for o in outs) == 1
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "COMPLETE").exists()  # no temporary folders left
    assert len(list(folders[0].rglob("*.jpg"))) == 250


def test_interrupted_generation_is_not_taken_as_complete(tmp_path):
    kw = dict(train_per_class=2, val_per_class=1, log=lambda *_: None)
    final = ensure_dataset(1, tmp_path, **kw)
    (final / "COMPLETE").unlink()
    next(final.rglob("*.jpg")).unlink()
    again = ensure_dataset(1, tmp_path, **kw)
    assert (again / "COMPLETE").exists() and len(list(again.rglob("*.jpg"))) == 30


# --- non-triviality: simple features must not solve it ---------------------------------------------

def colour_histograms(images: np.ndarray, bins: int = 4) -> np.ndarray:
    q = (images // (256 // bins)).astype(np.int64)
    idx = q[..., 0] * bins * bins + q[..., 1] * bins + q[..., 2]
    flat = idx.reshape(len(images), -1)
    h = np.stack([np.bincount(r, minlength=bins ** 3) for r in flat]).astype(np.float32)
    return h / flat.shape[1]


def thumbnails(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(x).resize((8, 8), Image.BILINEAR), dtype=np.float32).ravel() / 255
                     for x in images])


def logistic_regression_accuracy(xtr, ytr, xte, yte, classes, steps=300) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = torch.tensor((xtr - mu) / sd), torch.tensor((xte - mu) / sd)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    torch.manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (lin(xte).argmax(1) == yte).float().mean().item()


def nearest_centroid_accuracy(xtr, ytr, xte, yte, classes) -> float:
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(classes)])
    d = ((xte[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((d.argmin(1) == yte).mean())


def split_arrays(seed, split, n):
    pairs = [make_image(seed, split, i) for i in range(n)]
    return np.stack([np.asarray(p[0]) for p in pairs]), np.array([p[1] for p in pairs])


@pytest.mark.slow
def test_simple_features_score_at_most_50_percent():
    n = synthetic.counts()
    xtr, ytr = split_arrays(0, "train", n["train"])
    xte, yte = split_arrays(0, "val", n["val"])
    k = len(CLASSES)
    hist_acc = logistic_regression_accuracy(colour_histograms(xtr), ytr, colour_histograms(xte), yte, k)
    thumb_acc = nearest_centroid_accuracy(thumbnails(xtr), ytr, thumbnails(xte), yte, k)
    print(f"colour-histogram logistic regression {hist_acc:.3f}, 8x8 nearest centroid {thumb_acc:.3f}")
    assert hist_acc <= 0.5
    assert thumb_acc <= 0.5


def test_the_simple_baselines_can_succeed():
    """Control: on images whose class is their colour and position, the same baselines score high, so
    the check above can fail."""
    rng = np.random.default_rng(0)
    k, n = 10, 400
    palette = rng.integers(0, 256, (k, 3))
    ys = rng.integers(0, k, n)
    xs = np.zeros((n, 72, 72, 3), dtype=np.uint8)
    for i, y in enumerate(ys):
        xs[i] = rng.integers(0, 40, 3)
        xs[i, (y % 5) * 14:(y % 5) * 14 + 20, (y // 5) * 30:(y // 5) * 30 + 30] = palette[y]
    h = colour_histograms(xs)
    t = thumbnails(xs)
    assert logistic_regression_accuracy(h[:300], ys[:300], h[300:], ys[300:], k) > 0.8
    assert nearest_centroid_accuracy(t[:300], ys[:300], t[300:], ys[300:], k) > 0.8
