import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torchvision
import yaml

from alexnet import checkpoint
from conftest import TINY, cli, run_cli, run_here, write_folder

METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "images_per_sec", "epoch_seconds"}


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    p = run_cli("train", "--data", tiny_data, "--out", out, *TINY, "--epochs", "2", "--workers", "2", "--no-quiet",
                "--log-every", "1")
    return out, p


def test_train_leaves_the_run_folder(trained, tiny_data):
    out, p = trained
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"] == str(tiny_data) and cfg["fc_width"] == 32 and cfg["epochs"] == 2 and cfg["out"] == str(out)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert METRIC_KEYS <= set(m)
        assert 0 <= m["val_acc1"] <= m["val_acc5"] <= 1
        assert m["images_per_sec"] > 0 and m["epoch_seconds"] > 0
    # progress was shown while it ran (plain lines: the output is a pipe)
    lines = [x.split(" | ")[0] for x in p.stderr.splitlines() if x.startswith("epoch ")]
    assert lines == ["epoch 1/2 1/3", "epoch 1/2 2/3", "epoch 1/2 3/3", "epoch 2/2 1/3", "epoch 2/2 2/3",
                     "epoch 2/2 3/3"]  # --log-every 1; a pipe gets plain lines
    assert all(f" | {k} " in x for x in p.stderr.splitlines() if x.startswith("epoch ") for k in ("loss", "top1", "img_s"))
    assert all(x.endswith(" left") for x in p.stderr.splitlines() if x.startswith("epoch "))
    assert "\r" not in p.stdout + p.stderr and "\x1b" not in p.stdout + p.stderr
    assert not (out / "tensorboard").exists()  # only with --tensorboard


def test_checkpoint_holds_classes_and_config(trained):
    out, _ = trained
    state = checkpoint.load_run(out / "checkpoints" / "last.pt")
    assert state["classes"] == ["circle", "ring", "square"]
    assert state["config"]["arch"] == "alexnet" and state["epoch"] == 2
    assert state["model"]["classifier.6.weight"].shape == (3, 32)


def test_eval_prints_loss_top1_top5(trained, tiny_data, capsys):
    out, _ = trained
    code, stdout, _ = cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data", tiny_data,
                          "--json", "--workers", "0")
    m = json.loads(stdout.strip().splitlines()[-1])
    assert m["count"] == 12 and 0 <= m["acc1"] <= m["acc5"] <= 1
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert m["acc1"] == pytest.approx(last["val_acc1"]) and m["loss"] == pytest.approx(last["val_loss"], rel=1e-4)
    code, stdout, _ = cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data", tiny_data,
                          "--workers", "0")
    assert code == 0 and "top-1" in stdout and "top-5" in stdout


def test_eval_says_how_many_unreadable_images_it_left_out(trained, tiny_data, tmp_path, capsys):
    """Only --json showed bad_images: the line read as if every image had been scored."""
    out, _ = trained
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    (data / "val" / "ring" / "empty.jpg").write_bytes(b"")
    (data / "val" / "ring" / "text.jpg").write_text("not an image")
    code, stdout, _ = cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data", data,
                          "--workers", "0")
    assert code == 0 and f" on {data / 'val'} (12 images; 2 unreadable, left out (alexnet data check lists them), " \
        "resize 72" in stdout, stdout


@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "torchscript", "--out", "{tmp}/m.ts"],
                                     ["predict", "{data}/val"]])
def test_a_checkpoint_whose_weights_do_not_fit_its_own_settings_is_one_line(trained, tiny_data, tmp_path, capsys,
                                                                            command):
    """eval and export ended in load_state_dict's traceback."""
    state = checkpoint.load_run(trained[0] / "checkpoints" / "last.pt")
    state["classes"] = state["classes"] + ["extra"]  # edited by hand
    torch.save(state, tmp_path / "edited.pt")
    args = [a.format(tmp=tmp_path, data=tiny_data) for a in command]
    code, _, err = cli(capsys, args[0], "--checkpoint", tmp_path / "edited.pt", *args[1:])
    assert code == 2 and err.startswith(f"alexnet {args[0]}: error: the checkpoint's weights do not fit its own "
                                        "settings (alexnet, fc width 32, 4 classes): size mismatch for "
                                        "classifier.6.weight") and len(err.splitlines()) == 1, err


def test_eval_at_another_resize_and_crop(trained, tiny_data, capsys, monkeypatch):
    """--resize and --crop replace the run's own for this evaluation: the model gets inputs of the asked
    size, the result says which, the run's values reproduce the default, and a crop that does not fit is
    a clear error."""
    import alexnet.evaluate
    out, _ = trained  # trained at --resize 72 --crop 64
    shapes, original = [], alexnet.evaluate.evaluate

    def spy(model, loader, *args, **kwargs):
        shapes.append(tuple(next(iter(loader))[0].shape[1:]))
        return original(model, loader, *args, **kwargs)

    monkeypatch.setattr(alexnet.evaluate, "evaluate", spy)

    def evaluate(*args):
        code, stdout, err = cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data", tiny_data,
                                "--json", "--workers", "0", *args)
        assert code == 0, err
        return json.loads(stdout.strip().splitlines()[-1])

    default, same, whole, smaller = (evaluate(), evaluate("--resize", "72", "--crop", "64"), evaluate("--crop", "72"),
                                     evaluate("--resize", "64x64", "--crop", "64"))
    assert shapes == [(3, 64, 64), (3, 64, 64), (3, 72, 72), (3, 64, 64)]
    assert (default["resize"], default["crop"], whole["resize"], whole["crop"]) == ("72", 64, "72", 72)
    assert (smaller["resize"], smaller["crop"]) == ("64x64", 64)
    assert same == default
    assert whole["loss"] != pytest.approx(default["loss"]) and smaller["loss"] != pytest.approx(default["loss"])
    assert whole["count"] == smaller["count"] == default["count"] == 12
    code, stdout, _ = cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data", tiny_data,
                          "--workers", "0", "--crop", "72")
    assert code == 0 and "resize 72, crop 72" in stdout
    for args, message in ((["--crop", "80"], "--crop: 80 is larger than the resized image (72); use a crop of at most 72"),
                          (["--resize", "96", "--crop", "100"], "--crop: 100 is larger than the resized image (96)"),
                          (["--crop", "32"], "--crop: 32 is below AlexNet's smallest input, 63"),
                          (["--resize", "big"], "--resize: 'big' is not N or WxH"),
                          (["--crop", "7.5"], "--crop")):
        code, stdout, stderr = cli(capsys, "eval", "--checkpoint", out / "checkpoints" / "last.pt", "--data",
                                   tiny_data, "--workers", "0", *args)
        assert code == 2 and message in stderr and "Traceback" not in stderr and stdout == ""


def test_predict_prints_top_classes(trained, tiny_data, capsys):
    out, _ = trained
    images = sorted((tiny_data / "val").rglob("*.jpg"))[:2]
    code, stdout, _ = cli(capsys, "predict", "--checkpoint", out / "checkpoints" / "best.pt", *images)
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    for line, img in zip(lines, images):
        assert line.startswith(str(img))
        names = [part.split()[0] for part in line.split(": ", 1)[1].split(", ")]
        assert sorted(names) == ["circle", "ring", "square"]  # top-5 capped at the 3 classes
    code, stdout, _ = cli(capsys, "predict", "--checkpoint", out / "checkpoints" / "best.pt", "--json", "--topk", "1",
                          tiny_data / "val")
    rows = [json.loads(x) for x in stdout.strip().splitlines()]
    assert len(rows) == 12 and all(len(r["top"]) == 1 and 0 < r["top"][0]["prob"] <= 1 for r in rows)


def test_predict_prints_each_batch_as_it_is_done_so_an_interrupt_keeps_them(trained, tiny_data, tmp_path):
    """predict held every result until the last image: Ctrl-C on a large folder printed nothing at all. Here
    the third image is a pipe that nothing writes to (named on purpose, as `<(curl -s URL)` would be): the
    first two are said while the third is awaited."""
    out, _ = trained
    images = sorted((tiny_data / "val").rglob("*.jpg"))[:2]
    os.mkfifo(tmp_path / "later.jpg")
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "predict", "--checkpoint",
                             str(out / "checkpoints" / "best.pt"), "--batch-size", "1", *map(str, images),
                             str(tmp_path / "later.jpg")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        said = b""
        while said.count(b"\n") < len(images):  # the pipe's bytes as they come, without a reader's buffer
            assert select.select([proc.stdout], [], [], 60)[0], f"nothing more said while the run waits: {said!r}"
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"the run ended: {proc.stderr.read()!r}"
            said += chunk
        lines = said.decode().splitlines()
        assert [line.split(":")[0] for line in lines] == list(map(str, images)) and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode().strip() == "alexnet predict: interrupted" and rest == b"", err


def test_predict_reads_a_pipe_named_on_purpose_and_leaves_out_those_in_a_folder(trained, tiny_data, tmp_path):
    """A pipe named like an image inside a folder made predict wait forever for a writer."""
    out, _ = trained
    image = sorted((tiny_data / "val").rglob("*.jpg"))[0]
    shutil.copy(image, tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    proc = run_cli("predict", "--checkpoint", out / "checkpoints" / "best.pt", tmp_path, timeout=60)
    assert proc.stdout.startswith(f"{tmp_path / 'a.jpg'}: ") and len(proc.stdout.splitlines()) == 1
    assert proc.stderr == (f"{tmp_path}: 1 entry named like images but not regular files (pipes, sockets, devices) "
                           f"left out, such as {tmp_path / 'pipe.jpg'}\n")
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m alexnet predict --checkpoint "
                          f"{shlex.quote(str(out / 'checkpoints' / 'best.pt'))} <(cat {shlex.quote(str(image))})",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("/dev/fd/"), proc.stderr


def test_predict_into_a_pipe_closed_early_ends_quietly(trained, tiny_data):
    """`alexnet predict --json DIR | head -1` said "error: Broken pipe" and exited 1."""
    out, _ = trained
    for fmt in ([], ["--json"]):
        proc = subprocess.run(f"{shlex.quote(sys.executable)} -m alexnet predict --checkpoint "
                              f"{shlex.quote(str(out / 'checkpoints' / 'best.pt'))} {' '.join(fmt)} --batch-size 1 "
                              f"{' '.join([shlex.quote(str(tiny_data / 'val'))] * 50)} | head -1; "
                              f"echo \"status ${{PIPESTATUS[0]}}\"", shell=True, executable="/bin/bash",
                              capture_output=True, text=True, timeout=120)
        assert proc.stdout.splitlines()[-1] == "status 141" and proc.stderr == "", proc.stderr


def test_predict_missing_image(trained, tmp_path, capsys):
    out, _ = trained
    code, _, stderr = cli(capsys, "predict", "--checkpoint", out / "checkpoints" / "best.pt", tmp_path / "nope.jpg")
    assert code == 2 and stderr == f"alexnet predict: error: '{tmp_path / 'nope.jpg'}' is not a file, folder or glob pattern\n"


def test_predict_skips_unreadable_images_says_which_and_predicts_the_others(trained, tiny_data, tmp_path, capsys):
    out, _ = trained
    folder = tmp_path / "shots"
    folder.mkdir()
    good = sorted((tiny_data / "val").rglob("*.jpg"))[:2]
    for i, image in enumerate(good):
        shutil.copy(image, folder / f"{i}-good.jpg")
    (folder / "1-notes.jpg").write_text("not an image")
    (folder / "2-gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    (folder / "3-photo.heic").write_bytes(b"x")  # not an image by its name: left out, and said
    (folder / ".DS_Store").write_bytes(b"x")  # hidden: left out silently
    code, stdout, stderr = cli(capsys, "predict", "--checkpoint", out / "checkpoints" / "best.pt", folder,
                               folder / "0-good.jpg")
    assert code == 1
    assert [line.split(": ")[0] for line in stdout.splitlines()] == [str(folder / n) for n in ("0-good.jpg", "1-good.jpg", "0-good.jpg")]
    assert stderr.splitlines() == [f"left out 1 file(s) of {folder} that are not images by their names (1 .heic)",
                                   f"WARNING: skipping unreadable image {folder / '1-notes.jpg'}: not an image file",
                                   f"WARNING: skipping unreadable image {folder / '2-gone.jpg'}: No such file or "
                                   "directory (a link to a file that is gone)",
                                   "alexnet predict: 2 of 5 images were unreadable and skipped (listed above)"]


def test_resume_continues_the_run(trained, tiny_data, tmp_path):
    out, _ = trained
    copy = tmp_path / "r"
    shutil.copytree(out, copy)
    run_here("train", "--resume", copy / "checkpoints" / "last.pt", "--out", copy, "--epochs", "3")
    lines = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert checkpoint.load_run(copy / "checkpoints" / "last.pt")["epoch"] == 3


def test_deterministic_runs_give_identical_weights(tiny_data, tmp_path):
    args = [*TINY, "--data", tiny_data, "--deterministic", "--epochs", "2", "--workers", "2"]
    run_cli("train", *args, "--out", tmp_path / "a")  # loader workers: processes of their own
    run_cli("train", *args, "--out", tmp_path / "b")
    run_cli("train", *args, "--out", tmp_path / "c", "--seed", "1")
    a, b, c = (checkpoint.load_run(tmp_path / x / "checkpoints" / "last.pt")["model"] for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # control: another seed differs
    timing = ("images_per_sec", "epoch_seconds")
    ma, mb, mc = ([{k: v for k, v in json.loads(line).items() if k not in timing}
                   for line in (tmp_path / x / "metrics.jsonl").read_text().splitlines()] for x in "abc")
    assert ma == mb and ma != mc  # the same metrics, to the last digit


def test_fine_tune_from_torchvision_weights(tiny_data, tmp_path):
    tv = torchvision.models.alexnet(weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    run_here("train", *TINY, "--fc-width", "4096", "--lr", "1e-9", "--weights", tmp_path / "tv.pth",
             "--data", tiny_data, "--out", tmp_path / "ft")
    state = checkpoint.load_run(tmp_path / "ft" / "checkpoints" / "last.pt")["model"]
    assert state["classifier.6.weight"].shape == (3, 4096)
    assert torch.allclose(state["features.0.weight"], tv.state_dict()["features.0.weight"], atol=1e-6)


def test_data_stats(tiny_data, capsys):
    code, stdout, _ = cli(capsys, "data", "stats", tiny_data)
    mean = yaml.safe_load([l for l in stdout.splitlines() if l.startswith("mean:")][0])["mean"]
    std = yaml.safe_load([l for l in stdout.splitlines() if l.startswith("std:")][0])["std"]
    assert code == 0 and len(mean) == 3 and all(0 < m < 1 for m in mean) and all(0 < s < 0.5 for s in std)
    assert "--mean" in stdout


def test_data_stats_leaves_out_unreadable_files_and_refuses_what_it_cannot_measure(tmp_path, capsys):
    """An unreadable file is left out and said (with its path), as check, pack and train do; a --split that
    is not there, a negative --max-images and a packed dataset are one line each, not a measurement of
    something else or a traceback."""
    from alexnet.data import packed
    root = write_folder(tmp_path / "data", classes=2, train_per_class=3, val_per_class=2)
    (root / "train" / "circle" / "fake.jpg").write_text("not a JPEG")
    code, stdout, _ = cli(capsys, "data", "stats", root)
    assert code == 0 and f"# 6 images of {root / 'train'}" in stdout
    assert f"# 1 unreadable file(s) left out (the first: {root / 'train' / 'circle' / 'fake.jpg'}: " in stdout
    alone = cli(capsys, "data", "stats", root / "train")[1]  # a split folder given itself: the same images
    assert alone.replace(f"{root / 'train'}", "X") == stdout.replace(f"{root / 'train'}", "X")
    code, stdout, err = cli(capsys, "data", "stats", root, "--split", "valid")
    assert code == 2 and stdout == "" and f"{root} has no split folder 'valid' (its folders: train, val)" in err
    code, _, err = cli(capsys, "data", "stats", root, "--max-images", "-3")
    assert code == 2 and "--max-images: '-3': must be at least 0" in err and "Traceback" not in err
    packed.pack(root, tmp_path / "packed", "72", workers=0, log=lambda *a: None)
    code, _, err = cli(capsys, "data", "stats", tmp_path / "packed")
    assert code == 2 and "is a packed dataset: data stats measures the images themselves" in err


def test_version_and_help(capsys):
    assert "alexnet" in cli(capsys, "--version")[1]
    code, stdout, _ = cli(capsys, "train", "--help")
    assert code == 0 and "--fc-width" in stdout
    code, stdout, _ = cli(capsys, "--help")
    assert all(command in stdout for command in ("train", "eval", "predict", "export", "plot", "data"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path):
    args = [*TINY, "--data", tiny_data, "--deterministic", "--dropout", "0.5", "--schedule", "step",
            "--step-size", "1", "--gamma", "0.5"]
    run_here("train", *args, "--epochs", "3", "--out", tmp_path / "full")
    run_here("train", *args, "--epochs", "2", "--out", tmp_path / "cut")
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")  # for the control below
    run_here("train", "--resume", tmp_path / "cut" / "checkpoints" / "last.pt", "--epochs", "3")
    full = checkpoint.load_run(tmp_path / "full" / "checkpoints" / "last.pt")
    resumed = checkpoint.load_run(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert resumed["epoch"] == full["epoch"] == 3
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    assert full["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    # control: the same resume with the last epoch's data in another order ends elsewhere
    run_here("train", "--resume", tmp_path / "cut2" / "checkpoints" / "last.pt", "--out", tmp_path / "cut2",
             "--epochs", "3", "--seed", "7")
    other = checkpoint.load_run(tmp_path / "cut2" / "checkpoints" / "last.pt")
    assert other["epoch"] == 3
    assert not all(torch.equal(full["model"][k], other["model"][k]) for k in full["model"])


def test_resume_with_another_width_is_a_clear_error(trained, tmp_path, capsys):
    out, _ = trained
    code, _, stderr = cli(capsys, "train", "--resume", out / "checkpoints" / "last.pt", "--fc-width", "16",
                          "--out", tmp_path / "x", "--workers", "0")
    assert code == 2 and "does not fit this model" in stderr
    # the particular, not load_state_dict's heading "Error(s) in loading state_dict for AlexNet:" alone
    assert stderr.rstrip().endswith("the shape in current model is torch.Size([16, 9216])"), stderr
    assert not (tmp_path / "x").exists()  # no run folder is left behind


def test_weights_that_do_not_fit_are_a_clear_error(trained, tiny_data, tmp_path, capsys):
    out, _ = trained  # fc width 32
    code, _, stderr = cli(capsys, "train", *TINY, "--fc-width", "64", "--data", tiny_data,
                          "--weights", out / "checkpoints" / "last.pt", "--out", tmp_path / "w")
    assert code == 2 and "--weights" in stderr and "--fc-width" in stderr


@pytest.mark.parametrize("command,args", [("eval", []), ("predict", ["x.jpg"])])
def test_the_checkpoint_is_shown_and_refused_as_required(command, args, capsys):
    """Usage showed [--checkpoint CHECKPOINT] (default: None), an optional flag."""
    code, _, err = cli(capsys, command, *args)
    assert code == 2 and "the following arguments are required: --checkpoint" in err
    code, usage, _ = cli(capsys, command, "--help")
    assert code == 0
    assert f"usage: alexnet {command} [-h] --checkpoint CHECKPOINT " in usage
    shown = usage[usage.index("  --checkpoint CHECKPOINT"):]
    assert "(default: None)" not in shown[:shown.index("\n  --", 3)]


@pytest.mark.parametrize("command,args,message", [
    ("eval", ["--batch-size", "0"], "--batch-size: must be at least 1"),
    ("eval", ["--device", "tpu"], "--device: 'tpu' is not auto"),
    ("predict", ["--topk", "0", "x.jpg"], "--topk: must be at least 1"),
    ("predict", ["--batch-size", "0", "x.jpg"], "--batch-size: must be at least 1"),
])
def test_eval_and_predict_setting_errors(trained, command, args, message, capsys):
    out, _ = trained
    code, _, stderr = cli(capsys, command, "--checkpoint", out / "checkpoints" / "last.pt", *args)
    assert code == 2 and message in stderr


def test_alexnet2012_trains_through_the_cli(tiny_data, tmp_path):
    run_here("train", *TINY, "--arch", "alexnet2012", "--data", tiny_data, "--out", tmp_path / "p")
    state = checkpoint.load_run(tmp_path / "p" / "checkpoints" / "last.pt")
    assert state["config"]["arch"] == "alexnet2012" and state["model"]["features.4.weight"].shape == (256, 48, 5, 5)


@pytest.mark.parametrize("args", [["train", "--precision", "fp64"], ["train", "--arch", "resnet50"],
                                  ["eval", "--tta", "none", "--checkpoint", "x"], ["train", "--epochs", "-3"],
                                  ["trian"]])
def test_an_invalid_choice_is_one_line_like_any_invalid_value(args, capsys):
    code, _, err = cli(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err and "usage:" not in err, err


@pytest.mark.parametrize("args,flag", [
    (["data", "pack", "", "{tmp}/p"], "dir"), (["data", "pack", "{tmp}", " "], "out"),
    (["data", "check", ""], "dir"), (["data", "stats", ""], "dir"),
    (["export", "--checkpoint", "", "--out", "{tmp}/p.pt2"], "--checkpoint"),
    (["export", "--checkpoint", "{tmp}/x.pt", "--out", ""], "--out"),
    (["plot", ""], "RUN_DIR"), (["plot", "{tmp}", "--out", ""], "--out"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(args, flag, tmp_path, capsys, monkeypatch):
    """`alexnet data pack "$SRC" out` with SRC unset packed the folder it ran in."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and f"error: argument {flag}: an empty path; give a file or folder" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "p").exists() and not (tmp_path / "p.pt2").exists()


@pytest.mark.parametrize("args,said", [
    (["bench", "--data", "{tmp}/gone"], "alexnet bench: error: --data: '{tmp}/gone' does not exist"),
    (["bench", "--packed", "{tmp}/gone"], "alexnet bench: error: --packed: '{tmp}/gone' does not exist"),
    (["data", "check", "{tmp}/gone"], "alexnet data check: error: {tmp}/gone does not exist"),
    (["data", "check", "{tmp}/file.txt"], "alexnet data check: error: {tmp}/file.txt is not a folder"),
    (["data", "pack", "{data}", "{tmp}/p", "--resize", "0"],
     "alexnet data pack: error: --resize: '0': a size must be at least 1 pixel"),
    (["train", "--data", "{data}", "--resize", "64x0"], "alexnet train: error: --resize: '64x0': a size must be at "
                                                        "least 1 pixel"),
])
def test_a_path_or_size_that_cannot_be_is_said_as_given(args, said, tiny_data, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    fill = {"tmp": tmp_path, "data": tiny_data}
    code, _, err = cli(capsys, *[a.format(**fill) for a in args])
    assert code == 2 and err == said.format(**fill) + "\n", err
    assert not (tmp_path / "p").exists()
