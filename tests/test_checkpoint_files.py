"""Files that are not checkpoints, given where a checkpoint or weights file goes: one line that says what
the file is, never a traceback, never advice to load unsafely."""

import pytest
from PIL import Image

from conftest import TINY, cli


@pytest.fixture(scope="module")
def not_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("not-checkpoints")
    (root / "empty.pt").write_bytes(b"")
    (root / "short.txt").write_text("hello\n")
    (root / "long.pt").write_text("lorem ipsum dolor sit amet, " * 400)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "image.png")
    return {"empty (0 bytes)": root / "empty.pt", "a text file": root / "short.txt",
            "a text file ": root / "long.pt", "a PNG image": root / "image.png"}


def uses(path, tiny_data, out):
    return {"eval": ["eval", "--checkpoint", path, "--data", tiny_data],
            "export": ["export", "--checkpoint", path, "--format", "safetensors", "--out", out / "m.safetensors"],
            "predict": ["predict", "--checkpoint", path, tiny_data / "val"],
            "train --resume": ["train", "--data", tiny_data, *TINY, "--out", out / "run", "--resume", path],
            "train --weights": ["train", "--data", tiny_data, *TINY, "--out", out / "run", "--weights", path]}


@pytest.mark.parametrize("command", ["eval", "export", "predict", "train --resume", "train --weights"])
def test_a_file_that_is_not_a_checkpoint_gets_one_line(command, not_checkpoints, tiny_data, tmp_path, capsys):
    for what, path in not_checkpoints.items():
        code, out, err = cli(capsys, *uses(path, tiny_data, tmp_path)[command])
        assert code == 2, (what, code, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and f"{path} is not a checkpoint: it is {what.strip()}" in lines[0], (what, err)
        assert "weights_only" not in err and "Traceback" not in err
        assert not (tmp_path / "run").exists()  # no run folder left behind


@pytest.mark.parametrize("command", ["eval", "export", "predict", "train --resume", "train --weights"])
def test_a_folder_given_for_a_checkpoint_gets_the_files_to_give(command, tiny_data, tmp_path, capsys):
    run = tmp_path / "given" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    said = {run: f"{run} is a run folder: give one of its files, {run}/checkpoints/best.pt (the best validation "
                 f"top-1) or {run}/checkpoints/last.pt (the newest)",
            run / "checkpoints": f"{run}/checkpoints is a checkpoint folder: give one of its files, "
                                 f"{run}/checkpoints/best.pt",
            tmp_path / "given": f"{tmp_path / 'given'} is a folder, not a checkpoint file",
            tmp_path / "gone": "does not exist"}  # (train's flags say it quoted, before this check)
    for path, words in said.items():
        code, out, err = cli(capsys, *uses(path, tiny_data, tmp_path)[command])
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0] and str(path) in lines[0], (path, err)
        assert not (tmp_path / "run").exists()


def test_a_pickle_of_other_objects_is_refused_without_suggesting_unsafe_loading(tmp_path, capsys):
    import argparse
    import torch
    path = tmp_path / "objects.pt"
    torch.save({"model": argparse.Namespace(a=1)}, path)  # loading it would import and build any class
    code, _, err = cli(capsys, "eval", "--checkpoint", path)
    assert code == 2 and "holds objects other than tensors" in err
    assert "weights_only" not in err and "will likely succeed" not in err


def test_last_and_best_are_links_to_step_files_not_copies(tiny_data, tmp_path):
    from conftest import run_here
    out = tmp_path / "run"
    run_here("train", "--data", tiny_data, "--out", out, *TINY, "--epochs", "2")
    ckpts = out / "checkpoints"
    steps = {p.stat().st_ino: p.name for p in ckpts.glob("step-*.pt")}
    assert len(steps) == 2
    assert (ckpts / "last.pt").stat().st_ino in steps and (ckpts / "best.pt").stat().st_ino in steps
    assert len({p.stat().st_ino for p in ckpts.iterdir()}) == 2  # four names, two files


def test_a_new_run_in_the_folder_of_an_earlier_one_is_refused_and_leaves_it_as_it_was(tiny_data, tmp_path, capsys):
    """Without --resume, a run folder that holds checkpoints is refused: a new run there would replace
    last.pt and best.pt, and --resume auto would later take the earlier run's newest step file for its own."""
    from conftest import run_here
    out = tmp_path / "run"
    run_here("train", "--data", tiny_data, "--out", out, *TINY, "--epochs", "2")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "checkpoints").iterdir()}
    metrics = (out / "metrics.jsonl").read_text()
    code, _, err = cli(capsys, "train", "--data", tiny_data, "--out", out, *TINY)
    assert code == 2 and err == (f"alexnet train: error: --out {out} holds the checkpoints of an earlier run (the "
                                 f"newest: {max(n for n in before if n.startswith('step-'))}): continue it with "
                                 f"--resume auto (with a larger --epochs to train it on), or give another --out for "
                                 f"a new run\n"), err
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "checkpoints").iterdir()} == before
    assert (out / "metrics.jsonl").read_text() == metrics


def test_resume_auto_on_a_finished_run_says_it_is_complete(tiny_data, tmp_path):
    from conftest import run_here
    out = tmp_path / "run"
    run_here("train", "--data", tiny_data, "--out", out, *TINY)
    p = run_here("train", "--data", tiny_data, "--out", out, *TINY, "--resume", "auto")
    assert "the run is already complete" in p.stdout and "holds all 1 epoch (--epochs 1)" in p.stdout
    assert "resumed from" not in p.stdout
    # the same checkpoint resumed in a new run folder: said alike, with no table of epochs there to show
    elsewhere = tmp_path / "elsewhere"
    p = run_here("train", "--data", tiny_data, "--out", elsewhere, *TINY, "--resume", out / "checkpoints" / "last.pt")
    assert "the run is already complete" in p.stdout and "nothing trained, so no checkpoint written" in p.stdout
    assert not any((elsewhere / "checkpoints").iterdir())


def test_an_earlier_checkpoint_resumed_with_fewer_epochs_changes_nothing(tiny_data, tmp_path):
    """Resumed from epoch 1's checkpoint with --epochs 1, the run (trained to 2) is complete as asked: its
    record is left as it was (it lost epoch 2's line, which no later resume would write again)."""
    from conftest import run_here
    out = tmp_path / "run"
    run_here("train", "--data", tiny_data, "--out", out, *TINY, "--epochs", "2", "--keep-last", "5")
    first = sorted((out / "checkpoints").glob("step-*.pt"))[0]
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "config.yaml")}
    p = run_here("train", "--resume", first, "--epochs", "1")
    assert "the run is already complete" in p.stdout and "removed" not in p.stdout
    assert {name: (out / name).read_bytes() for name in before} == before
