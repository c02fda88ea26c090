"""train.step: one optimizer step (accumulation, the non-finite vote, blank batches) and an epoch of them."""

import pytest
import torch

from alexnet.config import TrainConfig
from alexnet.errors import NonFiniteLoss
from alexnet.progress import Progress
from alexnet.train.schedule import Schedule
from alexnet.train.step import Trainer, train_one_epoch
from conftest import TINY, run_here

CPU = torch.device("cpu")


def small_model(bn: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(4) if bn else torch.nn.Identity()
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), norm, torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def trainer(model, lr=0.1, **kw) -> Trainer:
    cfg = TrainConfig(schedule="constant", epochs=1, warmup_epochs=0)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=lr), Schedule(cfg, 100, lr),
                   torch.nn.CrossEntropyLoss(), CPU, **kw)


def data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def epoch(t: Trainer, batches, **kw) -> dict:
    return train_one_epoch(t, batches, global_step=0, progress=Progress(0, "", enabled=False), input_size=8, **kw)


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_accumulated_micro_batches_make_the_step_of_their_whole_batch():
    x, y = data(16)
    # without BatchNorm, whose batch statistics differ between 4 and 8 images
    whole, split, apart = small_model(bn=False), small_model(bn=False), small_model(bn=False)
    one = epoch(trainer(whole), [(x[:8], y[:8], 0), (x[8:], y[8:], 0)])
    two = epoch(trainer(split, accum_steps=2), [(x[i:i + 4], y[i:i + 4], 0) for i in range(0, 16, 4)])
    assert one["images"] == two["images"] == 16 and one["global_step"] == two["global_step"] == 2
    assert torch.allclose(weights(whole), weights(split), atol=1e-6)
    # the control: four steps of 4 images are another training
    epoch(trainer(apart), [(x[i:i + 4], y[i:i + 4], 0) for i in range(0, 16, 4)])
    assert (weights(apart) - weights(whole)).abs().max() > 1e-4


def test_a_step_that_any_rank_finds_not_finite_is_skipped_with_weights_and_statistics_kept():
    model = small_model()
    x, y = data(4)
    t = trainer(model, any_rank=lambda flag: True)  # as if another rank's loss were not finite
    w, stats = weights(model), model[1].running_mean.clone()
    out = epoch(t, [(x, y, 0)])
    assert out["skipped"] == 1 and out["images"] == 0
    assert torch.equal(weights(model), w) and torch.equal(model[1].running_mean, stats)
    out = epoch(trainer(model), [(x, y, 0)])  # the control: the same batch, voted finite, trains
    assert out["skipped"] == 0 and not torch.equal(weights(model), w)
    assert not torch.equal(model[1].running_mean, stats)


def test_too_many_non_finite_steps_in_a_row_stop_with_the_last_good_weights():
    model = small_model()
    x, y = data(4)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    t = trainer(model, max_nonfinite=2)
    epoch(t, [(x, y, 0)])
    w = weights(model)
    with pytest.raises(NonFiniteLoss, match="not finite for 2 steps in a row \\(up to global step 3\\)"):
        train_one_epoch(t, [(nan, y, 0)] * 3, global_step=1, progress=Progress(0, "", enabled=False), input_size=8)
    assert torch.equal(weights(model), w)
    # Counted across epochs: epochs of one step each (a small fine-tune) stop as well.
    t = trainer(model, max_nonfinite=3)
    for step in (1, 2):
        out = train_one_epoch(t, [(nan, y, 0)], global_step=step, progress=Progress(0, "", enabled=False), input_size=8)
        assert out["skipped"] == 1
    with pytest.raises(NonFiniteLoss, match="not finite for 3 steps in a row \\(up to global step 4\\)"):
        train_one_epoch(t, [(nan, y, 0)], global_step=3, progress=Progress(0, "", enabled=False), input_size=8)


def test_a_micro_batch_of_only_unreadable_images_is_counted_and_trains_nothing():
    model = small_model()
    x, y = data(4)
    w, stats = weights(model), model[1].running_mean.clone()
    blank = (torch.empty(0), torch.empty(0, dtype=torch.long), 3)
    out = epoch(trainer(model), [blank, (x, y, 1)])
    assert out["bad"] == 4 and out["images"] == 4 and out["skipped"] == 0
    # its step took a zero-weighted blank image: no change of weights or statistics (plain SGD, no decay)
    model2 = small_model()
    epoch(trainer(model2), [blank])
    assert torch.equal(weights(model2), w) and torch.equal(model2[1].running_mean, stats)


def test_after_step_ends_the_epoch_where_it_says():
    model = small_model()
    x, y = data(4)
    seen = []
    out = epoch(trainer(model), [(x, y, 0)] * 5, after_step=lambda step, sums: seen.append((step, sums["images"]))
                or step == 3)
    assert out["stopped"] and out["global_step"] == 3 and seen == [(1, 4), (2, 8), (3, 12)]


def test_a_resumed_epoch_continues_its_sums():
    model = small_model()
    x, y = data(4)
    partial = {"loss_sum": 10.0, "correct": 2, "images": 8, "seconds": 1.0, "skipped": 1, "bad": 2}
    out = epoch(trainer(model), [(x, y, 0)], sums=partial)
    assert out["images"] == 12 and out["skipped"] == 1 and out["bad"] == 2 and out["loss_sum"] > 10.0
    assert out["seconds"] >= 1.0


def test_a_run_whose_loss_is_never_finite_stops_across_short_epochs_and_records_no_loss(tmp_path):
    """3 steps an epoch, every one of them skipped (--lr 1e30): the run stops at the 10th in a row, in its
    4th epoch, and the epochs that trained nothing record no training loss (NaN, drawn as a gap), not 0."""
    import json
    from conftest import TINY, run_here, write_folder
    data = write_folder(tmp_path / "data", classes=3, train_per_class=4, val_per_class=2)
    out = tmp_path / "run"
    p = run_here("train", "--data", data, "--out", out, *TINY, "--batch-size", "4", "--epochs", "6", "--lr", "1e30",
                 "--max-nonfinite-steps", "10", check=False)
    assert p.returncode == 1 and "not finite for 10 steps in a row" in p.stderr, p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows][1:] == [3, 3] and rows[-1]["epoch"] == 3
    assert all(r["train_loss"] != r["train_loss"] for r in rows[1:])  # NaN


@pytest.mark.parametrize("flags,said", [
    (["--parallel", "hybrid", "--backend", "gloo"],
     "note: --parallel hybrid, --backend gloo have no effect here: they act between processes, and this run has one"),
    (["--local-sgd-period", "4"], "note: --local-sgd-period has no effect here: it acts between processes"),
    (["--local-sgd-warmup", "3"], "note: --local-sgd-warmup has no effect here: it acts between processes"),
])
def test_settings_for_several_processes_given_to_one_are_noted(flags, said, tiny_data, tmp_path):
    """They were taken without a word, and saved in the run's config as if they had acted."""
    p = run_here("train", "--data", tiny_data, "--out", tmp_path / "r", *TINY, "--no-quiet", *flags)
    assert said in p.stdout + p.stderr
