"""The JPEG form of a pack (`alexnet data pack --encoding jpeg`) and the content fingerprint packed.json records."""

import os
import shutil

import numpy as np
import pytest
import torch

from alexnet.config import TrainConfig, parse_resize
from alexnet.data import make_loader, packed
from alexnet.data.batch import BatchAugment, on_device
from alexnet.data.images import load_rgb
from alexnet.data.jpeg import JpegBatch
from alexnet.data.transforms import Resize, train_transform
from alexnet.train.plan import augmentation

from conftest import TINY, cli, final_weights, max_diff, run_cli, run_here, write_folder

QUIET = dict(workers=0, log=lambda *_: None)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpack")
    src = write_folder(root / "src", classes=3, train_per_class=8, val_per_class=2, size=100)
    return src, packed.pack(src, root / "jpeg", "72", encoding="jpeg", quality=90, **QUIET)


def source_files(src, split):
    files = sorted(p for p in (src / split).rglob("*.jpg"))
    return sorted(files, key=lambda p: (p.parent.name, str(p)))


def test_jpeg_pack_round_trip(shapes, tmp_path):
    """The stored images decode to the sources resized, within 3 levels on average, each with its label; the
    file is a fraction of the raw pack's."""
    src, out = shapes
    meta = packed.read_meta(out)
    assert meta["encoding"] == "jpeg" and meta["quality"] == 90 and meta["resize"] == "72"
    classes = meta["classes"]
    for split in ("train", "val"):
        ds = packed.PackedSplit(out, split, transform=None)
        files = source_files(src, split)
        assert len(ds) == len(files)
        errors = []
        for i, path in enumerate(files):
            expected = np.asarray(Resize(parse_resize("72"))(load_rgb(path)), dtype=np.int16)
            got = ds.pixels(i)
            assert got.shape == expected.shape and got.dtype == np.uint8
            errors.append(np.abs(got.astype(np.int16) - expected).mean())
            assert int(ds.index[i][3]) == classes.index(path.parent.name)
        # lossy, and not by much: at most 3 levels on average over the split's pixels; these generated shapes,
        # flat colours with sharp edges, are harder on 4:2:0 than photos (Imagenette: BENCHMARKS.md)
        assert np.mean(errors) <= 3.0 and max(errors) <= 6.0 and min(errors) > 0, (np.mean(errors), max(errors))
    raw = packed.pack(src, tmp_path / "raw", "72", **QUIET)
    assert packed.read_meta(raw)["splits"]["train"]["bytes"] > 3 * meta["splits"]["train"]["bytes"]


def test_jpeg_pack_batch_path_equals_per_image_on_the_decoded_pixels(shapes):
    """The same draws as the raw pack's: the batch path's crops of the decoded images equal the per-image
    transform's."""
    _, out = shapes
    cfg = TrainConfig(resize="72", crop=64, hflip=0.5, pca_lighting=0.1)
    transform = train_transform(**augmentation(cfg))
    aug = BatchAugment(transform)
    ds = packed.PackedSplit(out, "train", transform, seed=3, batch=aug)
    per_image = packed.PackedSplit(out, "train", transform, seed=3)
    items = [ds[(1, i)] for i in range(len(ds))]
    batch = aug(torch.stack([c for (c, _), _ in items]), torch.stack([p for (_, p), _ in items]))
    expected = torch.stack([per_image[(1, i)][0] for i in range(len(ds))])
    assert float((batch - expected).abs().max()) <= 1e-5


def test_jpeg_pack_left_to_the_gpu_decoder_gives_the_workers_crops(shapes):
    """On a GPU a JPEG pack's images go to nvJPEG as data.jpeg's Encoded files; run here with the CPU as the
    device, the batch decodes to exactly the crops the loader workers make (same decoder, no resize)."""
    _, out = shapes
    cfg = TrainConfig(resize="72", crop=64, hflip=0.5, brightness=0.3)
    transform = train_transform(**augmentation(cfg))
    workers = packed.PackedSplit(out, "train", transform, seed=2, batch=BatchAugment(transform))
    device = packed.PackedSplit(out, "train", transform, seed=2, batch=BatchAugment(transform))
    device.decode_on_device = True
    a = make_loader(workers, 5, 0, train=False, device_type="cuda")
    b = make_loader(device, 5, 0, train=False, device_type="cuda")
    cpu = torch.device("cpu")
    for x, y in zip(a, b):
        assert isinstance(y[0][0], JpegBatch) and not isinstance(x[0][0], JpegBatch)
        xa, ta, _ = on_device(x, cpu, False, workers.batch)
        ya, tb, bad = on_device(y, cpu, False, device.batch)
        assert bad == 0 and torch.equal(ta, tb) and torch.equal(xa, ya)


def test_an_image_of_a_jpeg_pack_that_no_longer_decodes_stops_the_gpu_path_too(shapes, tmp_path):
    """Left to the device's decoder (the CPU standing in for the GPU), a damaged image is an error, as in the
    workers, not an unreadable file skipped and counted."""
    from alexnet.errors import DataError
    _, out = shapes
    copy = tmp_path / "p"
    shutil.copytree(out, copy)
    data = bytearray((copy / "train.u8").read_bytes())
    data[int(np.load(copy / "train.idx.npy")[2, 0]):int(np.load(copy / "train.idx.npy")[3, 0])] = b"\0" * (
        int(np.load(copy / "train.idx.npy")[3, 0]) - int(np.load(copy / "train.idx.npy")[2, 0]))
    (copy / "train.u8").write_bytes(bytes(data))
    transform = train_transform(**augmentation(TrainConfig(resize="72", crop=64)))
    ds = packed.PackedSplit(copy, "train", transform, seed=2, batch=BatchAugment(transform))
    ds.decode_on_device = True
    batch = next(iter(make_loader(ds, 5, 0, train=False, device_type="cuda")))
    with pytest.raises(DataError, match=r"image 2 of .*train.u8 cannot be decoded \(not an image file\): the pack is "
                                        r"damaged; `alexnet data check "):
        on_device(batch, torch.device("cpu"), False, ds.batch)


def test_on_a_cpu_the_main_process_decodes_a_jpeg_pack_where_workers_would_take_the_models_cores(shapes, monkeypatch,
                                                                                              tmp_path):
    """--jpeg-decode auto on a CPU: a JPEG pack's images are decoded by the main process when the model's
    threads and the loader workers together want more cores than there are, or when there is no worker;
    by the workers when they have cores of their own, under --jpeg-decode workers, and never for a raw pack
    or a GPU."""
    src, out = shapes
    raw_pack = packed.pack(src, tmp_path / "raw", "72", **QUIET)
    transform = train_transform(**augmentation(TrainConfig(resize="72", crop=64)))
    threads, cpu = torch.get_num_threads(), torch.device("cpu")

    def main_decodes(cores, workers, decode="auto", device=cpu):
        monkeypatch.setattr(packed, "available_cores", lambda: cores)
        split = packed.PackedSplit(out, "train", transform, batch=BatchAugment(transform))
        packed.decode_in_main_process([split], device, workers, decode)
        return split.decode_on_device

    assert main_decodes(cores=threads + 1, workers=2) and main_decodes(cores=threads, workers=1)
    assert main_decodes(cores=threads + 2, workers=0)
    assert not main_decodes(cores=threads + 2, workers=2)
    assert not main_decodes(cores=threads, workers=2, decode="workers")
    assert not main_decodes(cores=threads, workers=2, device=torch.device("cuda"))
    monkeypatch.setattr(packed, "available_cores", lambda: 1)
    raw = packed.PackedSplit(raw_pack, "train", transform, batch=BatchAugment(transform))
    resized = train_transform(**augmentation(TrainConfig(resize="72", crop=64, random_resized_crop=True)))
    no_window = packed.PackedSplit(out, "train", resized, batch=BatchAugment(resized))
    packed.decode_in_main_process([raw, no_window], cpu, 2, "auto")
    assert not raw.decode_on_device and not no_window.decode_on_device  # cut from the map; crops the batch path cannot


def test_a_jpeg_pack_decoded_by_the_main_process_trains_to_the_workers_weights(tmp_path):
    """The main process's batch decoding (--workers 0, --jpeg-decode auto) and a loader worker's
    (--jpeg-decode workers) give a run the same crops, so the same weights to the bit."""
    src = write_folder(tmp_path / "src", classes=3, train_per_class=8, val_per_class=2, size=90)
    data = packed.pack(src, tmp_path / "p", "72", encoding="jpeg", **QUIET)
    flags = ["--resize", "72", "--crop", "64", "--fc-width", "32", "--batch-size", "4", "--quiet", "--deterministic",
             "--epochs", "1", "--brightness", "0.4", "--saturation", "0.4"]
    run_here("train", "--data", data, "--out", tmp_path / "main", "--workers", "0", *flags)
    run_cli("train", "--data", data, "--out", tmp_path / "workers", "--workers", "1", "--jpeg-decode", "workers", *flags)
    assert "decoded by the main process" in (tmp_path / "main" / "train.log").read_text()
    assert "batch augmentation in the loader workers" in (tmp_path / "workers" / "train.log").read_text()
    assert max_diff(final_weights(tmp_path / "main"), final_weights(tmp_path / "workers")) == 0


def test_an_image_of_a_jpeg_pack_that_decodes_to_another_size_stops_the_batch_decoding(shapes):
    """An image that decodes, but not to the size its index records, is damage on the batch-decoding path
    too (as in PackedSplit.pixels), not an image resized to fit."""
    from alexnet.errors import DataError
    _, out = shapes
    transform = train_transform(**augmentation(TrainConfig(resize="72", crop=64)))
    ds = packed.PackedSplit(out, "train", transform, seed=2, batch=BatchAugment(transform))
    ds.decode_on_device = True
    ds.index = ds.index.copy()
    ds.index[2, 2] += 4  # its width as the index records it
    batch = next(iter(make_loader(ds, 5, 0, train=False, device_type="cpu")))
    with pytest.raises(DataError, match=r"image 2 of .*train.u8 decodes to \(72, \d+\), not \(72, \d+\): the pack is damaged"):
        on_device(batch, torch.device("cpu"), False, ds.batch)


def test_the_recorded_fingerprint_ignores_where_when_and_how_and_sees_one_changed_image(shapes, tmp_path):
    src, out = shapes
    copy = tmp_path / "elsewhere"
    shutil.copytree(src, copy)
    for path in copy.rglob("*.jpg"):
        os.utime(path, (1_000_000, 1_000_000))
    again = packed.pack(copy, tmp_path / "q75", "72", encoding="jpeg", quality=75, **QUIET)
    raw = packed.pack(copy, tmp_path / "raw", "72", **QUIET)
    prints = [packed.PackedSplit(p, "train", None).fingerprint() for p in (out, again, raw)]
    assert prints[0]["files"] == prints[1]["files"] == prints[2]["files"]  # other offsets, paths, times
    assert not np.array_equal(np.load(out / "train.idx.npy")[:, 0], np.load(again / "train.idx.npy")[:, 0])
    assert prints[0]["encoding"] == "jpeg" and prints[2]["encoding"] == "raw"
    changed = source_files(copy, "train")[3]
    other = source_files(copy, "train")[4]
    shutil.copyfile(other, changed)  # same name and label, other contents
    third = packed.pack(copy, tmp_path / "changed", "72", encoding="jpeg", quality=75, **QUIET)
    assert packed.PackedSplit(third, "train", None).fingerprint()["files"] != prints[1]["files"]
    assert packed.PackedSplit(third, "val", None).fingerprint() == packed.PackedSplit(again, "val", None).fingerprint()


def test_pack_encoding_errors_and_a_repack_in_another_encoding(tmp_path, capsys, caplog):
    src = write_folder(tmp_path / "src", classes=2, train_per_class=2, val_per_class=1, size=72)
    code, _, err = cli(capsys, "data", "pack", src, tmp_path / "p", "--encoding", "jpeg", "--quality", "0")
    assert code == 2 and "--quality: 0 is not in 1..100" in err and len(err.strip().splitlines()) == 1
    assert cli(capsys, "data", "pack", src, tmp_path / "p", "--resize", "72", "--workers", "0")[0] == 0
    code, _, err = cli(capsys, "data", "pack", src, tmp_path / "p", "--resize", "72", "--encoding", "jpeg")
    assert code == 2 and "already holds" in err and "(raw pixels)" in err and "remove it" in err
    assert cli(capsys, "data", "pack", src, tmp_path / "p", "--resize", "72", "--workers", "0")[0] == 0
    assert "is already packed from" in caplog.messages[-1] and "(raw pixels)" in caplog.messages[-1]


@pytest.mark.parametrize("workers,decode", [("0", "auto"), ("0", "workers"), ("1", "auto"), ("1", "workers")])
def test_training_from_a_jpeg_pack_and_an_image_that_no_longer_decodes(tmp_path, workers, decode):
    """A run from a JPEG pack says so and trains; an image damaged after packing so that it no longer decodes
    stops the run with one message that names it and `alexnet data check` (decoded by the main process, a
    batch at a time or, with no loader worker, image by image, or by a loader worker), not a traceback."""
    src = write_folder(tmp_path / "src", classes=2, train_per_class=4, val_per_class=2, size=72)
    out = packed.pack(src, tmp_path / "p", "72", encoding="jpeg", **QUIET)
    run = run_here if workers == "0" else run_cli  # loader workers are not forked from the test runner
    # the model's threads on every core: the workers would take cores from them, so auto decodes in the main process
    flags = [*TINY, "--workers", workers, "--jpeg-decode", decode, "--threads", str(packed.available_cores())]
    p = run("train", "--data", out, *flags, "--out", tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    how = {"auto": "decoded by the main process; batch augmentation on cpu",
           "workers": "batch augmentation in the loader workers"}[decode]  # with no worker: in the main process
    assert f"(packed as JPEG; {how})" in (tmp_path / "run" / "train.log").read_text()
    pixels = out / "train.u8"
    data = bytearray(pixels.read_bytes())
    data[int(np.load(out / "train.idx.npy")[2, 0])] = 0  # image 2 no longer starts as a JPEG
    pixels.write_bytes(bytes(data))
    p = run("train", "--data", out, *flags, "--out", tmp_path / "run2", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    error = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and f"image 2 of {pixels} cannot be decoded" in error[0], p.stderr
    assert f"alexnet data check {out}" in error[0]


def test_a_run_from_a_jpeg_pack_resumes_inside_an_epoch_to_the_same_weights(tmp_path):
    """Same sampler, same per-sample draws as the raw pack: a run resumed from a step checkpoint in the
    middle of an epoch ends with the weights of a run never stopped (dropout on, so the random state counts)."""
    src = write_folder(tmp_path / "src", classes=3, train_per_class=8, val_per_class=2, size=72)
    data = packed.pack(src, tmp_path / "p", "72", encoding="jpeg", **QUIET)
    flags = ["--resize", "72", "--crop", "64", "--fc-width", "32", "--batch-size", "4", "--workers", "0", "--quiet",
             "--deterministic", "--dropout", "0.5", "--lr", "0.03", "--keep-last", "100", "--epochs", "2",
             "--checkpoint-every", "2"]
    straight = tmp_path / "straight"
    run_here("train", "--data", data, "--out", straight, *flags)
    step = straight / "checkpoints" / "step-000000008.pt"  # epoch 2, after 2 of its 6 steps
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(step, resumed / "checkpoints" / step.name)
    p = run_here("train", "--data", data, "--out", resumed, *flags, "--resume", "auto")
    assert "at epoch 2, step 2 of it" in p.stdout
    assert max_diff(final_weights(resumed), final_weights(straight)) == 0.0
