"""GPU paths, run where CUDA is present (skipped elsewhere; CI has no GPU)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY, batchnorm_variances, shas

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_one_gpu_nccl_run_through_torchrun(tiny_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "alexnet",
           "train", "--data", str(tiny_data), "--out", str(out), *TINY, "--epochs", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on cuda:0" in p.stdout and "backend nccl" in p.stdout
    assert (out / "checkpoints" / "last.pt").is_file() and shas(p.stdout)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_nccl_agree(tiny_data, tmp_path):
    cmd = [sys.executable, "-m", "alexnet", "train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TINY,
           "--batch-size", "4", "--nproc-per-node", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "backend nccl" in p.stdout
    ranks = shas(p.stdout)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]


def test_jpeg_decoded_on_the_gpu_matches_the_workers(tmp_path):
    """nvJPEG's pixels are not libjpeg-turbo's to the bit: the batches agree in labels, unreadable counts
    and draws, and their images to about a level."""
    from alexnet.config import TrainConfig
    from alexnet.data.batch import on_device
    from test_jpeg import loaders, mixed_folder
    root = mixed_folder(tmp_path / "src")
    a, b = loaders(root, TrainConfig(resize="40", crop=36, hflip=0.5, brightness=0.3))
    bad, on_cpu = [0, 0], []
    cuda = torch.device("cuda")
    for batch_a, batch_b in zip(a, b):
        x, tx, bx = on_device(batch_a, cuda, True, a.dataset.batch)
        y, ty, by = on_device(batch_b, cuda, True, b.dataset.batch)
        on_cpu += getattr(batch_b[0][0], "on_cpu", [])
        bad = [bad[0] + bx, bad[1] + by]
        assert torch.equal(tx, ty) and x.shape == y.shape
        assert (x - y).abs().mean() < 0.03, (x - y).abs().mean()  # about 1.5 levels of 255 in normalised units
    assert bad == [3, 3]
    assert [p.rsplit("/", 1)[-1] for p in on_cpu] == ["huffman.jpg"]  # nvJPEG decoded every other JPEG


def test_training_from_jpegs_decoded_on_the_gpu(tiny_data, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "alexnet", "train", "--data", str(tiny_data), "--out", str(out), *TINY,
                        "--epochs", "2", "--jpeg-decode", "device"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "decoded on the device" in p.stdout and (out / "checkpoints" / "last.pt").is_file()


def test_training_from_packed_data_held_on_the_gpu(tiny_data, tmp_path):
    """Held in GPU memory or read by the loader, the same deterministic run gives the same weights."""
    from alexnet.data import packed
    data = packed.pack(tiny_data, tmp_path / "packed", "72", workers=0, log=lambda *_: None)
    weights = {}
    for mode in ("yes", "no"):
        out = tmp_path / mode
        p = subprocess.run([sys.executable, "-m", "alexnet", "train", "--data", str(data), "--out", str(out), *TINY,
                            "--epochs", "2", "--deterministic", "--data-on-device", mode],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert ("held in cuda" in p.stdout) == (mode == "yes") and (out / "checkpoints" / "last.pt").is_file()
        weights[mode] = shas(p.stdout)
    assert weights["yes"] == weights["no"] and weights["yes"]


def test_train_bn_in_bf16_on_the_gpu_saves_the_folded_model_of_what_it_trained(tiny_data, tmp_path):
    """--train-bn under bf16 autocast and channels_last on CUDA: the saved plain model's convolutions compute,
    on the GPU, what the trained BatchNorm model's compute in evaluation, to bf16's rounding."""
    from alexnet import checkpoint
    from alexnet.models import add_batchnorm, create_model
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "alexnet", "train", "--data", str(tiny_data), "--out", str(out), *TINY,
                        "--epochs", "2", "--lr", "0.05", "--train-bn", "--precision", "bf16"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "BatchNorm while training" in p.stdout and "bf16" in p.stdout and "on cuda" in p.stdout
    state = checkpoint.load_run(out / "checkpoints" / "last.pt")
    stats = batchnorm_variances(state)
    assert len(stats) == 5 and all(not torch.allclose(v, torch.ones_like(v)) for v in stats)  # they learnt
    cuda = torch.device("cuda")
    with_bn = add_batchnorm(create_model("alexnet", 3, fc_width=32))
    with_bn.load_state_dict(state["model_with_bn"])
    plain = create_model("alexnet", 3, fc_width=32)
    plain.load_state_dict(state["model"], strict=True)
    x = torch.randn(4, 3, 64, 64, device=cuda).contiguous(memory_format=torch.channels_last)
    feats = []
    for m in (with_bn, plain):
        m = m.to(cuda, memory_format=torch.channels_last).eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            feats.append(m.features(x).float())
    rel = ((feats[0] - feats[1]).norm() / feats[0].norm()).item()
    assert feats[0].norm() > 0 and rel < 3e-2, rel  # bf16 keeps 2 to 3 significant digits; a wrong fold is off by ~0.7
