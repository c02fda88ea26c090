"""alexnet bench and --compile."""

import re
import statistics

import pytest

from alexnet.bench import BenchConfig, Pipeline, run

from conftest import cli, max_diff, run_cli, train_run, write_folder


def test_bench_measures_both_pipelines_alternating(tmp_path, monkeypatch, tiny_data):
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path))  # where the packed form is made once
    lines = []
    result = run(BenchConfig(data=str(tiny_data), image_size=64, batch_size=4, steps=1, warmup=1, rounds=2,
                             workers=1), log=lines.append)
    keys = {f"{p}/{w}" for p in ("ours", "reference") for w in ("data", "model", "end-to-end")}
    assert set(result["median"]) == keys == set(result["all"])
    for k in keys:
        assert len(result["all"][k]) == 2 and all(v > 0 for v in result["all"][k])
        assert result["median"][k] == statistics.median(result["all"][k])
    assert result["ratios"]["end-to-end ours / reference"] == (result["median"]["ours/end-to-end"]
                                                              / result["median"]["reference/end-to-end"])
    # the pipelines take turns going first
    order = re.findall(r"round (\d)/2: (\w+)\s+data", "\n".join(lines))
    assert order == [("1", "ours"), ("1", "reference"), ("2", "reference"), ("2", "ours")]
    assert any("reference: fp32, NCHW" in line for line in lines)
    assert any(p.name.startswith("tiny") for p in (tmp_path / "packed").iterdir())


def test_reference_runs_in_its_own_process_and_its_failure_is_an_error(tmp_path):
    """The reference pipeline is measured in a process of its own (spawned, but starting its loader workers
    as a script here would); when it fails there (here on a file that PIL cannot read, which the ImageNet
    example does not skip, read in a loader worker), the bench stops with that error in one line, not a
    traceback or a hang."""
    import multiprocessing
    from alexnet.bench import InOwnProcess
    import torch
    data = write_folder(tmp_path / "data")
    child = InOwnProcess(data, BenchConfig(batch_size=4, image_size=64, workers=1), torch.device("cpu"), 3)
    try:
        assert child.facts["pid"] == child._proc.pid and child._proc.is_alive()
        assert child.facts["start_method"] == multiprocessing.get_start_method()
        assert child.measure("data") > 0
    finally:
        child.close()
    assert not child._proc.is_alive()
    bad = next((data / "train").iterdir()) / "zz-not-an-image.jpg"
    bad.write_bytes(b"not a JPEG")
    files = sum(1 for _ in (data / "train").rglob("*.jpg"))
    p = run_cli("bench", "--data", data, "--pipelines", "reference", "--image-size", "64", "--batch-size", files,
                "--what", "data", "--rounds", "1", "--steps", "1", "--warmup", "0", "--workers", "1",
                timeout=120, check=False)
    assert p.returncode == 1, p.stderr
    assert "error: the reference pipeline failed: PIL.UnidentifiedImageError: cannot identify image file" in p.stderr
    assert "zz-not-an-image.jpg" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_bench_errors(capsys, tiny_data):
    code, _, err = cli(capsys, "bench", "--data", tiny_data, "--image-size", "32")
    assert code == 2 and "below AlexNet's smallest input" in err
    code, _, err = cli(capsys, "bench", "--data", tiny_data, "--what", "speed")
    assert code == 2 and "'speed' is not one of" in err
    code, _, err = cli(capsys, "bench", "--data", tiny_data, "--batch-size", "100")
    assert code == 2 and "has only 24 files" in err
    code, _, err = cli(capsys, "bench", "--data", tiny_data, "--packed", tiny_data, "--batch-size", "8")
    assert code == 2 and "is not a packed dataset" in err


def test_compiled_training_equals_eager(exact, one_process):
    """--compile goes through torch.compile (here with its eager backend, which traces the model with
    TorchDynamo but runs the same kernels), and checkpoints the plain model: same keys, same weights."""
    w, p = train_run(exact, "compiled", "--batch-size", "8", "--compile", env={"ALEXNET_COMPILE_BACKEND": "eager"})
    assert "compiled" in p.stdout
    assert w.keys() == one_process.keys()
    assert max_diff(w, one_process) <= 1e-5 * max_diff(one_process, exact["w0"])


class Counting(Pipeline):
    """A pipeline that counts what measure() asks of it."""

    name = "counting"

    def __init__(self):
        self.passes, self.taken, self.readied, self.steps = 0, 0, 0, 0

    def batches(self):
        self.passes += 1
        for i in range(1000):
            self.taken += 1
            yield i

    def ready(self, batch):
        self.readied += 1
        return batch

    def step(self, batch):
        self.steps += 1


def test_measure_times_what_it_says():
    from alexnet.bench import measure
    import torch
    cfg = BenchConfig(batch_size=8, steps=5, warmup=2)
    cpu = torch.device("cpu")
    model = Counting()
    assert measure(model, "model", cfg, cpu) > 0
    assert (model.passes, model.taken, model.readied, model.steps) == (1, 1, 1, 7)  # one batch, reused
    data = Counting()
    measure(data, "data", cfg, cpu)
    assert (data.taken, data.readied, data.steps) == (7, 7, 0)  # the loader alone
    both = Counting()
    measure(both, "end-to-end", cfg, cpu)
    assert (both.taken, both.readied, both.steps) == (7, 7, 7)


def test_reference_is_the_imagenet_example(tiny_data):
    import torch
    import torchvision
    from torchvision import transforms as T
    from alexnet.bench import Reference
    ref = Reference(tiny_data, BenchConfig(batch_size=4, image_size=64), torch.device("cpu"), 3)
    steps = ref.loader.dataset.transform.transforms
    assert [type(t) for t in steps] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert isinstance(ref.loader.dataset, torchvision.datasets.ImageFolder) and ref.loader.num_workers == 2
    assert type(ref.model) is torchvision.models.AlexNet
    assert ref.optimizer.defaults["momentum"] == 0.9 and not ref.optimizer.defaults.get("fused")
    assert next(ref.model.parameters()).dtype == torch.float32
    images, _ = ref.ready(next(iter(ref.loader)))
    assert images.is_contiguous() and images.dtype == torch.float32  # NCHW fp32


@pytest.mark.parametrize("args,said", [
    (["--threads", "-3"], "--threads: must be 0 or more"),  # a traceback from torch.set_num_threads
    (["--warmup", "-1"], "--warmup: must be 0 or more"),
    (["--what", ""], "--what: give each of data, model, end-to-end at most once, and at least one"),  # an empty table
    (["--pipelines", "ours,ours"], "--pipelines: give each of ours, reference at most once"),
    (["--pipelines", "theirs"], "--pipelines: 'theirs' is not one of ours, reference"),
    (["--profile", "{tmp}/gone/p"], "--profile: the folder {tmp}/gone does not exist"),  # said after every round
    (["--profile", "{tmp}/file"], "--profile: {tmp}/file is a file; give a folder"),
    (["--device", "cpu", "--jpeg-decode", "device"], "--jpeg-decode device decodes on a GPU; this bench runs on cpu"),
])
def test_bench_settings_are_checked_before_any_measurement(args, said, tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, out, err = cli(capsys, "bench", "--data", tiny_data, "--batch-size", "8", "--image-size", "64",
                         "--steps", "1", "--rounds", "1", "--workers", "0", *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and err.startswith(f"alexnet bench: error: {said.format(tmp=tmp_path)}") and out == "", err


def test_bench_packed_without_its_source_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """It made the built-in dataset (seconds) and then said the pack's classes differ from it."""
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "cache"))
    (tmp_path / "p").mkdir()
    code, _, err = cli(capsys, "bench", "--packed", tmp_path / "p")
    assert code == 2 and "--packed goes with --data SRC" in err and not (tmp_path / "cache").exists(), err
