"""Datasets as users have them: the validation split under another common name, or named by --val-dir;
small images."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from alexnet import checkpoint
from alexnet.cli import main
from alexnet.config import resolve_train
from alexnet.data import packed
from alexnet.data.folder import held_out

from conftest import run_cli, run_here, write_folder

SMALL = ["--resize", "72", "--crop", "64", "--fc-width", "32", "--batch-size", "8", "--workers", "0", "--quiet",
         "--epochs", "1"]


def renamed(tmp_path, name):
    root = write_folder(tmp_path / f"data-{name}", classes=3, train_per_class=4, val_per_class=2)
    if name != "val":
        (root / "val").rename(root / name)
    return root


@pytest.mark.parametrize("name", ["valid", "validation", "test"])
def test_a_validation_folder_under_another_common_name_is_found_and_logged(tmp_path, name):
    root = renamed(tmp_path, name)
    out = tmp_path / "run"
    p = run_here("train", "--data", root, "--out", out, *SMALL)
    assert f"validation split: {root / name}" in p.stdout
    assert (out / "metrics.jsonl").read_text().count("val_acc1") == 1
    e = run_here("eval", "--checkpoint", out / "checkpoints" / "last.pt", "--workers", "0")  # the run's data, found again
    assert f"last.pt on {root / name} (6 images" in e.stdout and "top-1" in e.stdout


def test_a_run_given_relative_paths_is_evaluated_from_any_folder(tmp_path, monkeypatch):
    """The run keeps its --data and --out as absolute paths: its checkpoint is evaluated, and the run
    resumed, from another working folder. A checkpoint that holds a relative data folder which is not there
    (one written before) is said to, with the fix."""
    renamed(tmp_path, "val")
    monkeypatch.chdir(tmp_path)
    run_here("train", "--data", "data-val", "--out", "run", *SMALL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    e = run_here("eval", "--checkpoint", "../run/checkpoints/last.pt", "--workers", "0")
    assert f"last.pt on {tmp_path / 'data-val' / 'val'} (6 images" in e.stdout
    r = run_here("train", "--resume", "../run/checkpoints/last.pt", "--epochs", "2", "--workers", "0")
    assert f"checkpoints in {tmp_path / 'run' / 'checkpoints'}" in r.stdout and not (elsewhere / "run").exists()
    # A run folder moved elsewhere goes on in its new place (it went back to the old one, made again).
    (tmp_path / "run").rename(tmp_path / "moved")
    r = run_here("train", "--resume", "../moved/checkpoints/last.pt", "--epochs", "3", "--workers", "0")
    assert f"checkpoints in {tmp_path / 'moved' / 'checkpoints'}" in r.stdout and not (tmp_path / "run").exists()
    assert len((tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()) == 3
    (tmp_path / "moved").rename(tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    saved["config"]["data"] = "data-val"
    torch.save(saved, tmp_path / "old.pt")
    e = run_here("eval", "--checkpoint", "../old.pt", "--workers", "0", check=False)
    assert e.returncode == 2 and ("../old.pt was trained on 'data-val', a path relative to the folder the training "
                                  "started in, which does not exist here: give the data's folder with --data") in e.stderr


def test_val_is_preferred_to_test_and_val_dir_picks_another(tmp_path):
    root = renamed(tmp_path, "val")
    shutil.copytree(root / "val", root / "test")
    first, *others = sorted((root / "test").iterdir())
    for folder in others:  # test/ holds 2 images of one class, val/ 6 of three
        shutil.rmtree(folder)
    out = tmp_path / "run"
    p = run_here("train", "--data", root, "--out", out, *SMALL)
    assert "validation split:" not in p.stdout  # val/: the usual layout, nothing to say
    e = run_here("eval", "--checkpoint", out / "checkpoints" / "last.pt", "--workers", "0", "--data", root, "--val-dir", "test", "--json")
    assert '"count": 2' in e.stdout


def test_no_validation_folder_or_a_wrong_val_dir_is_one_clear_line(tmp_path, capsys):
    root = renamed(tmp_path, "holdout")
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "r1"), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no validation folder (looked for val/, valid/, validation/, test/)" in err
    assert "--val-dir NAME" in err and "or hold out a share of train/ with --val-fraction 0.1" in err
    assert len(err.splitlines()) == 1
    assert main(["train", "--data", str(root), "--val-dir", "nothere", "--out", str(tmp_path / "r2"), *SMALL]) == 2
    assert f"--val-dir nothere: {root / 'nothere'} does not exist" in capsys.readouterr().err
    out = tmp_path / "r3"
    run_here("train", "--data", root, "--val-dir", "holdout/", "--out", out, *SMALL)  # as a shell completes it
    assert checkpoint.load_run(out / "checkpoints" / "last.pt")["config"]["val_dir"] == "holdout"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--data", str(root)]) == 2
    err = capsys.readouterr().err  # eval takes no --val-fraction: not suggested
    assert "has no validation folder" in err and "--val-dir NAME" in err and "--val-fraction" not in err


def test_pack_and_check_follow_the_same_rules(tmp_path, capsys):
    root = renamed(tmp_path, "valid")
    assert main(["data", "check", str(root)]) == 0
    assert "0 layout problem(s)" in capsys.readouterr().out
    out = tmp_path / "packed"
    assert main(["data", "pack", str(root), str(out), "--resize", "72", "--workers", "0"]) == 0
    assert packed.read_meta(out)["splits"]["val"]["images"] == 6
    holdout = renamed(tmp_path, "holdout")
    assert main(["data", "check", str(holdout)]) == 1
    assert "has no validation folder" in capsys.readouterr().out
    assert main(["data", "check", str(holdout), "--val-dir", "holdout"]) == 0
    assert main(["data", "pack", str(holdout), str(tmp_path / "p2"), "--resize", "72", "--workers", "0"]) == 2
    assert "has no validation folder" in capsys.readouterr().err


def test_a_folder_of_small_images_trains_at_small_sizes_with_no_other_flag(tmp_path):
    """CIFAR-sized photos (32 px) with a test/ split: trained at the built-in dataset's --resize 72
    --crop 64, said in the output and train.log, and recorded in config.yaml."""
    root = renamed(tmp_path, "test")
    for f in root.rglob("*.jpg"):
        with Image.open(f) as img:
            small = img.resize((32, 32))
        small.save(f, quality=95)
    out = tmp_path / "run"
    p = run_cli("train", "--data", root, "--epochs", "1", "--out", out)
    note = f"{root} holds small images (median shorter side 32 px in a sample of train/): --resize 72 --crop 64"
    assert note in p.stdout and note in (out / "train.log").read_text()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["resize"], saved["crop"]) == ("72", 64)


def test_small_image_sizes_give_way_to_the_users_and_larger_images_keep_the_defaults(tmp_path):
    small = write_folder(tmp_path / "small", classes=2, train_per_class=2, val_per_class=1, size=40)
    cfg, _ = resolve_train({"data": str(small), "crop": "70"})
    assert (cfg.resize, cfg.crop) == ("72", 70)
    cfg, _ = resolve_train({"data": str(small), "resize": "100", "crop": "96"})
    assert (cfg.resize, cfg.crop) == ("100", 96)
    large = write_folder(tmp_path / "large", classes=2, train_per_class=2, val_per_class=1, size=72)
    cfg, _ = resolve_train({"data": str(large)})
    assert (cfg.resize, cfg.crop) == ("256", 224)


def flat(tmp_path, per_class=10):
    """A folder of class folders only, no split: what many downloads are."""
    root = write_folder(tmp_path / "flat-src", classes=3, train_per_class=per_class, val_per_class=1)
    out = tmp_path / "flat"
    shutil.copytree(root / "train", out)
    return out


def test_class_folders_alone_a_folder_of_images_or_a_file_are_told_what_to_do(tmp_path, capsys):
    root = flat(tmp_path)
    for command in (["train", "--data", str(root), *SMALL], ["data", "pack", str(root), str(tmp_path / "p")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{root}/train does not exist" in err and f"{root} holds 3 folder(s) (circle/, ring/, square/): if " \
               "they are the classes, --val-fraction 0.1 trains on them" in err and len(err.splitlines()) == 1
    split = renamed(tmp_path, "val")
    assert main(["train", "--data", str(split / "train"), *SMALL]) == 2  # the training folder given for its parent
    assert f"{split / 'train'} is itself a training folder: give the folder above it, --data {split}\n" in \
        capsys.readouterr().err
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next((root / "ring").iterdir()), images / "one.jpg")
    assert main(["train", "--data", str(images), *SMALL]) == 2
    assert f"{images} holds images but no class folders: put each class's images in a folder" in capsys.readouterr().err
    assert main(["data", "pack", str(images / "one.jpg"), str(tmp_path / "p")]) == 2
    assert f"data folder {images / 'one.jpg'} is a file, not a folder" in capsys.readouterr().err
    flat_val = renamed(tmp_path, "val")  # validation images straight in val/, as ImageNet's come
    for image in list((flat_val / "val").rglob("*.jpg")):
        image.rename(flat_val / "val" / f"{image.parent.name}-{image.name}")
    for folder in list((flat_val / "val").iterdir()):
        if folder.is_dir():
            folder.rmdir()
    assert main(["train", "--data", str(flat_val), *SMALL]) == 2
    assert f"{flat_val / 'val'} has no class folders; expected {flat_val / 'val'}/<class>/<image>. Its images lie " \
           "directly in it" in capsys.readouterr().err


def test_val_fraction_holds_out_a_stratified_share_that_depends_only_on_the_files_and_split_seed(tmp_path):
    root = flat(tmp_path)
    classes, train, val = held_out(root, 0.2, 0)
    assert len(classes) == 3 and len(val) == 6 and len(train) == 24  # 2 of each class's 10
    assert sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]
    assert not {p for p, _ in val} & {p for p, _ in train}
    assert held_out(root, 0.2, 0) == (classes, train, val)  # the same twice
    assert held_out(root, 0.2, 1)[2] != val  # another split seed, another split
    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy)  # another path, other modification times: the same files held out
    assert [p.replace(str(copy), str(root)) for p, _ in held_out(copy, 0.2, 0)[2]] == [p for p, _ in val]


def test_a_run_with_val_fraction_records_its_split_and_eval_uses_it_again(tmp_path):
    root = flat(tmp_path)
    (root / "ring" / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    p = run_here("train", "--data", root, "--val-fraction", "0.2", "--out", out, *SMALL)
    assert f"validation split: 6 images held out of {root} (--val-fraction 0.2, --split-seed 0)" in p.stdout
    note = f"left out 1 file(s) of {root}'s class folders that are not images by their names (1 .txt)"
    assert note in p.stdout
    assert note in run_here("data", "pack", root, tmp_path / "pk", "--val-fraction", "0.2", "--workers", "0").stdout
    held = [Path(path).relative_to(root).as_posix() for path, _ in held_out(root, 0.2, 0)[2]]
    assert (out / "val_files.txt").read_text().split() == held
    saved = checkpoint.load_run(out / "checkpoints" / "last.pt")
    assert saved["val_files"] == held and saved["config"]["val_fraction"] == 0.2
    e = run_here("eval", "--checkpoint", out / "checkpoints" / "last.pt", "--workers", "0", "--json")
    assert '"count": 6' in e.stdout and "validation split: the 6 images held out when the model was trained" in e.stderr
    e = run_here("eval", "--checkpoint", out / "checkpoints" / "last.pt", "--workers", "0")
    assert f"last.pt on the images of {root} held out from training (6 images" in e.stdout
    moved = shutil.copytree(root, tmp_path / "moved")  # the folder moved or copied: --data finds the same files
    e = run_here("eval", "--checkpoint", out / "checkpoints" / "last.pt", "--workers", "0", "--data", moved)
    assert f"last.pt on the images of {moved} held out from training (6 images" in e.stdout
    (root / held[0]).unlink()  # a held-out file gone: said, not silently another split
    code = main(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--workers", "0"])
    assert code == 2


def test_val_fraction_in_pack_and_check_and_its_errors(tmp_path, capsys):
    root = flat(tmp_path)
    assert main(["data", "check", str(root), "--val-fraction", "0.2"]) == 0
    out = tmp_path / "packed"
    assert main(["data", "pack", str(root), str(out), "--resize", "72", "--workers", "0", "--val-fraction", "0.2"]) == 0
    meta = packed.read_meta(out)
    assert meta["splits"]["val"]["images"] == 6 and meta["splits"]["train"]["images"] == 24
    capsys.readouterr()
    assert main(["train", "--data", str(out), "--val-fraction", "0.2", *SMALL]) == 2
    assert "whose validation split was chosen when it was packed" in capsys.readouterr().err
    assert main(["train", "--data", str(root), "--val-fraction", "1.5", *SMALL]) == 2
    assert "--val-fraction: must be in [0, 1)" in capsys.readouterr().err
    one = flat(tmp_path / "one", per_class=1)
    assert main(["train", "--data", str(one), "--val-fraction", "0.2", "--out", str(tmp_path / "r"), *SMALL]) == 2
    assert "holds out no image" in capsys.readouterr().err


def test_pack_and_check_refuse_bad_split_settings_as_train_does(tmp_path, capsys):
    root = flat(tmp_path)
    for command in (["data", "check", str(root)], ["data", "pack", str(root), str(tmp_path / "p"), "--workers", "0"]):
        for flags, said in ((["--val-fraction", "1.5"], "--val-fraction: must be in [0, 1)"),
                            (["--val-fraction", "0.2", "--val-dir", "test"], "and --val-dir: give one")):
            capsys.readouterr()
            assert main([*command, *flags]) == 2
            err = capsys.readouterr().err
            assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists()
    # --split-seed goes on to the layout check (which shares it holds out cannot change what it finds)
    assert main(["data", "check", str(root), "--val-fraction", "0.2", "--split-seed", "7"]) == 0


def test_a_held_out_split_says_the_validation_folder_goes_unused_and_train_is_no_validation_folder(tmp_path):
    root = renamed(tmp_path, "val")
    p = run_here("train", "--data", root, "--val-fraction", "0.25", "--out", tmp_path / "run", *SMALL)
    assert (f"validation split: 3 images held out of {root / 'train'} (--val-fraction 0.25, --split-seed 0); "
            f"{root / 'val'} is not used") in p.stdout
    p = run_here("train", "--data", root, "--val-dir", "train", "--out", tmp_path / "r2", *SMALL, check=False)
    assert p.returncode == 2 and "--val-dir train: that is the training split" in p.stderr
    assert not (tmp_path / "r2").exists()
