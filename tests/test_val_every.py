"""--val-every N: validation every N epochs and after the last, and what the run records in between."""

import json

from alexnet import train
from alexnet.logs import summary_table
from alexnet.plots import load_runs, training_curves

from conftest import TINY, cli


def test_validation_every_n_epochs_and_after_the_last(tiny_data, tmp_path, capsys, monkeypatch):
    calls, evaluate = [], train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **kw: calls.append(1) or evaluate(*a, **kw))
    args = ["train", "--data", tiny_data, *TINY, "--epochs", "5", "--val-every", "2", "--out", tmp_path / "run"]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert len(calls) == 3  # after epochs 2, 4 and 5, the last
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    assert ["val_acc1" in m for m in metrics] == [False, True, False, True, True]
    assert all("train_loss" in m and "lr" in m for m in metrics)
    log = (run / "train.log").read_text()
    assert "epoch 1/5: train loss" in log and "not validated (--val-every 2)" in log
    assert log.count("not validated") == 2 and log.count("top-1 ") >= 3
    table = summary_table(metrics).splitlines()
    assert len(table) == 2 + 5 and table[2].split()[2:4] == ["-", "-"]  # epoch 1: no val loss, no top-1
    assert table[3].split()[2] != "-"
    assert sum("*" in row for row in table) == 1
    report = (run / "report.md").read_text()
    assert "| final (epoch 5) |" in report and "| best (epoch " in report
    assert (run / "checkpoints" / "best.pt").is_file()
    # the curves join the validated epochs; the training curves have every epoch
    fig = training_curves(load_runs([run]))
    by_title = {ax.get_title(): ax.get_lines()[0] for ax in fig.axes}
    assert list(by_title["val top-1"].get_xdata()) == [2, 4, 5]
    assert list(by_title["train loss"].get_xdata()) == [1, 2, 3, 4, 5]


def test_val_every_is_checked_before_any_work(tmp_path, capsys):
    for args, message in [
        (["--val-every", "0"], "--val-every: must be at least 1"),
        (["--val-every", "2", "--schedule", "plateau"], "--val-every: the plateau schedule divides"),
    ]:
        code, _, stderr = cli(capsys, "train", *args, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache")
        assert code == 2 and message in stderr, (args, stderr)
        assert not (tmp_path / "run").exists()
