"""Pieces of the training step (train.train_one_epoch): gradient clipping; training with BatchNorm folded
at the end (--train-bn)."""

import json
import shutil

import pytest
import torch

from alexnet import checkpoint
from alexnet.config import TrainConfig
from alexnet.models import add_batchnorm, create_model
from alexnet.progress import Progress
from alexnet.train import Schedule, Trainer, train_one_epoch

from conftest import TINY, batchnorm_variances, max_diff, run_here, shas


def epoch(model, batches, lr: float, input_size: int = 224, **kw) -> dict:
    """`train_one_epoch` over `batches` (a step each) with plain SGD at a constant `lr`, on the CPU; `kw`
    are the Trainer's settings (scaler, clip_grad_norm)."""
    cfg = TrainConfig(schedule="constant", epochs=1, warmup_epochs=0)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=lr), Schedule(cfg, len(batches), lr),
                      torch.nn.CrossEntropyLoss(), torch.device("cpu"), **kw)
    return train_one_epoch(trainer, batches, global_step=0, input_size=input_size,
                           progress=Progress(len(batches), "t", enabled=False))


def one_step(clip: float, scaler=None) -> float:
    """The L2 norm of the change of the weights over one plain SGD step (lr 1, no momentum, no decay)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 10
    t = torch.arange(16) % 4
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    epoch(model, [(x, t, 0)], 1.0, scaler=scaler, clip_grad_norm=clip)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return float((after - before).norm())


def test_clipping_bounds_the_global_gradient_norm():
    unclipped = one_step(0.0)
    assert unclipped > 1.0  # the control: without clipping this step is long
    assert one_step(0.25) == pytest.approx(0.25, rel=1e-4)
    assert one_step(100.0) == pytest.approx(unclipped, rel=1e-6)  # under the bound: untouched


def test_clipping_under_a_gradient_scaler_clips_the_unscaled_gradients():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert one_step(0.25, scaler) == pytest.approx(0.25, rel=1e-4)


def test_training_with_clipping_is_reproducible_and_changes_the_run(tiny_data, tmp_path):
    runs = []
    for name, extra in [("a", ["--clip-grad-norm", "0.01"]), ("b", ["--clip-grad-norm", "0.01"]), ("plain", [])]:
        p = run_here("train", "--data", tiny_data, "--out", tmp_path / name, *TINY, "--deterministic", *extra)
        runs.append(shas(p.stdout)[0])
    assert runs[0] == runs[1] != runs[2]


def bn_steps(batches) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """BatchNorm's running statistics before and after `train_one_epoch` over `batches` (one step each)."""
    torch.manual_seed(0)
    model = add_batchnorm(create_model("alexnet", 4, dropout=0.0, fc_width=16))
    before = [b.clone() for b in model.buffers() if b.is_floating_point()]
    out = epoch(model, batches, 0.01, input_size=64)
    return before, [b for b in model.buffers() if b.is_floating_point()], out


def test_skipped_and_blank_steps_leave_the_batchnorm_statistics_as_they_were():
    x, t = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.arange(4)
    poisoned = x.clone()
    poisoned[0, 0, 5, 5] = float("nan")
    blank = (torch.empty(0), torch.zeros(0, dtype=torch.long), 4)  # every image of the batch unreadable
    for batches, skipped in [([(poisoned, t, 0)], 1), ([blank], 0)]:
        before, after, out = bn_steps(batches)
        assert out["skipped"] == skipped
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    before, after, _ = bn_steps([(x, t, 0)])  # the control: a real step moves them
    assert not any(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.slow
def test_train_bn_saves_the_plain_model_that_evaluates_as_trained_and_resumes_exactly(tiny_data, tmp_path):
    flags = [*TINY, "--deterministic", "--epochs", "2", "--lr", "0.05", "--train-bn", "--checkpoint-every", "2",
             "--keep-last", "10"]
    straight = tmp_path / "straight"
    p = run_here("train", "--data", tiny_data, "--out", straight, *flags)
    assert "alexnet with BatchNorm while training" in p.stdout
    state = checkpoint.load_run(straight / "checkpoints" / "last.pt")
    plain = create_model("alexnet", 3, fc_width=32)
    plain.load_state_dict(state["model"], strict=True)  # the plain architecture's keys and shapes
    stats = batchnorm_variances(state)
    assert len(stats) == 5 and all(not torch.allclose(v, torch.ones_like(v)) for v in stats)  # they learnt

    # `alexnet eval` of the folded weights gives what the run's own validation measured with BatchNorm
    last = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    e = json.loads(run_here("eval", "--checkpoint", straight / "checkpoints" / "last.pt", "--workers", "0",
                            "--json").stdout.splitlines()[-1])
    assert e["acc1"] == last["val_acc1"]
    assert e["loss"] == pytest.approx(last["val_loss"], rel=1e-5)

    # resumed inside the second epoch (24 images in batches of 8: 3 steps an epoch; step 4 is its first)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step-000000004.pt", resumed / "checkpoints")
    run_here("train", "--data", tiny_data, "--out", resumed, *flags, "--resume", "auto")
    again = checkpoint.load_run(resumed / "checkpoints" / "last.pt")
    assert max_diff(again["model_with_bn"], state["model_with_bn"]) == 0.0
    assert max_diff(again["model"], state["model"]) == 0.0


@pytest.mark.parametrize("source", ["jpeg", "packed"])
def test_val_crop_is_the_size_the_run_validates_evaluates_and_exports_at(tiny_data, tmp_path, source):
    """--val-crop 80 of images resized to 88, training on 64-px crops: the run's own validation, `alexnet
    eval` by default and the exported metadata all use the 80-px centre crop, not the 64 of training."""
    from alexnet.export import metadata
    data = tiny_data
    if source == "packed":
        data = tmp_path / "packed"
        run_here("data", "pack", tiny_data, data, "--resize", "88", "--workers", "0")
    out = tmp_path / "run"
    flags = [*TINY, "--resize", "88", "--val-crop", "80", "--deterministic", "--epochs", "2", "--lr", "0.01",
             "--init", "fan-in", "--dropout", "0"]  # fan-in: outputs that depend on the image after 6 steps
    p = run_here("train", "--data", data, "--out", out, *flags)
    if source == "packed":
        assert "crops read from the memory map" in p.stdout  # the held CPU path, whose windows differ in size
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    ckpt = out / "checkpoints" / "last.pt"
    runs = {crop: json.loads(run_here("eval", "--checkpoint", ckpt, "--workers", "0", "--json", *crop).stdout)
            for crop in ((), ("--crop", "80"), ("--crop", "64"))}
    assert runs[()]["crop"] == 80 and runs[()]["loss"] == runs[("--crop", "80")]["loss"]
    assert runs[()]["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert abs(runs[("--crop", "64")]["loss"] - last["val_loss"]) > 1e-3, runs  # the control: size matters
    meta = metadata(checkpoint.load_run(ckpt))
    assert meta["crop"] == 80 and meta["input"]["shape"] == ["batch", 3, 80, 80]


def test_val_crop_larger_than_the_resized_image_is_a_clear_error(tiny_data, tmp_path):
    p = run_here("train", "--data", tiny_data, "--out", tmp_path / "run", *TINY, "--val-crop", "80", check=False)
    assert p.returncode == 2 and "--val-crop: 80 is larger than the resized image (72)" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "run").exists()
