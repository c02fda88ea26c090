"""Messy data: truncated and corrupt images, non-images with image names, empty files; layout errors."""

import json
import shutil

import pytest

from conftest import TINY, cli, run_cli, run_here, write_folder


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("messy") / "data")
    good = sorted((root / "train" / "circle").glob("*.jpg"))[0]
    (root / "train" / "circle" / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (root / "train" / "ring" / "notes.jpg").write_text("this is not an image\n")
    (root / "train" / "square" / "empty.png").write_bytes(b"")
    return root


def test_data_check_lists_the_bad_files(messy, capsys):
    code, stdout, _ = cli(capsys, "data", "check", messy)
    assert code == 1
    listed = {line.split(": ")[1].rsplit("/", 1)[1] for line in stdout.splitlines() if line.startswith("unreadable:")}
    assert listed == {"truncated.jpg", "notes.jpg", "empty.png"}
    assert "39 image files, 3 unreadable" in stdout


def test_data_check_passes_a_clean_folder_and_reports_layout_problems(tmp_path, capsys):
    root = write_folder(tmp_path / "clean")
    code, stdout, _ = cli(capsys, "data", "check", root)
    assert code == 0 and "not read" not in stdout
    for name in ("a.HEIC", "b.heic", "c.avif", ".DS_Store"):  # files training leaves out are said, not failed
        (root / "train" / "ring" / name).write_bytes(b"x")
    (root / "train" / "ring" / "._00000.jpg").write_bytes(b"\x00\x05\x16\x07 macOS metadata")  # not an image
    (root / "val" / "LICENSE").write_text("x")
    code, stdout, _ = cli(capsys, "data", "check", root)
    assert code == 0 and "not read (not image files by their names): 2 .heic, 1 (no extension), 1 .avif\n" in stdout
    assert "36 image files, 0 unreadable" in stdout  # the "._" file is neither read nor counted
    (root / "train" / "extra").mkdir()
    shutil.copytree(root / "val" / "circle", root / "val" / "only-in-val")
    code, stdout, _ = cli(capsys, "data", "check", root)
    assert code == 1
    assert "extra holds no images" in stdout and "only-in-val" in stdout


def test_a_broken_link_is_an_unreadable_file_for_check_pack_and_train(tmp_path, capsys):
    """A link whose target is gone is listed, skipped and counted as any unreadable file, by a run that
    packs the folder on first use too (it lists the folder's files with their sizes); the messages say
    what is wrong in words, without PIL's in-memory file address or the path said twice."""
    root = write_folder(tmp_path / "data")
    (root / "train" / "ring" / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    (root / "train" / "square" / "notes.jpg").write_text("this is not an image\n")
    (root / "val" / "ring" / "photo.HEIC").write_bytes(b"x")  # not an image by its name: left out, and said
    code, stdout, _ = cli(capsys, "data", "check", root)
    assert code == 1
    assert f"unreadable: {root}/train/ring/gone.jpg: No such file or directory (a link to a file that is gone)" in stdout
    assert f"unreadable: {root}/train/square/notes.jpg: not an image file" in stdout and "BytesIO" not in stdout
    out = tmp_path / "run"
    p = run_here("train", "--data", root, *TINY, "--cache-dir", tmp_path / "cache", "--out", out)
    assert "training from the pack" in p.stdout and "2 unreadable file(s) left out" in p.stdout
    assert json.loads((out / "metrics.jsonl").read_text())["bad_images"] == 2
    note = f"left out 1 file(s) of {root}'s class folders that are not images by their names (1 .heic)"
    assert p.stdout.count(note) == 1
    # a later run, from the pack made then, says it too (once)
    p = run_here("train", "--data", root, *TINY, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "again")
    assert "packing" not in p.stdout and p.stdout.count(note) == 1
    p = run_here("train", "--data", root, *TINY, "--pack", "no", "--out", tmp_path / "files")
    assert f"left out 1 file(s) of {root}'s class folders that are not images by their names (1 .heic)" in p.stdout


def test_a_pack_made_with_data_pack_counts_its_unreadable_files_as_one_made_on_first_use(messy, tmp_path, capsys):
    """The files `alexnet data pack` left out are said at start and counted as bad_images in every epoch, as
    a pack made on first use counts them; --on-bad-image error stops at them, naming one."""
    code, _, _ = cli(capsys, "data", "pack", messy, tmp_path / "packed", "--resize", "72", "--workers", "0")
    assert code == 0
    out = tmp_path / "run"
    p = run_here("train", "--data", tmp_path / "packed", "--out", out, *TINY, "--epochs", "2")
    assert (f"3 unreadable file(s) were left out when {tmp_path / 'packed'} was packed (listed in "
            f"{tmp_path / 'packed' / 'packed.json'})") in p.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["bad_images"] for m in metrics] == [3, 3] and [m["val_bad_images"] for m in metrics] == [0, 0]
    p = run_here("train", "--data", tmp_path / "packed", "--out", tmp_path / "r2", *TINY, "--on-bad-image", "error",
                 check=False)
    assert p.returncode == 2 and "unreadable image " in p.stderr and "left out when" in p.stderr
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_training_skips_and_counts_bad_images(messy, tmp_path):
    out = tmp_path / "run"
    p = run_cli("train", "--data", messy, "--out", out, *TINY, "--epochs", "2", "--workers", "2")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["bad_images"] for m in metrics] == [3, 3] and [m["val_bad_images"] for m in metrics] == [0, 0]
    assert "WARNING: skipping unreadable image" in p.stderr and "truncated.jpg" in p.stderr
    assert "3 training and 0 validation images were unreadable" in p.stdout
    # with two processes the counts are summed over ranks
    out2 = tmp_path / "run2"
    # (batch 1: a batch of only a bad image takes a blank, zero-weighted step to stay in step with the other rank)
    run_cli("train", "--data", messy, "--out", out2, *TINY, "--batch-size", "1", "--nproc-per-node", "2")
    assert json.loads((out2 / "metrics.jsonl").read_text())["bad_images"] in (2, 3)  # the dropped odd one may be bad


def test_on_bad_image_error_stops_with_the_file_named(messy, tmp_path):
    p = run_here("train", "--data", messy, "--out", tmp_path / "r", *TINY, "--on-bad-image", "error", check=False)
    assert p.returncode == 2
    assert "unreadable image" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_images_of_a_huge_declared_size_are_unreadable_files_not_a_crash(tmp_path, capsys):
    from PIL import Image
    root = write_folder(tmp_path / "data")
    Image.new("L", (20000, 20000)).save(root / "train" / "circle" / "bomb.png")  # 0.4 MB; Pillow's bomb error
    Image.new("L", (8000, 6000)).save(root / "train" / "ring" / "huge.png")  # 48 million pixels: over the limit
    Image.new("RGB", (9000, 5000), (20, 180, 40)).save(root / "train" / "square" / "huge.jpg")  # decoded at 1/2
    code, stdout, _ = cli(capsys, "data", "check", root)
    listed = {line.split(": ")[1].rsplit("/", 1)[1] for line in stdout.splitlines() if line.startswith("unreadable:")}
    assert code == 1 and listed == {"bomb.png", "huge.png"}, stdout
    assert "decompression bomb" in stdout and "ALEXNET_MAX_IMAGE_PIXELS raises the limit" in stdout
    out = tmp_path / "run"
    p = run_here("train", "--data", root, "--out", out, *TINY)  # --on-bad-image skip is the default
    assert json.loads((out / "metrics.jsonl").read_text())["bad_images"] == 2 and "Traceback" not in p.stderr
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out / "checkpoints" / "last.pt",
                            root / "train" / "circle" / "bomb.png")
    assert code == 2 and err.strip().splitlines() == [
        f"WARNING: skipping unreadable image {root / 'train' / 'circle' / 'bomb.png'}: " + err.split(": ", 2)[2]
        .splitlines()[0], f"alexnet predict: error: {root / 'train' / 'circle' / 'bomb.png'} could not be read (see above)"]
    assert "decompression bomb" in err
    code, stdout, _ = cli(capsys, "predict", "--checkpoint", out / "checkpoints" / "last.pt",
                          root / "train" / "square" / "huge.jpg")
    assert code == 0 and "huge.jpg: " in stdout


def test_data_check_in_a_pipe_writes_a_few_progress_lines_not_one_an_image(messy, capsys):
    cli(capsys, "data", "check", messy)  # capsys: not a terminal, as in a pipe
    code, _, err = cli(capsys, "data", "check", messy)
    assert len([line for line in err.splitlines() if line.startswith("checking ")]) == 1  # 39 files: the last line


@pytest.mark.parametrize("pack", ["auto", "no"])
def test_a_sliver_whose_resize_would_be_billions_of_pixels_is_an_unreadable_file(tmp_path, capsys, pack):
    """A 256-byte PNG of 60000x1 passed the 40-million-pixel limit, and its resize to 72 on the shorter side
    (4,320,000x72) took gigabytes."""
    from PIL import Image
    root = write_folder(tmp_path / "data")
    Image.new("RGB", (60000, 1)).save(root / "train" / "circle" / "sliver.png")
    out = tmp_path / "run"
    p = run_here("train", "--data", root, "--out", out, "--cache-dir", tmp_path / "cache", "--pack", pack, *TINY)
    assert json.loads((out / "metrics.jsonl").read_text())["bad_images"] == 1 and "Traceback" not in p.stderr
    assert "60000x1 resized to 72 would be 4320000x72, more than the 40 million pixels" in p.stdout + p.stderr
    code, stdout, err = cli(capsys, "predict", "--checkpoint", out / "checkpoints" / "last.pt", root / "train")
    assert code == 1 and "sliver.png: 60000x1 resized to 72 would be" in err and len(stdout.splitlines()) == 24
