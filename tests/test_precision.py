"""Precision and the optimizer: autocast choice, fp16 with a gradient scaler saved in checkpoints, fused SGD."""

import copy

import pytest
import torch

from alexnet import checkpoint
from alexnet.runtime import cpu_has_bf16, make_sgd, resolve_precision
from conftest import TINY, run_here, write_folder


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu, False) == (torch.bfloat16 if cpu_has_bf16() else None)
    monkeypatch.setattr("alexnet.runtime.cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", cpu, False) == torch.bfloat16
    assert resolve_precision("auto", cpu, True) is None  # --deterministic: fp32
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or (7, 0))
    assert resolve_precision("auto", cuda, False) == torch.float16  # a V100: bf16 only emulated
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or (9, 0))
    assert resolve_precision("auto", cuda, False) == torch.bfloat16  # an H100
    assert asked == [cuda, cuda]  # the capability of the device in use
    assert [resolve_precision(n, cpu, True) for n in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16,
                                                                                   torch.float16]


def test_bf16_hardware_is_amx_or_avx512_bf16(monkeypatch):
    def probes(amx, avx512_bf16):
        for name, value in (("_is_amx_tile_supported", amx), ("_is_avx512_bf16_supported", avx512_bf16)):
            if value is None:
                monkeypatch.delattr(torch.cpu, name, raising=False)
            else:
                monkeypatch.setattr(torch.cpu, name, value, raising=False)

    def fails():
        raise RuntimeError("no cpuinfo")

    for amx, avx, expected in ((lambda: True, lambda: False, True), (lambda: False, lambda: True, True),
                               (lambda: False, lambda: False, False), (None, None, False),
                               (fails, lambda: True, True), (fails, fails, False)):
        probes(amx, avx)
        assert cpu_has_bf16() is expected
        assert resolve_precision("auto", torch.device("cpu"), False) == (torch.bfloat16 if expected else None)


def test_fused_sgd_is_the_same_update_as_the_loop():
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    models = [first, copy.deepcopy(first)]
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fused = make_sgd(models[0].parameters(), "auto", torch.device("cpu"), **kw)
    loop = make_sgd(models[1].parameters(), "for-loop", torch.device("cpu"), **kw)
    assert loop.param_groups[0]["foreach"] is False and fused.param_groups[0]["fused"] is True
    for _ in range(3):
        for model, opt in zip(models, (fused, loop)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(p.grad is not None for p in models[0].parameters())


def test_without_bias_decay_only_the_weights_of_convolutions_and_linear_layers_decay():
    from alexnet.models import add_batchnorm, create_model
    from alexnet.train import param_groups
    for bias_decay in (True, False):
        torch.manual_seed(0)
        model = add_batchnorm(create_model("alexnet", 10, fc_width=32))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = make_sgd(param_groups(model, bias_decay), "auto", torch.device("cpu"), lr=1.0, momentum=0.0,
                       weight_decay=0.1)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # the step is then the weight decay alone
        opt.step()
        for name, p in model.named_parameters():
            decayed = bias_decay or p.ndim > 1
            assert torch.allclose(p, before[name] * (0.9 if decayed else 1.0)), name
        one_dim = [n for n, p in model.named_parameters() if p.ndim == 1]
        assert sum(".bn." in n for n in one_dim) == 10  # the scales and shifts of the five BatchNorms
        assert len(one_dim) == 10 + 8  # and the biases of five convolutions and three linear layers
        assert sum(len(g["params"]) for g in opt.param_groups) == len(before)


def test_a_run_without_bias_decay_saves_its_two_groups_and_refuses_a_resume_with_it(tiny_data, tmp_path):
    args = [*TINY, "--data", tiny_data, "--train-bn"]
    run_here("train", *args, "--no-bias-decay", "--out", tmp_path / "nbd")
    state = checkpoint.load_run(tmp_path / "nbd" / "checkpoints" / "last.pt")
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [5e-4, 0.0]
    assert state["config"]["bias_decay"] is False
    p = run_here("train", *args, "--epochs", "2", "--bias-decay", "--resume", tmp_path / "nbd" / "checkpoints" /
                 "last.pt", "--out", tmp_path / "other", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--bias-decay changed?" in p.stderr


def test_fp16_keeps_its_gradient_scaler_in_checkpoints_and_resumes_exactly(tmp_path):
    # fp16 steps are slow on CPUs (torch's fp16 convolution backward), so: 6 images in batches of 2, one
    # epoch of 3 steps, resumed inside it from the checkpoint after its first step
    data = write_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    args = [*TINY, "--data", data, "--batch-size", "2", "--deterministic", "--precision", "fp16",
            "--dropout", "0.5", "--checkpoint-every", "1"]
    p = run_here("train", *args, "--out", tmp_path / "straight")
    assert "fp16 with a gradient scaler" in p.stdout
    assert "WARNING: fp16 on a CPU" in p.stdout and "--precision bf16" in p.stdout
    after_one = tmp_path / "straight" / "checkpoints" / "step-000000001.pt"
    state = checkpoint.load_run(after_one)
    assert state["scaler"]["scale"] > 1 and state["scaler"]["_growth_tracker"] == 1  # 1 step, no overflow
    run_here("train", *args, "--resume", after_one, "--out", tmp_path / "resumed")
    a = checkpoint.load_run(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load_run(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 3
    assert a["optimizer"]["param_groups"][0].get("fused") is True  # --sgd auto: fused on this CPU


def test_steps_the_scaler_skips_are_counted_and_end_the_run_when_they_persist():
    from alexnet.train import NonFiniteLoss, Schedule, Trainer, train_one_epoch
    from alexnet.config import TrainConfig
    from alexnet.progress import Progress
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    model.weight.register_hook(lambda g: g * float("nan"))  # a finite loss, gradients that are not
    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,)), 0) for _ in range(6)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = model.weight.detach().clone()
    trainer = Trainer(model, optimizer, Schedule(TrainConfig(), 6, 0.1), torch.nn.CrossEntropyLoss(),
                      torch.device("cpu"), amp_dtype=torch.float16, scaler=scaler, max_nonfinite=3)
    kw = dict(global_step=0, progress=Progress(6, "t", enabled=False))
    sums = train_one_epoch(trainer, batches[:2], **kw)
    assert sums["skipped"] == 2 and sums["images"] == 0 and torch.equal(model.weight, before)
    assert scaler.get_scale() == 65536.0 / 4  # halved at each skipped step
    with pytest.raises(NonFiniteLoss, match="not finite for 3 steps in a row"):
        train_one_epoch(trainer, batches, **kw)


def test_a_run_from_before_precision_existed_resumes_in_fp32():
    from alexnet.config import resolve_train
    old = {"data": ".", "arch": "alexnet"}  # a saved config without "precision"
    assert resolve_train({"resume": __file__}, lambda r, o: dict(old))[0].precision == "fp32"
    assert resolve_train({"resume": __file__}, lambda r, o: {**old, "precision": "bf16"})[0].precision == "bf16"
    assert resolve_train({"resume": __file__, "precision": "bf16"}, lambda r, o: dict(old))[0].precision == "bf16"


def test_only_fp16_on_a_cpu_is_warned_of():
    from alexnet.runtime import precision_warning
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "fp16 on a CPU" in precision_warning(torch.float16, cpu)
    assert precision_warning(torch.bfloat16, cpu) is None and precision_warning(None, cpu) is None
    assert precision_warning(torch.float16, cuda) is None
