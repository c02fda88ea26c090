"""The packed form (alexnet data pack) and the batch augmentation that reads it."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.config import TrainConfig, parse_resize
from alexnet.data import held, packed
from alexnet.data.batch import BatchAugment, supports
from alexnet.data.images import load_rgb
from alexnet.data.transforms import Resize, eval_transform, sample_generator, train_transform
from alexnet.train.plan import augmentation

from conftest import EXACT, cli, final_weights, max_diff, run_here, write_folder


def odd_folder(root):
    """Images of several sizes, aspect ratios and modes, and one unreadable file."""
    rng = np.random.default_rng(0)
    shapes = {"a": [(50, 40), (40, 61), (72, 72)], "b": [(64, 64), (90, 45), (45, 90)]}
    for split in ("train", "val"):
        for cls, sizes in shapes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                kind = i % 3
                if kind == 0:
                    rgb.save(folder / f"{i}.jpg", quality=90)
                elif kind == 1:
                    rgb.convert("L").save(folder / f"{i}.png")
                else:
                    rgba = rgb.convert("RGBA")
                    rgba.putalpha(128)
                    rgba.save(folder / f"{i}.png")
    (root / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


@pytest.mark.parametrize("resize", ["40", "48x40"])
def test_pack_round_trips(tmp_path, resize):
    src = odd_folder(tmp_path / "src")
    workers = 1 if "x" in resize else 0  # the decoding pool and the in-process path
    out = packed.pack(src, tmp_path / "packed", resize, workers=workers, log=lambda *_: None)
    meta = packed.read_meta(out)
    assert meta["classes"] == ["a", "b"] and meta["resize"] == resize
    assert meta["splits"]["train"]["images"] == 6 and meta["splits"]["val"]["images"] == 6
    assert len(meta["splits"]["train"]["skipped"]) == 1 and "broken.jpg" in meta["splits"]["train"]["skipped"][0]
    for split in ("train", "val"):
        files = sorted(p for p in (src / split).rglob("*") if p.is_file() and p.name != "broken.jpg")
        files.sort(key=lambda p: (p.parent.name, str(p)))
        ds = packed.PackedSplit(out, split, transform=None)
        assert len(ds) == len(files)
        for i, path in enumerate(files):
            expected = np.asarray(Resize(parse_resize(resize))(load_rgb(path)))
            assert np.array_equal(ds.pixels(i), expected), path
            assert int(ds.index[i][3]) == ["a", "b"].index(path.parent.name)


def test_pack_pool_forked_or_spawned_gives_the_same_bytes(tmp_path, monkeypatch):
    """The packing pool forks in a process that runs no other Python thread (a fresh one here, which has run
    torch on two threads first: this test's process has threads left by earlier tests, and a fork there
    could inherit a held lock) and spawns where one runs; both give the bytes of the in-process path."""
    src = odd_folder(tmp_path / "src")
    reference = packed.pack(src, tmp_path / "in-process", "40", workers=0, log=lambda *_: None)
    forked = tmp_path / "forked"
    script = ("import sys, torch\n"
              "from alexnet.data import packed\n"
              "torch.set_num_threads(2)\n"
              "torch.ones(4_000_000).mul(2).sum()  # torch's threads started before the fork\n"
              "real = packed.multiprocessing.get_context\n"
              "packed.multiprocessing.get_context = lambda method: print('start method', method) or real(method)\n"
              "packed.pack(sys.argv[1], sys.argv[2], '40', workers=2, log=lambda *_: None)\n")
    p = subprocess.run([sys.executable, "-c", script, str(src), str(forked)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout == "start method fork\n", p.stdout + p.stderr
    methods = []
    real = packed.multiprocessing.get_context
    monkeypatch.setattr(packed.multiprocessing, "get_context", lambda method: methods.append(method) or real(method))
    monkeypatch.setattr(packed.threading, "active_count", lambda: 2)  # another thread runs: spawned
    spawned = packed.pack(src, tmp_path / "spawned", "40", workers=2, log=lambda *_: None)
    assert methods == ["spawn"]
    for split in ("train", "val"):
        for name in (f"{split}.u8", f"{split}.idx.npy", f"{split}.sum.npy"):
            assert (forked / name).read_bytes() == (reference / name).read_bytes() == (spawned / name).read_bytes()


def check_same_draws(cfg: TrainConfig, data, atol: float, mean_atol: float = 1e-6, n: int = 24):
    """The batch path's output for the packed images against the per-image transform's output for the
    same images and the same per-sample generators."""
    transform = train_transform(**augmentation(cfg))
    assert supports(transform)
    aug = BatchAugment(transform)
    ds = packed.PackedSplit(data, "train", transform, seed=3, batch=aug)
    per_image = packed.PackedSplit(data, "train", transform, seed=3)
    for epoch in (0, 1):
        items = [ds[(epoch, i)] for i in range(n)]
        crops = torch.stack([c for (c, _), _ in items])
        params = torch.stack([p for (_, p), _ in items])
        batch = aug(crops, params)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        expected = torch.stack([per_image[(epoch, i)][0] for i in range(n)])
        diff = (batch - expected).abs()
        assert float(diff.max()) <= atol and float(diff.mean()) <= mean_atol, (float(diff.max()), float(diff.mean()))
        # control: another epoch's draws give other images
        other = torch.stack([per_image[(epoch + 5, i)][0] for i in range(n)])
        assert float((batch - other).abs().max()) > 0.5
    return params


@pytest.fixture(scope="module")
def packed_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return packed.pack(write_folder(root / "src", classes=3, train_per_class=8, val_per_class=2, size=80),
                       root / "packed", "72", workers=0, log=lambda *_: None)


def test_batch_crop_flip_pca_equal_per_image(packed_shapes):
    cfg = TrainConfig(resize="72", crop=64, hflip=0.5, pca_lighting=0.1)
    params = check_same_draws(cfg, packed_shapes, atol=1e-5)
    assert 0 < int(params[:, 0].sum()) < len(params)  # some flipped, some not


def test_batch_colour_jitter_equal_per_image(packed_shapes):
    # PIL jitters in 8-bit steps, truncating after each operation, hue through its 8-bit HSV; the batch
    # path does the same arithmetic on the batch, so the pixels are the same.
    cfg = TrainConfig(resize="72", crop=64, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)
    params = check_same_draws(cfg, packed_shapes, atol=1e-5)
    orders = {tuple(p[5:9].tolist()) for p in params}
    assert len(orders) > 1  # the order of the operations is drawn per image too


def test_batch_random_resized_crop_equal_per_image(packed_shapes):
    """Random-resized crops on the batch path: the loader resizes each drawn box with PIL as the per-image
    transform does, so the crops, and with flips, jitter and PCA lighting the whole batch, are the same."""
    cfg = TrainConfig(resize="72", crop=64, random_resized_crop=True, rrc_min_scale=0.2, hflip=0.5,
                      brightness=0.4, saturation=0.4, pca_lighting=0.1)
    check_same_draws(cfg, packed_shapes, atol=1e-5)
    aug = BatchAugment(train_transform(**augmentation(cfg)))
    assert not aug.window
    with pytest.raises(ValueError, match="not a window"):
        aug.draw(72, 72, sample_generator(0, 0, 0))
    # the boxes vary in size and place, and are resized: not windows of the stored 72-px images
    boxes = {aug._draw(72, 80, sample_generator(3, 0, i))[0] for i in range(50)}
    assert len({(r - l, b - t) for l, t, r, b in boxes}) > 10 and all(r <= 80 and b <= 72 for l, t, r, b in boxes)


def test_jitter_arithmetic_equals_pil_on_edge_colours():
    """Greys, black, white, saturated and random colours, factors over their whole ranges."""
    import torchvision.transforms.functional as F
    from alexnet.data.batch import _JITTER
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels[:4] = np.array([[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                           [255, 255, 0], [1, 0, 0]], dtype=np.uint8).repeat(4, axis=0)[None]
    img = Image.fromarray(pixels)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    ranges = {"brightness": np.linspace(0, 2, 9), "contrast": np.linspace(0, 2, 9),
              "saturation": np.linspace(0, 2, 9), "hue": np.linspace(-0.5, 0.5, 11)}
    for name, factors in ranges.items():
        for f in factors:
            expected = np.asarray(getattr(F, f"adjust_{name}")(img, float(f)))
            param = float(np.trunc(f * 255)) if name == "hue" else float(f)  # as BatchAugment.sample stores it
            got = _JITTER[name](x.clone(), torch.tensor([param]).view(-1, 1, 1, 1))[0].permute(1, 2, 0).numpy()
            assert np.array_equal(got.astype(np.uint8), expected), (name, f)


@pytest.mark.parametrize("crop", [33, 36])  # odd and even margins on non-square images
def test_odd_sizes_equal_per_image(tmp_path, crop):
    data = packed.pack(odd_folder(tmp_path / "src"), tmp_path / "p", "40", workers=0, log=lambda *_: None)
    cfg = TrainConfig(resize="40", crop=crop, hflip=0.5, pca_lighting=0.1)
    check_same_draws(cfg, data, atol=1e-5, n=6)
    transform = eval_transform("40", crop, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    aug = BatchAugment(transform)
    ds, per_image = packed.PackedSplit(data, "val", transform, batch=aug), packed.PackedSplit(data, "val", transform)
    shapes = {tuple(ds.pixels(i).shape[:2]) for i in range(len(ds))}
    assert any(h != w for h, w in shapes)
    items = [ds[i] for i in range(len(ds))]
    batch = aug(torch.stack([c for (c, _), _ in items]), torch.stack([p for (_, p), _ in items]))
    assert torch.allclose(batch, torch.stack([per_image[i][0] for i in range(len(ds))]), atol=1e-5)


@pytest.mark.gpu
def test_batch_augment_on_gpu_equals_cpu(packed_shapes):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = TrainConfig(resize="72", crop=64, hflip=0.5, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                      pca_lighting=0.1)
    aug = BatchAugment(train_transform(**augmentation(cfg)))
    ds = packed.PackedSplit(packed_shapes, "train", train_transform(**augmentation(cfg)), seed=3, batch=aug)
    items = [ds[(0, i)] for i in range(16)]
    crops, params = torch.stack([c for (c, _), _ in items]), torch.stack([p for (_, p), _ in items])
    cpu = aug(crops, params)
    gpu = aug(crops.cuda(), params.cuda()).cpu()
    assert (gpu - cpu).abs().max() <= 1 / 255 / 0.225 + 1e-5  # at most a level where a rounding differs


def test_eval_centre_crop_equal_per_image(packed_shapes):
    transform = eval_transform("72", 64, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    aug = BatchAugment(transform)
    ds = packed.PackedSplit(packed_shapes, "val", transform, batch=aug)
    per_image = packed.PackedSplit(packed_shapes, "val", transform)
    items = [ds[i] for i in range(len(ds))]
    batch = aug(torch.stack([c for (c, _), _ in items]), torch.stack([p for (_, p), _ in items]))
    assert torch.allclose(batch, torch.stack([per_image[i][0] for i in range(len(ds))]), atol=1e-5)
    assert not supports(eval_transform("72", 64, [0.5] * 3, [0.2] * 3, tta="10crop"))


@pytest.mark.parametrize("on_device,path", [
    ("auto", "packed; crops read from the memory map by the main process; batch augmentation on cpu"),
    ("no", "packed; batch augmentation in the loader workers")])
def test_training_from_packed_equals_training_from_jpeg(exact, one_process, tmp_path, capsys, on_device, path):
    """The same seed through the packed form and the batch path ends with the same weights as through the
    JPEG files and the per-image transforms (both with flips and random crops), whether the main process
    cuts the crops from the memory map (the default on a CPU) or the loader workers do."""
    code, _, err = cli(capsys, "data", "pack", exact["data"], tmp_path / "packed", "--resize", "72", "--workers", "1")
    assert code == 0, err
    out = tmp_path / "run"
    p = run_here("train", "--data", tmp_path / "packed", "--weights", exact["root"] / "w0.pt", "--out", out, *EXACT,
                 "--batch-size", "8", "--data-on-device", on_device)
    assert path in p.stdout
    w = final_weights(out)
    assert max_diff(w, one_process) <= 1e-5 * max_diff(one_process, exact["w0"])
    assert max_diff(w, exact["w0"]) > 0


def test_random_resized_crop_training_on_the_batch_path_equals_per_image(exact, tmp_path, capsys, monkeypatch):
    """Training with --random-resized-crop from packed data takes the batch path and ends with the weights
    of the same run through the per-image transforms."""
    code, _, err = cli(capsys, "data", "pack", exact["data"], tmp_path / "packed", "--resize", "72", "--workers", "1")
    assert code == 0, err
    args = ["train", "--data", tmp_path / "packed", "--weights", exact["root"] / "w0.pt", *EXACT, "--batch-size", "8",
            "--random-resized-crop", "--rrc-min-scale", "0.3", "--hflip", "0.5"]
    sampled, sample = [], BatchAugment.sample
    monkeypatch.setattr(BatchAugment, "sample", lambda self, *a: sampled.append(self.window) or sample(self, *a))
    code, _, err = cli(capsys, *args, "--out", tmp_path / "batch")
    assert code == 0, err
    assert len(sampled) > 0 and False in sampled  # the training images were cut on the batch path
    monkeypatch.setattr(packed, "supports", lambda transform: False)
    sampled.clear()
    code, _, err = cli(capsys, *args, "--out", tmp_path / "per-image")
    assert code == 0 and sampled == [], err
    batch, per_image = final_weights(tmp_path / "batch"), final_weights(tmp_path / "per-image")
    assert max_diff(batch, per_image) <= 1e-5 * max_diff(per_image, exact["w0"])
    assert max_diff(batch, exact["w0"]) > 0


def test_concurrent_packers_one_writer(tmp_path):
    src = write_folder(tmp_path / "src", classes=2, train_per_class=4, val_per_class=2, size=72)
    procs = [subprocess.Popen([sys.executable, "-m", "alexnet", "data", "pack", str(src), str(tmp_path / "p"),
                               "--resize", "72", "--workers", "0"], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sum("packing 12 images" in o for o in outs) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["p", "src"]  # no temporary folder left
    assert json.loads((tmp_path / "p" / "packed.json").read_text())["splits"]["train"]["images"] == 8


def test_pack_and_train_errors(tmp_path, capsys, packed_shapes):
    code, _, err = cli(capsys, "data", "pack", tmp_path / "missing", tmp_path / "p")
    assert code == 2 and "does not exist" in err and err.startswith("alexnet data pack: error: ")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    src = write_folder(tmp_path / "src", classes=2, train_per_class=2, val_per_class=1, size=72)
    code, _, err = cli(capsys, "data", "pack", src, busy)
    assert code == 2 and "not a packed dataset" in err and (busy / "keep.txt").read_text() == "mine"
    for inside in (src / "train" / "packed", src / "val" / "circle" / "p"):  # it would be read as a class folder
        code, _, err = cli(capsys, "data", "pack", src, inside)
        assert code == 2 and f"{inside} lies inside {src}/" in err and not inside.exists()
    p = run_here("data", "pack", src, tmp_path / "raw", "--quality", "50", "--workers", "0")
    assert "WARNING: --quality 50 is for --encoding jpeg" in p.stdout
    assert packed.read_meta(tmp_path / "raw")["encoding"] == "raw"
    code, _, err = cli(capsys, "train", "--data", packed_shapes, "--resize", "80", "--crop", "64", "--epochs", "1")
    assert code == 2 and "packed at --resize 72, not 80: use --resize 72" in err
    (packed_shapes / "COMPLETE").rename(packed_shapes / "COMPLETE.x")
    try:
        code, _, err = cli(capsys, "train", "--data", packed_shapes, "--resize", "72", "--crop", "64")
        assert code == 2 and "incomplete packed dataset" in err
    finally:
        (packed_shapes / "COMPLETE.x").rename(packed_shapes / "COMPLETE")


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
@pytest.mark.parametrize("damage", ["pixels cut short", "pixels too long", "index of another pack", "index gone"])
def test_a_damaged_copy_of_a_pack_is_refused_at_start_with_one_message(tmp_path, capsys, damage, encoding):
    """A copy cut short (the index unchanged) used to stop training with a reshape traceback mid-epoch."""
    src = write_folder(tmp_path / "src", classes=2, train_per_class=4, val_per_class=2, size=72)
    out = tmp_path / "p"
    assert cli(capsys, "data", "pack", src, out, "--resize", "72", "--workers", "0", "--encoding", encoding)[0] == 0
    pixels, index = out / "train.u8", out / "train.idx.npy"
    if damage == "pixels cut short":
        cut = pixels.stat().st_size // 2
        pixels.write_bytes(pixels.read_bytes()[:cut])
        said = f"{pixels} holds {cut:,} bytes where packed.json says"
    elif damage == "pixels too long":
        pixels.write_bytes(pixels.read_bytes() + b"\0" * 10)
        said = f"{pixels} holds"
    elif damage == "index of another pack":
        np.save(index, np.load(index)[:-1])
        said = f"{index} lists 7 images where packed.json says 8"
    else:
        index.unlink()
        said = f"{index} cannot be read"
    code, _, err = cli(capsys, "train", "--data", out, "--resize", "72", "--crop", "64", "--epochs", "1", "--workers", "0")
    assert code == 2, err
    assert err.startswith(f"alexnet train: error: {out} is a damaged packed dataset: ") and said in err, err
    assert "copy the pack again" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_data_check_finds_a_changed_byte_in_a_pack_and_passes_a_whole_one(tmp_path, capsys, encoding):
    src = write_folder(tmp_path / "src", classes=2, train_per_class=4, val_per_class=2, size=72)
    out = tmp_path / "p"
    assert cli(capsys, "data", "pack", src, out, "--resize", "72", "--workers", "0", "--encoding", encoding)[0] == 0
    code, stdout, _ = cli(capsys, "data", "check", out)
    assert code == 0 and "12 packed images, every one as packed" in stdout
    pixels = out / "train.u8"
    data = bytearray(pixels.read_bytes())
    index = np.load(out / "train.idx.npy")
    data[int(index[6, 0]) - 20] ^= 0x01  # one bit near the end of image 5: the sizes all still agree
    pixels.write_bytes(bytes(data))
    if encoding == "raw":  # not seen at start: cheap checks only (a damaged JPEG may not decode in training)
        assert cli(capsys, "train", "--data", out, "--resize", "72", "--crop", "64", "--epochs", "1", "--workers", "0",
                   "--out", tmp_path / "run", "--fc-width", "32", "--quiet")[0] == 0
    code, stdout, _ = cli(capsys, "data", "check", out)
    damaged = [line for line in stdout.splitlines() if line.startswith("damaged: ")]
    assert code == 1 and len(damaged) == 1, stdout
    assert f"{pixels}: 1 of its 8 images differ from what was packed (images 5)" in damaged[0]
    assert "copy the pack again" in damaged[0]
    pixels.write_bytes(bytes(data[:1000]))  # cut short: named as at start
    code, stdout, _ = cli(capsys, "data", "check", out)
    assert code == 1 and "is a damaged packed dataset" in stdout and "holds 1,000 bytes" in stdout


def test_a_pack_killed_half_way_continues_where_it_stopped_and_gives_the_same_pack(tmp_path):
    src = write_folder(tmp_path / "src", classes=3, train_per_class=200, val_per_class=10, size=200)
    reference = packed.pack(src, tmp_path / "reference", "200", workers=0, log=lambda *a: None)
    out = tmp_path / "packed"
    cmd = [sys.executable, "-m", "alexnet", "data", "pack", str(src), str(out), "--resize", "200", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = tmp_path / ".packed.partial" / "train.progress.json"
    while not saved.exists():
        assert proc.poll() is None, "the pack ended before it saved its progress"
    proc.kill()  # SIGKILL: nothing runs on the way out
    proc.wait()
    assert not packed.is_packed(out)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    done = int(again.stdout.split("already done")[0].split(": ")[-1].split(" of ")[0])
    assert done > 0 and "continuing the interrupted pack" in again.stdout
    for name in ("train.u8", "train.idx.npy", "train.sum.npy", "val.u8", "val.idx.npy", "packed.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (tmp_path / ".packed.partial").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pack_stopped_by_ctrl_c_says_what_it_kept_and_continues(tmp_path, workers):
    """Ctrl-C reaches every process of the terminal's job: the packing processes leave it to the main one,
    which alone speaks (each used to print a KeyboardInterrupt traceback)."""
    src = write_folder(tmp_path / "src", classes=3, train_per_class=400, val_per_class=10, size=200)
    out = tmp_path / "packed"
    cmd = [sys.executable, "-m", "alexnet", "data", "pack", str(src), str(out), "--resize", "200", "--workers",
           str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while not (tmp_path / ".packed.partial" / "train.progress.json").exists():  # after 256 of 1,200 images
        assert proc.poll() is None, "the pack ended before it saved its progress"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal does
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.endswith("alexnet data pack: interrupted\n"), stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "packing stopped by Ctrl-C: the images packed up to its last save (every 256 images) are kept in " \
           f"{tmp_path / '.packed.partial'}, and the same command continues from there" in stdout, stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "continuing the interrupted pack" in again.stdout, again.stdout + again.stderr
    # its first progress line comes after 5% more of its own images (it came after one, at "1 images/s")
    import re
    done = int(re.search(r"(\d+) of 1230 images already done", again.stdout).group(1))
    first = int(re.search(r"  (\d+)/1230 images, \d+ images/s", again.stdout).group(1))
    assert first - done >= 1230 / 20 or first == 1230, again.stdout


@pytest.mark.parametrize("rrc", [False, True])
def test_jpeg_batch_path_for_gpus_equals_per_image(tmp_path, rrc):
    """On a GPU with --jpeg-decode workers the JPEG path decodes and resizes in the workers and sends uint8
    crops with their draws; run here on the CPU, that flow gives the per-image loader's batches,
    unreadable files counted alike; random-resized crops of the originals too."""
    from alexnet.data import ImageFolder, make_loader
    from alexnet.data.batch import to_device
    src = odd_folder(tmp_path / "src")
    cfg = TrainConfig(resize="40", crop=36, hflip=0.5, brightness=0.3, saturation=0.3, random_resized_crop=rrc,
                      rrc_min_scale=0.2)
    transform = train_transform(**augmentation(cfg))
    per_image = ImageFolder(src, "train", transform, seed=1)
    on_batches = ImageFolder(src, "train", transform, seed=1)
    on_batches.batch = BatchAugment(transform)
    a = make_loader(per_image, 3, 0, train=False)  # in order, nothing dropped: the unreadable file is met
    b = make_loader(on_batches, 3, 0, train=False, device_type="cuda")
    bad = [0, 0]
    for (x, tx, bx), (y, ty, by) in zip(a, b):
        assert isinstance(y, tuple) and y[0].dtype == torch.uint8  # what would cross to the GPU
        bad[0], bad[1] = bad[0] + bx, bad[1] + by
        assert torch.equal(tx, ty)
        assert torch.allclose(x, to_device(y, torch.device("cpu"), True, on_batches.batch), atol=1e-5)
    assert bad == [1, 1]


def test_eval_on_packed_equals_eval_on_jpeg(shipped, tiny_data, tmp_path, capsys):
    out, _ = shipped
    ckpt = out / "checkpoints" / "last.pt"
    packed.pack(tiny_data, tmp_path / "p", "72", workers=0, log=lambda *_: None)
    results = []
    for data in (tiny_data, tmp_path / "p"):
        code, stdout, err = cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--json", "--workers", "0")
        assert code == 0, err
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0]["count"] == results[1]["count"] == 12
    assert results[0]["correct1"] == results[1]["correct1"]
    assert abs(results[0]["loss"] - results[1]["loss"]) < 1e-5
    # another crop of the stored size is fine; another resize needs another pack, and says so
    whole = []
    for data in (tiny_data, tmp_path / "p"):
        code, stdout, err = cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--json", "--workers", "0",
                                "--crop", "72")
        assert code == 0, err
        whole.append(json.loads(stdout.strip().splitlines()[-1]))
    assert whole[0]["crop"] == whole[1]["crop"] == 72 and whole[0]["correct1"] == whole[1]["correct1"]
    assert abs(whole[0]["loss"] - whole[1]["loss"]) < 1e-5 and abs(whole[1]["loss"] - results[1]["loss"]) > 1e-4
    code, _, err = cli(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path / "p", "--workers", "0",
                       "--resize", "80", "--crop", "72")
    assert code == 2 and "was packed at --resize 72, not 80" in err and "alexnet data pack" in err
    code, _, err = cli(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path / "p", "--resize", "60")
    assert code == 2 and "was packed at --resize 72, not 60" in err  # before the run's crop of 64 is found too big


@pytest.mark.parametrize("workers,device", [(0, "cpu"), (2, "cpu"),
                                            pytest.param(2, "cuda", marks=pytest.mark.gpu)])
def test_held_split_gives_the_loaders_batches(tmp_path, workers, device):
    """A split held in device memory (in CI the CPU's memory map) gives exactly the batches of the loader
    that reads the memory map: same images in the same order, the same crops, flips and colour draws;
    images of several sizes and aspect ratios, through worker processes too. The GPU's indexed gather,
    run here on the CPU, gives the same crops as the CPU's window copies."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from alexnet.data import make_loader
    from alexnet.data.batch import on_device
    from alexnet.data.held import _HELD, HeldCrops, _key, hold, release
    data = packed.pack(odd_folder(tmp_path / "src"), tmp_path / "p", "40", workers=0, log=lambda *_: None)
    cfg = TrainConfig(resize="40", crop=33, hflip=0.5, brightness=0.3, pca_lighting=0.1)
    dev = torch.device(device)
    read, held = (packed.PackedSplit(data, "train", train_transform(**augmentation(cfg)), seed=5,
                                     batch=BatchAugment(train_transform(**augmentation(cfg)))) for _ in range(2))
    hold(held.pixels_file, dev)
    held.held = True
    try:
        loaders = [make_loader(d, 2, workers, train=True, seed=5, device_type="cuda", persistent=False,
                               pin_memory=device == "cuda") for d in (read, held)]
        flips = 0
        for epoch in (0, 1):
            for loader in loaders:
                loader.sampler.set_epoch(epoch)
            for a, b in zip(*loaders):
                assert isinstance(b[0][0], HeldCrops) and not isinstance(a[0][0], HeldCrops)
                assert b[0][0].where.dtype == torch.int64 and b[0][0].where.shape == (len(b[1]), 4)
                flips += int(b[0][0].flips.sum())
                pixels = _HELD[_key(held.pixels_file, dev)]
                assert torch.equal(b[0][0].windows(pixels.cpu()), b[0][0].indexed(pixels, dev).cpu())
                x, tx, _ = on_device(a, dev, True, read.batch)
                y, ty, _ = on_device(b, dev, True, held.batch)
                assert torch.equal(tx, ty) and torch.equal(x, y)
        assert 0 < flips
        # the validation split's centre crops
        transform = eval_transform("40", 33, cfg.mean, cfg.std)
        read, held = (packed.PackedSplit(data, "val", transform, batch=BatchAugment(transform)) for _ in range(2))
        hold(held.pixels_file, dev)
        held.held = True
        loaders = [make_loader(d, 3, workers, train=False, device_type="cuda", persistent=False) for d in (read, held)]
        for a, b in zip(*loaders):
            assert isinstance(b[0][0], HeldCrops)
            assert torch.equal(on_device(a, dev, True, read.batch)[0], on_device(b, dev, True, held.batch)[0])
    finally:
        release()


def test_data_on_device_choices(packed_shapes, tmp_path, capsys):
    """--data-on-device yes where it cannot be done is a clear error; on a CPU, auto and yes hold the splits
    cut as windows (read from the memory map in the main process), no holds nothing."""
    code, _, err = cli(capsys, "train", "--data", packed_shapes, "--resize", "72", "--crop", "64", "--epochs", "1",
                       "--random-resized-crop", "--data-on-device", "yes", "--out", tmp_path / "r")
    assert code == 2 and "--data-on-device: yes crops the held images as windows (on the GPU, or in the main " \
                         "process on a CPU), which cannot rotate" in err
    assert not (tmp_path / "r").exists()  # refused before any work
    cfg = TrainConfig(resize="72", crop=64, random_resized_crop=True)
    eval_tf = eval_transform("72", 64, cfg.mean, cfg.std)
    rrc = packed.open_splits(packed_shapes, "72", train_transform(**augmentation(cfg)), eval_tf, 0)  # the batch path, not windows
    per_image = packed.open_splits(packed_shapes, "72", train_transform(**augmentation(cfg)), eval_tf, 0, batch_on=False)
    for splits in (rrc, per_image):
        for device in ("cuda", "cpu"):
            with pytest.raises(packed.DataError, match="yes crops the held images as windows"):
                packed.hold_on_device(splits, torch.device(device), "yes", print)
    assert rrc[0].batch is not None and per_image[0].batch is None
    cfg = TrainConfig(resize="72", crop=64)
    eval_tf = eval_transform("72", 64, cfg.mean, cfg.std)
    try:
        for mode, holds in (("no", False), ("auto", True), ("yes", True)):
            splits = packed.open_splits(packed_shapes, "72", train_transform(**augmentation(cfg)), eval_tf, 0)
            packed.hold_on_device(splits, torch.device("cpu"), mode, print)
            assert [s.held for s in splits] == [holds, holds]
        rrc_cfg = TrainConfig(resize="72", crop=64, random_resized_crop=True)
        rrc = packed.open_splits(packed_shapes, "72", train_transform(**augmentation(rrc_cfg)), eval_tf, 0)
        packed.hold_on_device(rrc, torch.device("cpu"), "auto", print)
        assert [s.held for s in rrc] == [False, True]  # random-resized crops are cut in the workers
    finally:
        held.release()


def test_data_on_device_auto_holds_what_takes_at_most_half_the_free_memory(packed_shapes, monkeypatch):
    """The decision on a (pretended) GPU: auto holds both splits when they take at most half of its free
    memory and says why it does not otherwise; yes holds whatever fits and is an error beyond."""
    cfg = TrainConfig(resize="72", crop=64)
    size = sum((packed_shapes / f"{s}.u8").stat().st_size for s in ("train", "val"))
    held_files = []
    monkeypatch.setattr(packed, "hold", lambda f, device: held_files.append(f.name))
    cuda = torch.device("cuda")
    for mode, free, holds in [("auto", 2 * size, True), ("auto", 2 * size - 1, False), ("yes", size, True),
                              ("yes", size - 1, None), ("no", 10 * size, False)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 4 * free))
        splits = packed.open_splits(packed_shapes, "72", train_transform(**augmentation(cfg)),
                                    eval_transform("72", 64, cfg.mean, cfg.std), 0)
        said, held_files[:] = [], []
        if holds is None:
            with pytest.raises(packed.DataError, match="larger than cuda's free memory.*use --data-on-device no"):
                packed.hold_on_device(splits, cuda, mode, said.append)
            continue
        packed.hold_on_device(splits, cuda, mode, said.append)
        assert [s.held for s in splits] == [holds, holds] and held_files == (["train.u8", "val.u8"] if holds else [])
        assert bool(said) == (mode == "auto" and not holds), said


@pytest.mark.parametrize("crop", [72, 64])
def test_crops_are_copies_of_the_memory_map(crop):
    """A crop as wide as the stored image (evaluating the whole image) and a narrower one are both new,
    writable tensors: nothing downstream can write into, or keep alive, the read-only memory map."""
    import warnings
    stored = np.arange(72 * 72 * 3, dtype=np.uint8).reshape(72, 72, 3)
    stored.setflags(write=False)
    batch = BatchAugment(eval_transform("72", crop, [0.5] * 3, [0.5] * 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array (once a process: the
        pixels, _ = batch.sample(stored, None)  # assertions below are what fail on a view)
    start = (72 - crop) // 2
    assert torch.equal(pixels, torch.from_numpy(stored[start:start + crop, start:start + crop].copy()))
    pixels += 1
    assert not np.shares_memory(pixels.numpy(), stored) and stored[start, start, 0] == (start * 72 + start) * 3 % 256


def test_random_resized_crop_warns_only_when_the_pack_stores_fewer_pixels_than_the_sources(tmp_path, capsys):
    """The pack counts the images it stores smaller than their files; training with random-resized crops
    warns of the lost detail with that count (in the run's train.log, though said before the folder was
    made), and not at all from a pack that enlarged every image."""
    src = write_folder(tmp_path / "src", classes=2, train_per_class=3, val_per_class=1, size=72)
    train = ["--random-resized-crop", "--crop", "64", "--epochs", "1", "--batch-size", "6", "--fc-width", "16",
             "--workers", "0", "--quiet"]
    for resize, smaller in (("96", 0), ("64", 6)):
        code, _, err = cli(capsys, "data", "pack", src, tmp_path / resize, "--resize", resize, "--workers", "0")
        assert code == 0, err
        assert packed.read_meta(tmp_path / resize)["splits"]["train"]["smaller_than_source"] == smaller
        code, _, err = cli(capsys, "train", "--data", tmp_path / resize, "--resize", resize, *train,
                             "--out", tmp_path / f"run{resize}")
        assert code == 0, err
        log = (tmp_path / f"run{resize}" / "train.log").read_text()  # the lines said before the folder existed too
        warned = [line for line in log.splitlines() if "WARNING: --random-resized-crop" in line]
        assert warned == ([] if smaller == 0 else [warned[0]])
        if smaller:
            assert "6 of its 6 training images are stored with fewer pixels" in warned[0]
    meta_file = tmp_path / "64" / "packed.json"  # a pack made before the count was recorded
    meta = json.loads(meta_file.read_text())
    del meta["splits"]["train"]["smaller_than_source"]
    meta_file.write_text(json.dumps(meta))
    code, _, err = cli(capsys, "train", "--data", tmp_path / "64", "--resize", "64", *train, "--out", tmp_path / "old")
    assert code == 0 and "may store images with fewer pixels" in (tmp_path / "old" / "train.log").read_text(), err
