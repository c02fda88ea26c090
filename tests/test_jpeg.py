"""JPEG files decoded on the device a batch at a time (data.jpeg). CUDA is not here, so the device is the
CPU: torchvision decodes the same list of files there with libjpeg-turbo, which gives the workers' decoded
pixels exactly, so every difference left comes from our resize, crop, flip and bookkeeping."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from alexnet.config import TrainConfig, parse_resize
from alexnet.data import ImageFolder, make_loader
from alexnet.data.batch import BatchAugment, on_device
from alexnet.errors import DataError
from alexnet.data.jpeg import JpegBatch, decodes_lists, resize_crop_flip
from alexnet.data.transforms import Resize, eval_transform, train_transform
from alexnet.train.plan import augmentation

from conftest import cli

CPU = torch.device("cpu")
# The device path decodes a list of files in one call, which torchvision does from 0.20 on (also on the CPU,
# which stands in for the GPU here); with 0.19 the path is not used (device_decoding_available).
batched_decoding = pytest.mark.skipif(
    not decodes_lists(),
    reason="torchvision before 0.20 decodes one JPEG a call, so the device path is not used with it")


def photo(w, h, seed):
    """A smooth image with some texture: JPEG-like content (pure noise would hide resize errors less)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / (7 + c) + y / (11 - c) + c) for c in range(3)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))


def bad_huffman(data: bytes) -> bytes:
    """A complete JPEG whose header reads but whose data no decoder can read: its first Huffman table
    claims more codes than a table may hold."""
    data = bytearray(data)
    at = data.index(b"\xff\xc4")
    data[at + 5:at + 21] = b"\xff" * 16
    return bytes(data)


def mixed_folder(root):
    """JPEGs of several sizes (smaller and larger than the resize, one greyscale), a PNG and a CMYK JPEG
    (decoded by the workers), a truncated JPEG (kept off the device: decoded, and found unreadable, by
    the workers), a complete JPEG whose data cannot be decoded (the device tries, then the CPU) and a file
    that is not an image at all."""
    sizes = [(50, 40), (40, 61), (96, 72), (130, 90), (72, 72), (61, 40)]
    for split in ("train", "val"):
        for c, cls in enumerate("ab"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                img = photo(w, h, 10 * c + i)
                if i == 4:
                    img.convert("L").save(folder / f"{i}.jpg", quality=90)
                else:
                    img.save(folder / f"{i}.jpg", quality=90)
            photo(45, 45, 99 + c).save(folder / "p.png")
            photo(48, 52, 77 + c).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    data = (root / "train" / "a" / "0.jpg").read_bytes()
    (root / "train" / "a" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "train" / "a" / "huffman.jpg").write_bytes(bad_huffman(data))
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def datasets(cfg: TrainConfig, root: str, device, say) -> tuple:
    """(train, val) as alexnet train opens them (data.build), for `device`."""
    from alexnet.data.build import build_loaders
    from alexnet.train.plan import evaluation
    built = build_loaders(root, device, train=augmentation(cfg), val=evaluation(cfg), batch_size=4, eval_batch=4,
                          workers=0, jpeg_decode=cfg.jpeg_decode, data_on_device=cfg.data_on_device, say=say)
    return built.train_set, built.val_set


@pytest.mark.parametrize("resize", ["40", "256", "56x44"])
def test_resize_matches_pils(resize):
    """Our resize on decoded pixels against PIL's (the workers' path): within one level everywhere, and
    for the shorter side resized (the usual case) equal on more than 99% of the pixels (resizing
    both ways at once rather than horizontally first misses 8-19%)."""
    r = Resize(parse_resize(resize))
    size = 36
    images, geometry, expected = [], [], []
    for k, (w, h) in enumerate([(50, 40), (40, 61), (300, 210), (300, 210), (97, 140), (44, 56)]):  # 2, 3: one flipped
        img = photo(w, h, k)
        tw, th = r.target(w, h)
        top, left, flip = (th - size) // (k + 1), (tw - size) // (6 - k), k % 2
        geometry.append([th, tw, top, left, flip])
        crop = np.asarray(r(img))[top:top + size, left:left + size]
        expected.append(crop[:, ::-1] if flip else crop)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    got = resize_crop_flip(images, torch.tensor(geometry), size).permute(0, 2, 3, 1).int()
    diff = (got - torch.from_numpy(np.stack(expected)).int()).abs()
    assert diff.max() <= 1
    if "x" not in resize:  # exact sizes: PIL sometimes resizes vertically first, and then ~20% are a level off
        assert (diff > 0).float().mean() < 0.01, (diff > 0).float().mean()
    flipped = torch.from_numpy(np.stack(expected)[:, :, ::-1].copy()).int()  # control: the mirror is not it
    assert (got[1] - flipped[1]).abs().float().mean() > 5


def loaders(root, cfg, strict=False, **kw):
    transform = train_transform(**augmentation(cfg))
    on_bad = "error" if strict else "skip"
    workers_path = ImageFolder(root, "train", transform, seed=3, on_bad_image=on_bad)
    workers_path.batch = BatchAugment(transform)
    device_path = ImageFolder(root, "train", transform, seed=3, on_bad_image=on_bad)
    device_path.batch = BatchAugment(transform)
    device_path.decode_on_device = True
    return [make_loader(d, 4, 0, train=False, device_type="cuda", **kw) for d in (workers_path, device_path)]


def test_device_decoding_gives_the_workers_batches(tmp_path):
    """The same draws, labels, unreadable counts and (to rounding) images as decoding in the workers, on
    a mix of JPEGs, PNGs, a CMYK JPEG and unreadable files; the finished batches agree, flips, jitter and
    PCA lighting included."""
    root = mixed_folder(tmp_path / "src")
    cfg = TrainConfig(resize="40", crop=36, hflip=0.5, brightness=0.3, saturation=0.3, hue=0.05,
                      pca_lighting=0.1)
    a, b = loaders(root, cfg)
    bad, jpeg_batches, on_cpu = [0, 0], 0, []
    for batch_a, batch_b in zip(a, b):
        jpeg_batches += type(batch_b[0][0]).__name__ == "JpegBatch"
        x, tx, bx = on_device(batch_a, CPU, True, a.dataset.batch)
        y, ty, by = on_device(batch_b, CPU, True, b.dataset.batch)
        on_cpu += getattr(batch_b[0][0], "on_cpu", [])
        bad[0], bad[1] = bad[0] + bx, bad[1] + by
        assert torch.equal(tx, ty)
        assert x.shape == y.shape and y.is_contiguous(memory_format=torch.channels_last)
        diff = (x - y).abs()
        assert diff.max() < 0.1, diff.max()  # a level or two after normalisation
        assert (diff > 1e-4).float().mean() < 0.02  # the resize's rare level, spread a little by saturation and hue
    # the last batch (a file that is not an image, a CMYK JPEG and a PNG) has only the workers' crops
    assert bad == [3, 3] and jpeg_batches == len(a) - 1
    assert [p.name for p in map(Path, on_cpu)] == ["huffman.jpg"]  # the one file the decoder refused
    # control: the same images with another seed's draws are far apart
    other = ImageFolder(root, "train", train_transform(**augmentation(cfg)), seed=4)
    other.batch, other.decode_on_device = BatchAugment(train_transform(**augmentation(cfg))), True
    x, _, _ = on_device(next(iter(make_loader(other, 4, 0, train=False, device_type="cuda"))), CPU, True, other.batch)
    y, _, _ = on_device(next(iter(b)), CPU, True, b.dataset.batch)
    assert (x - y).abs().mean() > 0.2


def test_device_decoding_in_loader_workers(tmp_path):
    """Through worker processes (the batch's bytes cross as one tensor), the same as in-process."""
    root = mixed_folder(tmp_path / "src")
    cfg = TrainConfig(resize="40", crop=36, hflip=0.5)
    _, in_process = loaders(root, cfg)
    with_workers = make_loader(in_process.dataset, 4, 2, train=False, device_type="cuda", persistent=False)
    for p, w in zip(in_process, with_workers):
        x, tx, bx = on_device(p, CPU, False, in_process.dataset.batch)
        y, ty, by = on_device(w, CPU, False, in_process.dataset.batch)
        assert torch.equal(x, y) and torch.equal(tx, ty) and bx == by


def test_unreadable_file_on_the_device_path(tmp_path):
    """A complete JPEG whose header reads but whose data does not fails the batch's one-call decode; the
    others of the batch are still decoded, and it is counted (or, under --on-bad-image error, named in an
    error)."""
    root = tmp_path / "src"
    for split in ("train", "val"):
        for i in range(3):
            (root / split / "a").mkdir(parents=True, exist_ok=True)
            photo(50, 40, i).save(root / split / "a" / f"{i}.jpg", quality=90)
    data = (root / "train" / "a" / "0.jpg").read_bytes()
    (root / "train" / "a" / "1.jpg").write_bytes(bad_huffman(data))
    cfg = TrainConfig(resize="40", crop=36)
    a, b = loaders(root, cfg)
    assert isinstance(next(iter(b))[0][0], JpegBatch) and next(iter(b))[0][0].paths[1].endswith("1.jpg")
    x, tx, bx = on_device(next(iter(a)), CPU, False, a.dataset.batch)
    y, ty, by = on_device(next(iter(b)), CPU, False, b.dataset.batch)
    assert by == bx == 1 and y.shape[0] == 2 and ty.tolist() == tx.tolist() == [0, 0]
    assert (x - y).abs().max() < 0.05
    _, strict = loaders(root, cfg, strict=True)
    with pytest.raises(DataError, match="unreadable image .*1.jpg"):
        on_device(next(iter(strict)), CPU, False, strict.dataset.batch)


@pytest.fixture
def one_thread():
    """One model thread: the CPU standing in for the GPU decodes a batch in one call, as the GPU does
    (with more threads it decodes a share of the batch in each, see the test below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@batched_decoding
def test_the_cpu_decodes_a_batch_in_the_models_threads_in_order(tmp_path):
    """On a CPU the batch is shared among as many threads as the model's: the images come back in the
    batch's order, as one call decodes them, and a file that cannot be decoded fails the batch."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from alexnet.data import jpeg
    files = []
    for i in range(7):
        photo(40 + i, 30 + 2 * i, i).save(tmp_path / f"{i}.jpg", quality=90)
        files.append(torch.frombuffer(bytearray((tmp_path / f"{i}.jpg").read_bytes()), dtype=torch.uint8))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got = jpeg._decode_on_cpu_threads(files)
            assert [tuple(g.shape) for g in got] == [(3, 30 + 2 * i, 40 + i) for i in range(7)]
            assert all(torch.equal(g, e) for g, e in zip(got, decode_jpeg(files, mode=ImageReadMode.RGB)))
            with pytest.raises(RuntimeError):
                bad = torch.frombuffer(bytearray(bad_huffman(bytes(files[0].numpy()))), dtype=torch.uint8)
                jpeg._decode_on_cpu_threads(files[:3] + [bad] + files[3:])
    finally:
        torch.set_num_threads(threads)


@batched_decoding
def test_a_refused_file_goes_to_the_cpu_at_once_next_time(tmp_path, monkeypatch, one_thread):
    """The first batch with a file the decoder refuses costs a failed batch call and one call a file; the
    next time that file goes straight to the CPU and the others are decoded in one call."""
    import torchvision.io
    for i in range(3):
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        photo(50, 40, i).save(tmp_path / "train" / "a" / f"{i}.jpg", quality=90)
    data = (tmp_path / "train" / "a" / "0.jpg").read_bytes()
    (tmp_path / "train" / "a" / "1.jpg").write_bytes(bad_huffman(data))
    _, b = loaders(tmp_path, TrainConfig(resize="40", crop=36))
    calls = []
    real = torchvision.io.decode_jpeg
    def counted(files, **kw):  # the device path's calls (the CPU decoder of load_rgb passes no device)
        if "device" in kw:
            calls.append(files)
        return real(files, **kw)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", counted)
    firsts = []
    for _ in range(2):
        calls.clear()
        batch = next(iter(b))
        y, ty, by = on_device(batch, CPU, False, b.dataset.batch)
        assert by == 1 and ty.tolist() == [0, 0] and batch[0][0].on_cpu[0].endswith("1.jpg")
        firsts.append(y)
        lengths = [len(c) if isinstance(c, list) else 1 for c in calls]
        if len(firsts) == 1:
            assert lengths == [3, 1, 1, 1]  # the batch call fails, then one call a file
    assert lengths == [2]  # the refused file was not tried again
    assert torch.equal(firsts[0], firsts[1])
    # a batch whose only file for the device is a refused one: no call at all
    (tmp_path / "train" / "a" / "0.jpg").unlink()
    (tmp_path / "train" / "a" / "2.jpg").unlink()
    photo(45, 45, 7).save(tmp_path / "train" / "a" / "p.png")
    _, b = loaders(tmp_path, TrainConfig(resize="40", crop=36))
    calls.clear()
    y, ty, by = on_device(next(iter(b)), CPU, False, b.dataset.batch)
    assert by == 1 and ty.tolist() == [0] and y.shape[0] == 1 and calls == []


def test_truncated_jpegs_stay_off_the_device(tmp_path):
    """A JPEG without its end-of-image marker goes to the workers (nvJPEG would decode what it holds,
    where PIL refuses it); a complete one, also with padding after the marker, goes to the device."""
    from alexnet.data.jpeg import Encoded, read_encoded
    augment = BatchAugment(train_transform(**augmentation(TrainConfig(resize="40", crop=36))))
    photo(50, 40, 1).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "padded.jpg").write_bytes(data + b"\0" * 7)
    for cut in (len(data) // 2, len(data) - 1):
        (tmp_path / f"cut{cut}.jpg").write_bytes(data[:cut])
    kinds = {f.name: type(read_encoded(str(f), augment, torch.Generator().manual_seed(0))) for f in tmp_path.iterdir()}
    assert kinds == {"full.jpg": tuple, "padded.jpg": tuple, f"cut{len(data) // 2}.jpg": type(None),
                     f"cut{len(data) - 1}.jpg": type(None)}
    assert isinstance(read_encoded(str(tmp_path / "full.jpg"), augment, torch.Generator())[0], Encoded)


def test_device_decoding_needs_a_gpu(tiny_data, capsys):
    code, _, err = cli(capsys, "train", "--data", tiny_data, "--device", "cpu", "--jpeg-decode", "device",
                       "--epochs", "1", "--resize", "72", "--crop", "64")
    assert code == 2 and "--jpeg-decode device needs a CUDA device" in err


def test_resize_rounds_halves_up_as_pil():
    """Doubling an image's size makes many values fall on exact halves: PIL's fixed point rounds them up,
    and so must we, to give its pixels exactly."""
    img = photo(64, 48, 5)
    expected = torch.from_numpy(np.asarray(Resize(96)(img)).copy()).permute(2, 0, 1)
    got = resize_crop_flip([torch.from_numpy(np.array(img)).permute(2, 0, 1)], torch.tensor([[96, 128, 0, 0, 0]]), 96)
    assert torch.equal(got[0], expected[:, :, :96])


@batched_decoding
def test_a_gpu_that_cannot_decode_falls_back_to_the_workers(tiny_data, monkeypatch, capsys):
    """Where the device's decoder fails a small test image (no nvJPEG in this build, ROCm), auto decodes
    in the workers with a warning and `device` is a clear error; where it works, the JPEG splits are
    decoded there. (The device is named cuda; nothing runs on it.)"""
    from torchvision import io as tvio

    from alexnet.data import batch
    from alexnet.data.jpeg import device_decoding_works
    real = tvio.decode_jpeg

    def broken(*args, **kwargs):
        raise RuntimeError("nvjpeg not available in this build")

    monkeypatch.setattr(tvio, "decode_jpeg", broken)
    assert "nvjpeg not available" in device_decoding_works(CPU)
    monkeypatch.setattr(tvio, "decode_jpeg", real)
    assert device_decoding_works(CPU) is None  # the probe itself: a real decode of a real JPEG
    monkeypatch.setattr(batch, "device_decoding_available", lambda: True)
    cuda, said = torch.device("cuda"), []
    for decode, works in (("auto", False), ("device", False), ("auto", True), ("workers", True)):
        monkeypatch.setattr(batch, "device_decoding_works", lambda device: None if works else "RuntimeError: no nvJPEG")
        cfg = TrainConfig(data=str(tiny_data), resize="72", crop=64, jpeg_decode=decode)
        if decode == "device" and not works:
            with pytest.raises(DataError, match="cannot decode JPEGs here.*use --jpeg-decode workers"):
                datasets(cfg, str(tiny_data), cuda, said.append)
            continue
        splits = datasets(cfg, str(tiny_data), cuda, said.append)
        assert all(s.batch is not None for s in splits)
        assert [s.decode_on_device for s in splits] == [works and decode != "workers"] * 2, (decode, works)
    assert len(said) == 1 and "decoding them in the loader workers" in said[0]
    cfg = TrainConfig(data=str(tiny_data), resize="72", crop=64, jpeg_decode="device", random_resized_crop=True)
    with pytest.raises(DataError, match="cannot rotate them, take random-resized crops"):
        datasets(cfg, str(tiny_data), cuda, said.append)
    cfg = TrainConfig(data=str(tiny_data), resize="72", crop=64, random_resized_crop=True)  # auto
    splits = datasets(cfg, str(tiny_data), cuda, said.append)
    assert splits[0].batch is not None and not splits[0].decode_on_device  # resized in the workers
    assert splits[1].batch is not None and splits[1].decode_on_device
    # evaluation chooses the same way: test-time views have no batch path
    val = ImageFolder(tiny_data, "val", eval_transform("72", 64, cfg.mean, cfg.std, "10crop"))
    with pytest.raises(DataError, match="or cut test-time views; use --jpeg-decode workers"):
        batch.jpeg_on_gpu([val], cuda, "device", said.append)
    val = ImageFolder(tiny_data, "val", eval_transform("72", 64, cfg.mean, cfg.std, "none"))
    batch.jpeg_on_gpu([val], cuda, "auto", said.append)
    assert val.batch is not None and val.decode_on_device


def test_training_steps_on_device_decoded_batches(tmp_path):
    """train_one_epoch as a GPU run drives it, here on the CPU: batches decoded "on the device" (one with
    an unreadable file dropped after decoding, one with a file the worker dropped) train the model as
    the workers' batches do, and the unreadable files are counted alike."""
    from alexnet.models import create_model
    from alexnet.progress import Progress
    from alexnet.train import Schedule, Trainer, train_one_epoch
    root = mixed_folder(tmp_path / "src")
    cfg = TrainConfig(resize="72", crop=64, hflip=0.5)
    a, b = loaders(root, cfg)
    assert isinstance(next(iter(b))[0][0], JpegBatch) and not isinstance(next(iter(a))[0][0], JpegBatch)
    results = []
    for loader in (a, b):
        torch.manual_seed(0)
        model = create_model("alexnet", 2, 0.0, 16)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        trainer = Trainer(model, optimizer, Schedule(cfg, len(loader), 0.02), torch.nn.CrossEntropyLoss(), CPU,
                          channels_last=True)
        sums = train_one_epoch(trainer, loader, global_step=0, input_size=64,
                               progress=Progress(len(loader), "t", enabled=False), augment=loader.dataset.batch)
        results.append((sums, [p.detach() for p in model.parameters()]))
    (sa, pa), (sb, pb) = results
    assert sa["bad"] == sb["bad"] == 3 and sa["images"] == sb["images"] == 16
    moved = max(float((p - q).abs().max()) for p, q in zip(pa, before))
    apart = max(float((p - q).abs().max()) for p, q in zip(pa, pb))
    assert moved > 1e-3 and apart < 0.01 * moved, (apart, moved)


def test_device_decoding_needs_a_torchvision_that_decodes_lists(monkeypatch):
    from alexnet.data.jpeg import device_decoding_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for version, expected in (("0.19.1+cu121", False), ("0.20.0", True), ("0.29.1+cu130", True)):
        monkeypatch.setattr(torchvision, "__version__", version)
        assert device_decoding_available() is expected, version
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_decoding_available() is False
