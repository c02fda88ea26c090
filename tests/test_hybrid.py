"""--parallel hybrid: the convolutions data-parallel, the fully connected layers cut over the processes.
It computes the same update as one process with the global batch (and as DDP); its checkpoints hold the
whole model, so evaluation, export, prediction and resuming under another strategy or world size work."""

import json

import pytest
import torch

from alexnet import checkpoint
from alexnet.models import create_model
from alexnet.parallel import bytes_per_step, choose
from alexnet.parallel.hybrid import split

from conftest import EXACT, final_weights, max_diff, run_cli, run_here, shas, tolerance, train_run

pytestmark = pytest.mark.slow


def test_slices_are_as_equal_as_can_be():
    assert split(4096, 3) == [1366, 1365, 1365] and split(32, 3) == [11, 11, 10] and split(10, 4) == [3, 3, 2, 2]


def test_auto_chooses_by_the_bytes_each_sends():
    model = create_model("alexnet", 1000)
    # at batch 32 on two processes hybrid sends about an eighth of what ddp sends
    ddp, hybrid = (bytes_per_step(n, 2, 32, model) for n in ("ddp", "hybrid"))
    assert 240e6 < ddp < 250e6 and hybrid < ddp / 8
    assert choose("auto", 2, 32, model)[0] == "hybrid" and choose("auto", 1, 32, model)[0] == "ddp"
    # the crossover: fc parameters / (9216 + 4096 + 1000) images in the global batch, about 4,100
    assert choose("auto", 8, 480, model)[0] == "hybrid" and choose("auto", 8, 560, model)[0] == "ddp"
    assert choose("ddp", 2, 32, model)[0] == "ddp"
    # local SGD every 8 steps: ddp averages all 61.1M fp32 weights once in 8 steps (30.6 MB a step); hybrid
    # the convolutions' 2.5M (1.2 MB a step) and sends the activations every step
    local = bytes_per_step("local-sgd", 2, 32, model, local_sgd_period=8)
    assert local == pytest.approx(sum(p.numel() for p in model.parameters()) * 4 / 8)
    conv = sum(p.numel() for p in model.features.parameters())
    activations = bytes_per_step("hybrid", 2, 32, model) - conv * 4
    assert bytes_per_step("hybrid", 2, 32, model, local_sgd_period=8) == pytest.approx(conv * 4 / 8 + activations)
    assert choose("auto", 2, 32, model, local_sgd_period=8)[0] == "hybrid"
    assert choose("auto", 8, 1024, model, local_sgd_period=8)[0] == "ddp"


@pytest.fixture(scope="module")
def one_process_12(exact):
    return train_run(exact, "one12", "--batch-size", "12")[0]


@pytest.fixture(scope="module")
def hybrid2(exact):
    return train_run(exact, "hybrid2", "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "hybrid",
                     "--checkpoint-every", "1", "--keep-last", "10")


def test_two_and_three_processes_equal_one_with_the_global_batch(exact, one_process, one_process_12, hybrid2):
    w2, p = hybrid2
    assert "--parallel hybrid" in p.stdout and "batch: 4 per process x 2 processes" in p.stdout
    assert max_diff(one_process, exact["w0"]) > 1e-3
    assert max_diff(w2, one_process) <= tolerance(exact, one_process)
    ranks = shas(p.stdout)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]  # the whole model, gathered, on both
    # three processes: the widths (32) cut 11, 11, 10; 24 images in steps of 3 x 4
    w3, p = train_run(exact, "hybrid3", "--batch-size", "4", "--nproc-per-node", "3", "--parallel", "hybrid")
    assert max_diff(w3, one_process_12) <= tolerance(exact, one_process_12)
    assert len(set(shas(p.stdout).values())) == 1


def test_without_the_exchange_of_fc6_inputs_the_run_differs(exact, one_process):
    w, _ = train_run(exact, "hybrid-unexchanged", "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "hybrid",
                     env={"ALEXNET_HYBRID_UNEXCHANGED": "1"})
    assert max_diff(w, one_process) > 100 * tolerance(exact, one_process)


def test_without_the_convolutions_gradients_reduced_the_ranks_differ(exact):
    _, p = train_run(exact, "hybrid-unsynced", "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "hybrid",
                     env={"ALEXNET_UNSYNCED_GRADIENTS": "1"})
    ranks = shas(p.stdout)
    assert set(ranks) == {0, 1} and ranks[0] != ranks[1]


def test_clipping_accumulation_and_the_bf16_wire(exact, one_process):
    w1, _ = train_run(exact, "hclip1", "--batch-size", "8", "--clip-grad-norm", "0.05")
    w2, _ = train_run(exact, "hclip2", "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "hybrid",
                      "--clip-grad-norm", "0.05")
    assert max_diff(w1, one_process) > 100 * tolerance(exact, one_process)  # the clipping was active
    assert max_diff(w2, w1) <= tolerance(exact, w1)
    w, p = train_run(exact, "haccum", "--global-batch-size", "8", "--accum-steps", "2", "--nproc-per-node", "2",
                     "--parallel", "hybrid")
    assert max_diff(w, one_process) <= tolerance(exact, one_process)
    w, _ = train_run(exact, "hbf16", "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "hybrid",
                     "--comm-hook", "bf16")
    assert tolerance(exact, one_process) < max_diff(w, one_process) <= 100 * tolerance(exact, one_process)


def test_dropout_repeats_and_resumes_exactly(exact, tmp_path):
    flags = ["--batch-size", "4", "--nproc-per-node", "2", "--parallel", "hybrid", "--dropout", "0.5", "--epochs", "2"]
    a, pa = train_run(exact, "hdrop-a", *flags, "--checkpoint-every", "1", "--keep-last", "20")
    b, _ = train_run(exact, "hdrop-b", *flags)
    assert max_diff(a, b) == 0.0
    nodrop, _ = train_run(exact, "hdrop-0", *flags[:-4], "--epochs", "2")
    assert max_diff(a, nodrop) > 1e-6
    # resumed inside the second epoch (global step 4 of 6) from a copy of its checkpoint
    out = exact["root"] / "hdrop-resumed"
    (out / "checkpoints").mkdir(parents=True)
    src = exact["root"] / "hdrop-a" / "checkpoints" / "step-000000004.pt"
    state = checkpoint.load_run(src)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1) and state["world_size"] == 2
    (out / "checkpoints" / src.name).write_bytes(src.read_bytes())
    run_cli("train", "--data", exact["data"], "--out", out, *EXACT, *flags, "--resume", "auto")
    assert max_diff(final_weights(out), a) == 0.0


def test_a_hybrid_checkpoint_evaluates_exports_predicts_and_resumes_elsewhere(exact, hybrid2, tmp_path):
    out = exact["root"] / "hybrid2"
    last = out / "checkpoints" / "last.pt"
    state = checkpoint.load_run(last)
    assert set(state["model"]) == set(exact["w0"])  # the whole model, torchvision's keys
    # evaluated in one process: the counts the run's own (two-process, hybrid) validation gave
    p = run_here("eval", "--checkpoint", last, "--data", exact["data"], "--workers", "0", "--json")
    metrics = json.loads(p.stdout.strip().splitlines()[-1])
    val = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["acc1"] == val["val_acc1"] and metrics["loss"] == pytest.approx(val["val_loss"], rel=1e-6)
    from alexnet.export import onnx_export_available
    if onnx_export_available():  # torch >= 2.5; checked against PyTorch with onnxruntime by the command itself
        p = run_here("export", "--checkpoint", last, "--format", "onnx", "--out", tmp_path / "m.onnx")
        assert "checked with onnxruntime" in p.stdout
    image = next((exact["data"] / "val").rglob("*.jpg"))
    p = run_here("predict", image, "--checkpoint", last, "--json")
    answer = json.loads(p.stdout.strip().splitlines()[-1])
    assert answer["image"] == str(image) and len(answer["top"]) == 3
    # resumed inside the epoch (after step 1 of 3) under 1-process ddp and 3-process hybrid: each within
    # the tolerance of a ddp run resumed from the same checkpoint with the same global batch
    src = out / "checkpoints" / "step-000000001.pt"

    def resume(name, *flags):
        dest = exact["root"] / name
        (dest / "checkpoints").mkdir(parents=True)
        (dest / "checkpoints" / src.name).write_bytes(src.read_bytes())
        run = run_cli if "--nproc-per-node" in flags else run_here
        p = run("train", "--data", exact["data"], "--out", dest, *EXACT, *flags, "--resume", "auto")
        return final_weights(dest), p

    ddp8, p = resume("r-ddp8", "--batch-size", "8")
    assert "not bit-exact" in p.stdout
    ddp8_2, _ = resume("r-ddp8-2", "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "ddp")
    assert max_diff(ddp8, ddp8_2) <= tolerance(exact, ddp8)
    ddp12, _ = resume("r-ddp12", "--batch-size", "12")
    hybrid12, _ = resume("r-hybrid12", "--batch-size", "4", "--nproc-per-node", "3", "--parallel", "hybrid")
    assert max_diff(hybrid12, ddp12) <= tolerance(exact, ddp12)
    assert max_diff(hybrid12, ddp8) > 100 * tolerance(exact, ddp8)  # another global batch: another run


def test_refused_with_what_it_cannot_do(capsys, exact):
    from conftest import cli
    for flags, words in ((["--compile"], "cannot be compiled"), (["--comm-hook", "powersgd"], "PowerSGD cannot")):
        code, _, err = cli(capsys, "train", "--data", exact["data"], "--parallel", "hybrid", *flags)
        assert code == 2 and err.count("\n") == 1 and words in err and "hybrid" in err, err


def test_fp16_with_its_scaler_trains_alike_on_every_rank(exact):
    """fp16 and its gradient scaler run under hybrid and end with the same whole model on both ranks. (The
    scaler is torch's ShardedGradScaler, which agrees on skipping a step that overflowed on any rank, as
    each holds other gradients; no overflow is provoked here.)"""
    flags = [f for f in EXACT if f != "--deterministic"]
    p = run_cli("train", "--data", exact["data"], "--weights", exact["root"] / "w0.pt", "--out",
                exact["root"] / "hfp16", *flags, "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "hybrid",
                "--precision", "fp16")
    assert "fp16 with a gradient scaler" in p.stdout
    ranks = shas(p.stdout)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    assert max_diff(final_weights(exact["root"] / "hfp16"), exact["w0"]) > 0  # it trained
