"""Precision and the optimizer: autocast choice, fp16 with a gradient scaler saved in checkpoints, fused SGD."""

import copy

import torch

from alexnet import checkpoint
from alexnet.runtime import has_amx, make_sgd, resolve_precision
from conftest import TINY, run_cli


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu, False) == (torch.bfloat16 if has_amx() else None)
    monkeypatch.setattr("alexnet.runtime.has_amx", lambda: True)
    assert resolve_precision("auto", cpu, False) == torch.bfloat16
    assert resolve_precision("auto", cpu, True) is None  # --deterministic: fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda, False) == torch.float16  # e.g. a V100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda, False) == torch.bfloat16
    assert [resolve_precision(n, cpu, True) for n in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16,
                                                                                   torch.float16]


def test_fused_sgd_is_the_same_update_as_the_loop():
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    models = [first, copy.deepcopy(first)]
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fused = make_sgd(models[0].parameters(), "auto", torch.device("cpu"), **kw)
    loop = make_sgd(models[1].parameters(), "for-loop", torch.device("cpu"), **kw)
    assert loop.param_groups[0]["foreach"] is False
    for _ in range(3):
        for model, opt in zip(models, (fused, loop)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(p.grad is not None for p in models[0].parameters())


def test_fp16_keeps_its_gradient_scaler_in_checkpoints_and_resumes_exactly(tiny_data, tmp_path):
    args = [*TINY, "--data", tiny_data, "--deterministic", "--precision", "fp16", "--dropout", "0.5"]
    p = run_cli("train", *args, "--epochs", "2", "--out", tmp_path / "straight")
    assert "fp16 with a gradient scaler" in p.stdout
    after_one = tmp_path / "straight" / "checkpoints" / "step-000000003.pt"
    state = checkpoint.load_run(after_one)
    assert state["scaler"]["scale"] > 1 and state["scaler"]["_growth_tracker"] == 3  # 3 steps, no overflow
    run_cli("train", *args, "--epochs", "2", "--resume", after_one, "--out", tmp_path / "resumed")
    a = checkpoint.load_run(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load_run(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 6
    assert a["optimizer"]["param_groups"][0].get("fused") is True  # --sgd auto: fused on this CPU
