"""Logging around the loop: TensorBoard event files read back with TensorBoard's own reader, the log file
in the run folder, the table of epochs at the end."""

import json
import re

import pytest

from alexnet.logs import summary_table
from conftest import TINY, cli


def test_tensorboard_events_hold_the_metrics(shipped):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = shipped
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/train_loss", "epoch/val_loss", "epoch/val_acc1", "epoch/val_acc5", "epoch/lr",
            "epoch/images_per_sec", "train/loss", "train/lr"} <= tags
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("val_acc1", "val_loss", "train_loss"):
        scalars = events.Scalars(f"epoch/{key}")
        assert [s.step for s in scalars] == [m["global_step"] for m in metrics] == [3, 6]
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # --log-every 1


def test_run_folder_keeps_a_timestamped_log_and_the_output_ends_with_a_table(shipped):
    out, p = shipped
    log = (out / "train.log").read_text().splitlines()
    stamped = [line for line in log if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line)]
    table = log[log.index(next(x for x in log if x.endswith("epochs (* best top-1):"))) + 1:][:4]
    assert len(stamped) + len(table) == len(log) and table[0].startswith("epoch")  # only the table is bare
    # the lines said before the run folder was made are kept too (the pack the folder was found packed in,
    # the weights), then the folder's line
    assert "training from the pack of" in stamped[0] and "weights from" in stamped[1]
    assert f"run folder {out};" in stamped[2] and stamped[-1].endswith("(rank 0 of 1)")
    assert "epoch 2/2: train loss" in p.stdout and "epoch 2/2: train loss" in "\n".join(log)
    table = p.stdout.split("epochs (* best top-1):\n")[1].splitlines()
    assert table[0].split() == ["epoch", "train", "loss", "val", "loss", "top-1", "top-5", "lr", "img/s", "seconds"]
    assert [row.split()[0] for row in table[2:4]] == ["1", "2"]
    assert "epoch 1/2 1/3" not in p.stderr  # --quiet: no progress lines


def test_summary_table_marks_the_best_epoch_and_keeps_the_last_line_of_a_repeated_epoch():
    row = {"train_loss": 1.0, "val_loss": 1.0, "val_acc5": 1.0, "lr": 0.1, "images_per_sec": 10.0,
           "epoch_seconds": 2.0}
    text = summary_table([{**row, "epoch": 1, "val_acc1": 0.5}, {**row, "epoch": 2, "val_acc1": 0.9},
                          {**row, "epoch": 2, "val_acc1": 0.7}, {**row, "epoch": 3, "val_acc1": 0.6}])
    rows = text.splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    assert "70.00%*" in rows[1] and "*" not in rows[0] + rows[2]


def test_train_log_is_kept_when_the_host_program_set_up_logging_first(tiny_data, tmp_path, capsys):
    """`alexnet train` called from a program whose root logger is already set up at WARNING still writes
    its lines to the run folder's train.log."""
    import logging
    root = logging.getLogger()
    handler, level = logging.StreamHandler(), root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        code, _, err = cli(capsys, "train", "--data", tiny_data, *TINY, "--out", tmp_path / "r")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert code == 0, err
    log = (tmp_path / "r" / "train.log").read_text()
    assert "run folder" in log and "epoch 1/1" in log
