"""train.record: the run folder, one metrics.jsonl line and one log line per epoch, the end of a run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import yaml

from alexnet.config import TrainConfig
from alexnet.train.plan import make_plan
from alexnet.train.record import Record
from conftest import TINY, run_cli

T = {"loss_sum": 20.0, "correct": 6, "images": 10, "seconds": 2.0, "bad": 1, "skipped": 2, "global_step": 5}
V = {"loss": 0.5, "acc1": 0.75, "acc5": 1.0, "bad_images": 0}


def record(tmp_path, rank=0, **settings):
    said, logged = [], []
    plan = make_plan(TrainConfig(epochs=3, val_every=2, **settings), rank=rank, world=1, out=tmp_path / "run")
    return Record(plan, said.append, logged.append), said, logged


def test_the_run_folder_holds_the_resolved_settings(tmp_path):
    r, _, _ = record(tmp_path, global_batch_size=16)
    r.open(None)
    try:
        saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
        assert saved["out"] == str(tmp_path / "run") and saved["batch_size"] == 16 and saved["global_batch_size"] == 16
        assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "train.log").is_file()
    finally:
        r.close()


def test_an_epoch_is_one_metrics_line_and_one_log_line(tmp_path):
    r, said, _ = record(tmp_path)
    r.open(None)
    try:
        validated = r.epoch(1, T, V, lr=0.01, crop=64)
        skipped = r.epoch(2, T, {}, lr=0.001, crop=64)
        r.say_epoch(validated, V, T)
        r.say_epoch(skipped, {}, T)
    finally:
        r.close()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [validated, skipped]
    assert validated == {"epoch": 2, "train_loss": 2.0, "train_acc1": 0.6, "val_loss": 0.5, "val_acc1": 0.75,
                         "val_acc5": 1.0, "lr": 0.01, "images_per_sec": 5.0, "epoch_seconds": 2.0, "global_step": 5,
                         "skipped_steps": 2, "bad_images": 1, "val_bad_images": 0, "train_crop": 64}
    assert "val_acc1" not in skipped and skipped["epoch"] == 3
    assert said[0].startswith("WARNING: epoch 2: 1 training and 0 validation images were unreadable")
    assert said[1] == "WARNING: 2 step(s) of epoch 2 skipped: the loss was not finite"
    assert said[2].startswith("epoch 2/3: train loss 2.0000, val loss 0.5000, top-1 75.00%, top-5 100.00%")
    assert "not validated (--val-every 2)" in said[5]


def test_only_rank_0_writes(tmp_path):
    r, _, _ = record(tmp_path, rank=1)
    r.open(None)
    r.epoch(0, T, V, lr=0.01, crop=64)
    r.close()
    assert not (tmp_path / "run").exists()


def test_the_end_of_a_run(tmp_path):
    r, said, logged = record(tmp_path)
    r.open(None)
    try:
        last = r.epoch(0, T, V, lr=0.01, crop=64)
        r.finish({}, ["a", "b"], last["val_acc1"], torch.nn.Linear(2, 2))
    finally:
        r.close()
    assert said[0].startswith("epochs (* best top-1):") and said[-1].startswith("done: best val top-1 75.00%")
    assert logged[-1].startswith("final weights sha256 ") and logged[-1].endswith("(rank 0 of 1)")


def test_a_second_run_in_a_folder_another_run_is_writing_is_refused_and_changes_nothing(tiny_data, tmp_path):
    """Two runs in one --out (a job submitted twice; --resume auto while the first still runs) both trained,
    interleaving their metrics.jsonl lines and checkpoints, and both exited 0."""
    out, env = tmp_path / "run", {**os.environ, "ALEXNET_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "alexnet", "train", "--data", str(tiny_data), "--out", str(out),
                              *TINY, "--epochs", "1000"], stdout=(tmp_path / "first.txt").open("w"),
                             stderr=subprocess.STDOUT, env=env)  # a file: a pipe nobody reads would fill
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.txt").read_text()
            time.sleep(0.2)
        config = (out / "config.yaml").read_bytes()
        second = run_cli("train", "--data", tiny_data, "--out", out, *TINY, "--epochs", "2000", "--resume", "auto",
                         env=env, check=False)
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.startswith(f"alexnet train: error: --out {out} is in use by another run (pid {first.pid} "
                                        f"on {socket.gethostname()}, since "), second.stderr
        assert (out / "config.yaml").read_bytes() == config  # epochs: 1000, not the second run's 2000
        first.send_signal(signal.SIGTERM)  # it saves and ends: the folder is free again
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
        first.wait()
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # one run's lines, none twice
    run_cli("train", "--data", tiny_data, "--out", out, *TINY, "--epochs", len(epochs) + 1, "--resume", "auto",
            env=env)
