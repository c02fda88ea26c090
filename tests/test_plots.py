"""`alexnet plot` and `alexnet eval --confusion`: the figures drawn, and valid PNG files written."""

import json

import numpy as np

from alexnet.plots import PANELS, confusion_figure, load_runs, training_curves
from conftest import cli


def fake_run(folder, epochs, acc):
    folder.mkdir(parents=True)
    rows = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "val_acc1": acc * e, "val_acc5": 0.9,
             "lr": 0.01 / e, "images_per_sec": 100.0 + e, "global_step": 10 * e} for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_one_line_per_run_on_every_panel_and_a_legend_of_run_names(tmp_path):
    runs = load_runs([fake_run(tmp_path / "baseline", 3, 0.2), fake_run(tmp_path / "wide", 5, 0.15),
                      fake_run(tmp_path / "other" / "wide", 2, 0.1)])
    # a folder name that two runs share is replaced by the paths
    assert [name for name, _ in runs] == ["baseline", str(tmp_path / "wide"), str(tmp_path / "other" / "wide")]
    fig = training_curves(runs)
    assert len(fig.axes) == len(PANELS) == 6
    for ax, (title, key) in zip(fig.axes, PANELS):
        assert ax.get_title() == title
        lines = ax.get_lines()
        assert len(lines) == 3
        assert [len(line.get_xdata()) for line in lines] == [3, 5, 2]
        assert list(lines[1].get_ydata()) == [m[key] for m in runs[1][1]]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [name for name, _ in runs]


def test_every_run_name_reaches_the_legend(tmp_path, monkeypatch):
    monkeypatch.chdir(fake_run(tmp_path / "here", 2, 0.2))
    runs = load_runs([".", fake_run(tmp_path / "_hidden", 2, 0.1)])
    fig = training_curves(runs)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["here", "_hidden"]


def test_plot_command_writes_a_png(shipped, tmp_path, capsys):
    import matplotlib.image
    out, _ = shipped
    other = fake_run(tmp_path / "other", 2, 0.3)
    code, stdout, _ = cli(capsys, "plot", out, other, "--out", tmp_path / "curves.png")
    assert code == 0 and "2 runs" in stdout
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(tmp_path / "curves.png").shape[:2] == (850, 1500)
    code, _, stderr = cli(capsys, "plot", tmp_path / "nothing", "--out", tmp_path / "x.png")
    assert code == 2 and stderr == (f"alexnet plot: error: {tmp_path / 'nothing'} does not exist (give the run "
                                    f"folders of alexnet train, the --out folders)\n")
    (tmp_path / "nothing").mkdir()
    code, _, stderr = cli(capsys, "plot", tmp_path / "nothing", "--out", tmp_path / "x.png")
    assert code == 2 and stderr == (f"alexnet plot: error: {tmp_path / 'nothing'} has no metrics.jsonl (give the "
                                    f"run folders of alexnet train, the --out folders)\n")
    assert not (tmp_path / "x.png").exists()
    # a run's metrics.jsonl given for its folder is taken for it
    code, stdout, _ = cli(capsys, "plot", other / "metrics.jsonl", "--out", tmp_path / "one.png")
    assert code == 0 and (tmp_path / "one.png").exists()


def test_confusion_matrix_counts_and_figure(shipped, tiny_data, tmp_path, capsys):
    out, _ = shipped
    code, stdout, _ = cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data", tiny_data,
                          "--workers", "0", "--json", "--confusion", tmp_path / "confusion.png")
    assert code == 0
    m = json.loads(stdout.strip().splitlines()[-1])
    matrix = np.array(m["confusion"])
    assert matrix.shape == (3, 3) and matrix.sum() == m["count"] == 12
    assert list(matrix.sum(axis=1)) == [4, 4, 4] and np.trace(matrix) == m["correct1"]
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = confusion_figure(matrix, ["circle", "ring", "square"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["circle", "ring", "square"]
    assert [t.get_text() for t in ax.texts] == [str(v) for v in matrix.ravel()]


def test_a_confusion_file_that_cannot_be_written_is_refused_at_start_and_loses_no_result(shipped, tiny_data,
                                                                                          tmp_path, capsys, monkeypatch):
    """A folder given as --confusion, or one without permission to write (root may write anywhere, so that
    permission is taken away by os.access here), is refused before the evaluation; a write that fails at
    the end (a full disk) comes after the metrics were printed."""
    import os
    import alexnet.plots
    out, _ = shipped
    flags = ["eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data", tiny_data, "--workers", "0"]
    code, stdout, err = cli(capsys, *flags, "--confusion", tmp_path)
    assert code == 2 and stdout == "" and "--confusion: " in err and "is a folder" in err
    (tmp_path / "ro").mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else access(p, mode))
    code, stdout, err = cli(capsys, *flags, "--confusion", tmp_path / "ro" / "c.png")
    assert code == 2 and stdout == "" and f"no permission to write in {tmp_path / 'ro'}" in err
    monkeypatch.setattr(os, "access", access)

    def full(fig, path):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(alexnet.plots, "save", full)
    code, stdout, err = cli(capsys, *flags, "--json", "--confusion", tmp_path / "c.png")
    assert code != 0 and json.loads(stdout.strip().splitlines()[-1])["count"] == 12
    assert "No space left on device" in err and "Traceback" not in err


def test_a_last_line_cut_short_is_left_out_and_said_but_a_damaged_line_before_it_is_refused(tmp_path, capsys):
    """A run in progress (the README: plot works on it) or ended by a crash has its last line half written:
    the whole run was refused."""
    run = tmp_path / "run"
    run.mkdir()
    whole = json.dumps({"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "val_acc1": 0.2, "val_acc5": 0.6, "lr": 0.01,
                        "images_per_sec": 80.0})
    (run / "metrics.jsonl").write_text(whole + "\n" + whole[:30])
    assert [m["epoch"] for m in load_runs([run])[0][1]] == [1]
    assert capsys.readouterr().err == f"{run / 'metrics.jsonl'}: its last line is cut short, left out\n"
    (run / "metrics.jsonl").write_text(whole[:30] + "\n" + whole + "\n")
    code, _, err = cli(capsys, "plot", run, "--out", tmp_path / "c.png")
    assert code == 2 and f"{run / 'metrics.jsonl'} line 1 is not a metrics record" in err
