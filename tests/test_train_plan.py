"""train.plan: the values a run derives from its settings and world, computed once, frozen; the settings
themselves are never changed."""

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import TINY, run_here

from alexnet.config import TrainConfig, to_dict
from alexnet.errors import ConfigError
from alexnet.train.plan import augmentation, batch_sizes, crop_sizes, evaluation, learning_rate, make_plan


def test_batch_sizes_per_process_and_global():
    assert batch_sizes(TrainConfig(batch_size=32, accum_steps=2), world=3) == (32, 192)
    assert batch_sizes(TrainConfig(global_batch_size=256, accum_steps=2), world=4) == (32, 256)
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes x 1"):
        batch_sizes(TrainConfig(global_batch_size=256), world=3)


def test_peak_learning_rate_scales_linearly_only_when_asked():
    assert learning_rate(TrainConfig(lr=0.1), 1024) == 0.1
    assert learning_rate(TrainConfig(lr=0.1, lr_scaling="linear", lr_reference_batch=256), 1024) == pytest.approx(0.4)


def test_the_plan_is_frozen_and_the_settings_are_not_changed(tmp_path):
    cfg = TrainConfig(global_batch_size=64, epochs=4, out=None, val_tta="10crop", batch_size=999)
    before = to_dict(cfg)
    plan = make_plan(cfg, rank=1, world=2, out=tmp_path / "run")
    assert to_dict(cfg) == before  # cfg untouched
    assert (plan.batch_size, plan.global_batch, plan.eval_batch) == (32, 64, 3)  # 32 crops / 10 views
    assert not plan.main and plan.ckpt_dir == tmp_path / "run" / "checkpoints"
    # what the run saves: its folder and per-process batch filled in, the rest as given
    assert plan.resolved.out == str(tmp_path / "run") and plan.resolved.batch_size == 32
    assert {k: v for k, v in to_dict(plan.resolved).items() if k not in ("out", "batch_size")} == \
           {k: v for k, v in before.items() if k not in ("out", "batch_size")}
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.batch_size = 1


def test_steps_per_epoch_from_the_loader_and_the_error_when_an_epoch_has_none():
    plan = make_plan(TrainConfig(batch_size=8, accum_steps=2), rank=0, world=1, out=Path("r"))
    assert plan.steps_per_epoch == 0
    assert plan.with_steps(batches=7, train_images=56, per_process=56).steps_per_epoch == 3
    assert "3 steps an epoch" in plan.with_steps(7, 56, 56).describe()
    assert "; 1 step an epoch" in plan.with_steps(2, 16, 16).describe()
    with pytest.raises(ConfigError, match="an epoch has no full step: 10 training images over 1 processes give 10 "
                                          "each, fewer than --batch-size 8 x --accum-steps 2"):
        plan.with_steps(batches=1, train_images=10, per_process=10)


def test_crops_per_epoch():
    plan = make_plan(TrainConfig(epochs=5, crop=224, random_resized_crop=True, progressive_crop=96), 0, 1, Path("r"))
    assert plan.crops == (96, 128, 160, 192, 224) == tuple(crop_sizes(plan.resolved))
    assert make_plan(TrainConfig(epochs=3, crop=64), 0, 1, Path("r")).crops == (64, 64, 64)


def test_the_data_layer_gets_plain_values():
    cfg = TrainConfig(resize="80", crop=64, hflip=0.25, brightness=0.1, val_crop=72, val_tta="flip")
    aug = augmentation(cfg)
    assert aug["resize"] == "80" and aug["crop"] == 64 and aug["hflip"] == 0.25 and aug["brightness"] == 0.1
    assert aug["crop_sizes"] is None  # not progressive
    assert evaluation(cfg) == {"resize": "80", "crop": 72, "mean": cfg.mean, "std": cfg.std, "tta": "flip"}
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in aug.values())


def test_a_large_unused_tail_is_warned_with_a_batch_that_uses_the_data():
    from alexnet.train.plan import unused_images
    said = unused_images(200, 1, 128, 1)  # 200 images at the default batch of 128
    assert said.startswith("72 of 200 training images (36%) are left out of every epoch")
    assert "--global-batch-size 100" in said and said.endswith("leaves out 0")
    assert unused_images(1000, 7, 2 * 64, 2).split("--global-batch-size ")[1].split()[0] == "124"  # a multiple of 2
    assert unused_images(24, 3, 8, 1) is None and unused_images(1000, 31, 32, 1) is None  # 0 and 8 left out


def test_a_run_on_little_data_says_what_it_leaves_out(tiny_data, tmp_path):
    p = run_here("train", "--data", tiny_data, "--out", tmp_path / "run", *TINY, "--batch-size", "16")
    assert "WARNING: 8 of 24 training images (33%) are left out of every epoch: 1 step of 16" in p.stdout


def test_a_batch_larger_than_the_training_set_is_said_as_the_one_short_step_it_is(tiny_data, tmp_path):
    """The log said "100 per process ... 1 step an epoch" over 24 images, with no warning."""
    p = run_here("train", "--data", tiny_data, "--out", tmp_path / "r", *TINY, "--batch-size", "100", "--no-quiet")
    assert ("WARNING: the batch (100 per process, 100 global) is more than the 24 training images: an epoch is one "
            "step, of the 24 images each process has (24 in all)") in p.stdout + p.stderr
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text())["global_step"] == 1
