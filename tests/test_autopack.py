"""An image folder given to `alexnet train` is packed once on first use and trained from the pack (data.autopack)."""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from alexnet.data import autopack, packed

from conftest import EXACT, TINY, cli, final_weights, max_diff, run_cli, run_here, write_folder

QUIET = dict(workers=0, log=lambda *_: None)


def config_of(out) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


def packs_in(cache) -> list:
    return sorted(p.name for p in (cache / "packed").iterdir() if packed.is_packed(p)) if (cache / "packed").exists() else []


def test_a_folder_is_packed_once_and_trains_as_its_files_do(tmp_path):
    src = write_folder(tmp_path / "src")
    cache = tmp_path / "cache"
    a = run_here("train", "--data", src, *EXACT, "--cache-dir", cache, "--out", tmp_path / "a")
    assert f"packing {src.resolve()} once, for this and later runs, into {cache / 'packed'}" in a.stdout
    assert "(raw pixels, about 0.5 MiB of the" in a.stdout and "training from the pack of" in a.stdout
    assert config_of(tmp_path / "a")["pack"] == "raw" and len(packs_in(cache)) == 1
    b = run_here("train", "--data", src, *EXACT, "--cache-dir", cache, "--out", tmp_path / "b")
    assert "packing" not in b.stdout and "training from the pack of" in b.stdout  # found again, not packed again
    files = run_here("train", "--data", src, *EXACT, "--cache-dir", cache, "--out", tmp_path / "files", "--pack", "no")
    assert "training from the pack" not in files.stdout and config_of(tmp_path / "files")["pack"] == "no"
    # the pack's batch path against the files' per-image transforms: the same pixels and draws, float
    # arithmetic in another order (as tests/test_packed.py's equivalence)
    a_w, files_w = final_weights(tmp_path / "a"), final_weights(tmp_path / "files")
    assert max_diff(a_w, files_w) <= 1e-6 and max_diff(a_w, final_weights(tmp_path / "b")) == 0.0
    (src / "train" / "circle" / "new.jpg").write_bytes((src / "train" / "circle" / "00000.jpg").read_bytes())
    c = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", tmp_path / "c")
    assert "packing" in c.stdout and len(packs_in(cache)) == 2  # another file list: another pack


def test_jpeg_choice_is_kept_on_resume_and_unreadable_files_are_still_counted(tmp_path):
    src = write_folder(tmp_path / "src")
    (src / "train" / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cache, out = tmp_path / "cache", tmp_path / "run"
    p = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", out, "--pack", "jpeg")
    assert "(JPEG, about" in p.stdout and "1 unreadable file(s) left out" in p.stdout
    assert config_of(out)["pack"] == "jpeg"
    assert "1 training and 0 validation images were unreadable" in (out / "train.log").read_text()
    # a raw pack of the folder now in the cache too: auto would take it, the resumed run keeps its JPEG one
    packed.pack(src, autopack._where(autopack_cfg(src, cache, "raw"), "raw")[0], "72", workers=0, log=lambda *_: None)
    p = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", out, "--resume", "auto", "--epochs", "2")
    assert config_of(out)["pack"] == "jpeg" and "training from the pack" in p.stdout and "(JPEG" in p.stdout
    assert "packing" not in p.stdout
    fresh = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", tmp_path / "fresh")
    assert "(raw pixels" in fresh.stdout and config_of(tmp_path / "fresh")["pack"] == "raw"  # the control
    files = tmp_path / "files"  # and a run from the files goes on from the files
    run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", files, "--pack", "no")
    p = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", files, "--resume", "auto", "--epochs", "2")
    assert "pack" not in p.stdout.replace(str(src), "") and config_of(files)["pack"] == "no"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_images"] for r in rows] == [1, 1]
    meta = packed.read_meta(autopack.location(autopack_cfg(src, cache, "jpeg")))
    assert meta["encoding"] == "jpeg"


def autopack_cfg(src, cache, pack):
    from alexnet.config import TrainConfig
    return TrainConfig(data=str(src), resize="72", crop=64, cache_dir=str(cache), pack=pack)


@pytest.mark.parametrize("free, chosen", [(10**12, "raw"), (400_000, "jpeg"), (1_000, "no")])
def test_the_encoding_is_chosen_by_the_free_disk(tmp_path, monkeypatch, free, chosen):
    """48 images of 72x72: 746 kB raw and about 100 kB as JPEG; half the free disk decides."""
    src = write_folder(tmp_path / "src", train_per_class=8, val_per_class=0, classes=3)
    shutil.copytree(src / "train", src / "val", dirs_exist_ok=True)
    real = shutil.disk_usage
    monkeypatch.setattr(autopack.shutil, "disk_usage", lambda p: real(p)._replace(free=free))
    said = []
    cfg = autopack.prepare(autopack_cfg(src, tmp_path / "cache", "auto"), said.append)
    assert cfg.pack == chosen, said
    if chosen == "no":
        assert "not packing" in said[0] and "decoding its files every epoch" in said[0] and not packs_in(tmp_path / "cache")
    else:
        assert packed.read_meta(autopack.location(cfg))["encoding"] == chosen
    with pytest.raises(Exception, match="--pack raw: .* would take about") if chosen != "raw" else _nothing():
        autopack.prepare(autopack_cfg(src, tmp_path / "cache2", "raw"), said.append)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_random_resized_crops_and_held_out_files_are_not_packed(tmp_path):
    src = write_folder(tmp_path / "src")
    for flags in (["--random-resized-crop"], ["--val-fraction", "0.25"]):
        out = tmp_path / flags[0].strip("-")
        p = run_here("train", "--data", src, *TINY, *flags, "--cache-dir", tmp_path / "cache", "--out", out)
        assert f"reading the files of {src} every epoch, not packing them: {flags[0]}" in p.stdout
        assert config_of(out)["pack"] == "no"
    assert not packs_in(tmp_path / "cache")


def test_two_processes_pack_once_before_they_join(tmp_path):
    src = write_folder(tmp_path / "src")
    out = tmp_path / "run"
    p = run_cli("train", "--data", src, *TINY, "--cache-dir", tmp_path / "cache", "--out", out,
                "--nproc-per-node", "2", "--batch-size", "4")
    assert p.stdout.count("once, for this and later runs") == 1 and config_of(out)["pack"] == "raw", p.stdout
    log = (out / "train.log").read_text()
    assert "training from the pack of" in log and "(packed;" in log


def test_runs_started_together_on_one_folder_make_one_pack(tmp_path):
    """While another process holds the folder's lock and packs (here this test, with the code a run uses), a
    run on the same folder and cache waits, says so, then trains from that pack rather than making its own."""
    src, cache, out = write_folder(tmp_path / "src"), tmp_path / "cache", tmp_path / "run"
    cfg = autopack_cfg(src, cache, "auto")
    cmd = [sys.executable, "-m", "alexnet", "train", "--data", src, *TINY, "--cache-dir", cache, "--out", out]
    with autopack._one_at_a_time(cfg, lambda *_: None):
        p = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seen = []
        while not seen or "waiting for it to finish" not in seen[-1]:
            seen.append(p.stdout.readline())
            assert seen[-1], "".join(seen)  # the run ended (or packed) without waiting
        assert f"another process is packing {src} into {cache / 'packed'}" in seen[-1]
        time.sleep(1)
        assert p.poll() is None and not packs_in(cache)
        made = autopack._found_or_made(cfg, lambda *_: None)  # the other process's packing
    rest, _ = p.communicate(timeout=240)
    assert p.returncode == 0, "".join(seen) + rest
    assert "once, for this and later runs" not in rest and "training from the pack of" in rest, rest
    assert packs_in(cache) == [autopack.location(made).name] and config_of(out)["pack"] == made.pack == "raw"


def test_the_size_estimate_is_of_the_resized_images_and_memory_counts_for_raw(tmp_path, monkeypatch):
    src = write_folder(tmp_path / "src", classes=3, train_per_class=10, val_per_class=2, size=200)
    cfg = autopack_cfg(src, tmp_path / "cache", "auto")
    files = autopack._where(cfg, "raw")[1]
    raw, jpeg = autopack.estimate(src.resolve(), files, "72")
    real_raw = packed.read_meta(packed.pack(src, tmp_path / "raw", "72", **QUIET))
    real_jpeg = packed.read_meta(packed.pack(src, tmp_path / "jpeg", "72", encoding="jpeg", **QUIET))
    size = lambda meta: sum(s["bytes"] for s in meta["splits"].values())
    assert abs(raw / size(real_raw) - 1) < 0.02  # every source is 200x200: the headers say it all
    assert abs(jpeg / size(real_jpeg) - 1) < 0.3, (jpeg, size(real_jpeg))  # from a sample of 12
    monkeypatch.setattr(autopack, "_memory", lambda: int(1.9 * raw))  # raw would take over half the memory
    assert autopack.prepare(cfg, lambda *_: None).pack == "jpeg"


def test_a_damaged_pack_in_the_cache_is_made_again(tmp_path):
    src = write_folder(tmp_path / "src")
    cache = tmp_path / "cache"
    run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", tmp_path / "a")
    pixels = cache / "packed" / packs_in(cache)[0] / "train.u8"
    pixels.write_bytes(pixels.read_bytes()[:1000])  # cut short
    p = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", tmp_path / "b")
    assert "the pack in the cache folder is damaged" in p.stdout and "holds 1,000 bytes" in p.stdout
    assert "packing" in p.stdout and config_of(tmp_path / "b")["pack"] == "raw"
    packed.check_sizes(cache / "packed" / packs_in(cache)[0])


def test_a_cache_folder_that_cannot_be_written_leaves_the_run_to_its_files(tmp_path, capsys):
    """--pack auto warns and trains from the files; --pack raw or jpeg stops with one line; the built-in
    dataset, which has to be written there, stops with one line too."""
    src = write_folder(tmp_path / "src")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    out = tmp_path / "run"
    p = run_here("train", "--data", src, *TINY, "--cache-dir", blocked / "cache", "--out", out)
    assert f"WARNING: cannot pack {src} into {blocked / 'cache' / 'packed'}: {blocked} is a file, not a folder; " \
           "decoding its files every epoch instead" in p.stdout
    assert config_of(out)["pack"] == "no" and (out / "checkpoints" / "last.pt").exists()
    code, _, err = cli(capsys, "train", "--data", src, *TINY, "--cache-dir", blocked, "--pack", "jpeg")
    assert code == 2 and f"--pack jpeg: cannot pack {src} into {blocked / 'packed'}: {blocked} is a file" in err
    code, _, err = cli(capsys, "train", *TINY, "--cache-dir", blocked)
    assert code == 2 and f"cannot write the built-in dataset into the cache folder {blocked}: {blocked} is a file" in err
    assert err.count("\n") == 1 and blocked.read_text() == "not a folder"


def test_a_disk_that_fills_while_packing_leaves_the_run_to_its_files_and_frees_the_space(tmp_path, small_disk,
                                                                                          monkeypatch):
    """Another process takes the free space after the pack's size was weighed (here: the estimate says the
    pack is small): the pack cut short is removed and the run trains from the files."""
    src = write_folder(tmp_path / "src")  # 48 images of 72x72: 746 kB of raw pixels
    cache = small_disk(300_000)
    monkeypatch.setattr(autopack, "estimate", lambda *_: (1000.0, 100.0))
    out = tmp_path / "run"
    p = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", out)
    assert f"WARNING: cannot pack {src} into {cache / 'packed'}: No space left on device" in p.stdout
    assert config_of(out)["pack"] == "no" and (out / "checkpoints" / "last.pt").exists()
    assert [p.name for p in (cache / "packed").iterdir() if not p.name.endswith(".lock")] == []
    assert shutil.disk_usage(cache).used < 50_000


def test_a_read_only_cache_that_holds_the_pack_is_used_and_the_datas_own_errors_are_not_the_caches(tmp_path,
                                                                                                   monkeypatch):
    src = write_folder(tmp_path / "src")
    cache = tmp_path / "cache"
    run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", tmp_path / "a")

    @contextlib.contextmanager
    def read_only(cfg, log):  # the lock file beside the packs cannot be made
        raise OSError(errno.EROFS, "Read-only file system", str(autopack._where(cfg, "raw")[0].parent / ".lock"))
        yield
    monkeypatch.setattr(autopack, "_one_at_a_time", read_only)
    p = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", tmp_path / "b")
    assert "training from the pack of" in p.stdout and "WARNING" not in p.stdout
    assert config_of(tmp_path / "b")["pack"] == "raw"
    p = run_here("train", "--data", src, *TINY, "--cache-dir", tmp_path / "empty", "--out", tmp_path / "c")
    assert "WARNING: cannot pack" in p.stdout and "Read-only file system" in p.stdout
    monkeypatch.undo()

    def unreadable_source(source, *args, **kwargs):  # an error of the data, not of the cache: said as it is
        raise PermissionError(errno.EACCES, "Permission denied", str(source / "train" / "ring"))
    monkeypatch.setattr(packed, "pack", unreadable_source)
    p = run_here("train", "--data", src, *TINY, "--cache-dir", tmp_path / "other", "--out", tmp_path / "d",
                 check=False)
    assert p.returncode == 1 and "cannot pack" not in p.stdout + p.stderr
    assert f"alexnet train: error: Permission denied ({src / 'train' / 'ring'})" in p.stderr


def test_workers_read_the_files_when_the_launcher_could_not_pack(tmp_path):
    src = write_folder(tmp_path / "src")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    out = tmp_path / "run"
    p = run_cli("train", "--data", src, *TINY, "--cache-dir", blocked, "--out", out, "--nproc-per-node", "2",
                "--batch-size", "4")
    assert (p.stdout + p.stderr).count("cannot pack") == 1, p.stdout + p.stderr  # the launcher's, not again
    assert config_of(out)["pack"] == "no" and "(packed;" not in (out / "train.log").read_text()


def test_a_file_added_to_a_class_folder_linked_from_elsewhere_makes_another_pack(tmp_path):
    """The pack's key lists the files training reads, those of class folders that are links included: a
    change there is not trained over with the old pack."""
    src = write_folder(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere" / "ring"
    elsewhere.parent.mkdir()
    (src / "train" / "ring").rename(elsewhere)
    (src / "train" / "ring").symlink_to(elsewhere)
    cache = tmp_path / "cache"
    a = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", tmp_path / "a")
    assert "packed 24 train and 12 val images" in a.stdout
    (elsewhere / "new.jpg").write_bytes(sorted(elsewhere.iterdir())[0].read_bytes())
    b = run_here("train", "--data", src, *TINY, "--cache-dir", cache, "--out", tmp_path / "b")
    assert "packed 25 train and 12 val images" in b.stdout and len(packs_in(cache)) == 2
