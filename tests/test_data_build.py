"""data.build: the one function that makes the loaders of alexnet train, eval and bench, from plain values."""

import pytest
import torch

from alexnet.data import packed
from alexnet.data.build import build_loaders, describe
from alexnet.errors import DataError

from conftest import TINY, run_cli, write_folder

CPU = torch.device("cpu")
TRAIN = dict(resize="72", crop=64, mean=[0.5] * 3, std=[0.25] * 3)
VAL = dict(resize="72", crop=64, mean=[0.5] * 3, std=[0.25] * 3, tta="none")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("build") / "jpeg")
    return root, packed.pack(root, root.parent / "packed", "72", workers=0, log=lambda *a: None)


@pytest.mark.parametrize("kind", ["jpeg", "packed"])
def test_train_and_val_loaders(folders, kind):
    root = folders[kind == "packed"]
    built = build_loaders(root, CPU, train=TRAIN, val=VAL, batch_size=5, eval_batch=7, workers=0, seed=3)
    assert len(built.classes) == 3
    assert (len(built.train_set), len(built.val_set)) == (24, 12)
    assert len(built.train) == 24 // 5 and len(built.val) == 2  # training drops the tail; validation keeps it
    images, target, bad = next(iter(built.train))
    assert images.shape == (5, 3, 64, 64) and target.shape == (5,) and bad == 0
    batches = list(built.val)
    assert [b[0].shape[0] for b in batches] == [7, 5]
    assert built.train_augment is None and built.val_augment is None  # finished by the workers
    assert describe(built.train_set, CPU) == ("" if kind == "jpeg" else
                                              " (packed; batch augmentation in the loader workers)")


def test_packed_data_held_on_a_cpu_is_cropped_by_the_main_process(folders):
    from alexnet.data import held
    built = build_loaders(folders[1], CPU, train=TRAIN, val=VAL, batch_size=5, eval_batch=7, workers=0,
                          data_on_device="auto")
    try:
        assert built.train_set.held and built.train_augment is not None
        assert "packed; crops read from the memory map by the main process" in describe(built.train_set, CPU)
    finally:
        held.release()


@pytest.mark.parametrize("kind", ["jpeg", "packed"])
def test_validation_alone_for_evaluation(folders, kind):
    root = folders[kind == "packed"]
    classes = build_loaders(root, CPU, train=TRAIN, val=None, batch_size=5, eval_batch=5, workers=0).classes
    built = build_loaders(root, CPU, train=None, val=VAL, batch_size=5, eval_batch=4, workers=0, classes=classes,
                          rank=1, world=2)
    assert built.train is None and built.train_set is None and built.val_set.classes == classes
    assert sum(b[1].numel() for b in built.val) == 6  # rank 1 of 2: its half of the 12, no repeats


def test_a_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_loaders(tmp_path / "nothing", CPU, train=TRAIN, val=VAL, batch_size=5, eval_batch=5, workers=0)


def test_more_workers_than_cores_is_one_warning_of_ours_not_torchs(tiny_data, tmp_path):
    """torch's own warning came once for each loader, from its source line, and named no flag."""
    workers = packed.available_cores() + 1
    proc = run_cli("train", "--data", tiny_data, "--out", tmp_path / "r", *TINY, "--workers", workers,
                   env={"ALEXNET_CACHE": str(tmp_path / "cache")})
    said = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "WARNING: --workers" in line]
    assert len(said) == 1 and said[0].endswith(
        f"WARNING: --workers {workers} is more than the {workers - 1} core{'s' * (workers > 2)} this process may use: "
        f"the loader processes take turns on them with the model's threads, so {workers - 1} or fewer is usually faster")
    assert "worker processes in total" not in proc.stderr
