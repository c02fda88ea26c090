"""train.state: what a checkpoint holds, written and read back through a real file; the model that
evaluation and export read out of it."""

import torch

from alexnet import checkpoint
from alexnet.config import TrainConfig, to_dict
from alexnet.models import add_batchnorm, create_model
from alexnet.progress import Progress
from alexnet.runtime import make_sgd, rng_state
from alexnet.train.schedule import Schedule
from alexnet.train.state import (TrainState, find_resume, from_checkpoint, model_from_checkpoint, saved_config,
                                 to_checkpoint)
from alexnet.train.step import Trainer, train_one_epoch

CPU = torch.device("cpu")
CLASSES = ["a", "b", "c"]
CFG = TrainConfig(arch="alexnet", fc_width=16, dropout=0.0, schedule="plateau", epochs=2)


def make_trainer(seed: int, train_bn: bool = False) -> Trainer:
    torch.manual_seed(seed)
    model = create_model("alexnet", 3, 0.0, 16)
    if train_bn:
        add_batchnorm(model)
    optimizer = make_sgd(model.parameters(), "auto", CPU, lr=0.01, momentum=0.9, weight_decay=5e-4)
    return Trainer(model, optimizer, Schedule(CFG, 4, 0.01), torch.nn.CrossEntropyLoss(), CPU)


def batches(n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 3, (2,), generator=g), 0) for _ in range(n)]


def steps(t: Trainer, n: int, start: int = 0, seed: int = 3) -> None:
    train_one_epoch(t, batches(n, seed), global_step=start, progress=Progress(0, "", enabled=False), input_size=64)


def save(t: Trainer, path, train_bn=False, world=1) -> dict:
    state = TrainState(global_step=2, best_acc1=0.25)
    sums = {"loss_sum": 3.0, "correct": 1, "images": 4, "seconds": 0.5, "skipped": 0, "bad": 0}
    saved = to_checkpoint(t, state, epoch=0, step_in_epoch=2, ranks=[{"rng": rng_state(), "sums": sums}] * world,
                          metrics={"epoch": 0}, classes=CLASSES, config=to_dict(CFG), world=world, train_bn=train_bn)
    checkpoint.save(saved, path)
    return checkpoint.load_run(path)  # through a real file, loaded with weights_only


def test_a_checkpoint_read_back_continues_the_run_to_the_bit(tmp_path):
    a = make_trainer(0)
    steps(a, 2)
    a.schedule.end_epoch(1.0)  # some plateau state to carry
    saved = save(a, tmp_path / "c.pt")
    assert saved["format_version"] == checkpoint.FORMAT_VERSION == 1
    assert set(saved) >= {"model", "optimizer", "schedule", "epoch", "step_in_epoch", "global_step", "best_acc1",
                          "torch_rng", "ranks", "world_size", "device_type", "classes", "config", "metrics", "scaler"}
    b = make_trainer(1)  # other weights, no momentum yet
    said = []
    state = from_checkpoint(b, saved, tmp_path / "c.pt", train_bn=False, rank=0, world=1, say=said.append)
    assert (state.epoch, state.step_in_epoch, state.global_step, state.best_acc1) == (0, 2, 2, 0.25)
    assert state.partial["images"] == 4 and "step 2 of it (global step 2)" in state.resumed and not said
    assert b.schedule.state_dict() == a.schedule.state_dict()
    steps(a, 2, start=2, seed=4)
    steps(b, 2, start=2, seed=4)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    c = make_trainer(1)  # the control: without the checkpoint's momentum the same steps end elsewhere
    c.model.load_state_dict(saved["model"])
    steps(c, 2, start=2, seed=4)
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))


def test_another_world_size_resumes_with_a_warning(tmp_path):
    a = make_trainer(0)
    saved = save(a, tmp_path / "c.pt", world=2)
    said = []
    state = from_checkpoint(make_trainer(1), saved, "c.pt", train_bn=False, rank=0, world=1, say=said.append)
    assert state.partial is None and len(said) == 1 and "saved by 2 process(es) on cpu" in said[0]
    assert "not bit-exact" in said[0]


def test_train_bn_saves_the_plain_model_that_evaluates_as_trained(tmp_path):
    a = make_trainer(0, train_bn=True)
    steps(a, 2)
    saved = save(a, tmp_path / "c.pt", train_bn=True)
    assert not any("conv" in k or "bn" in k for k in saved["model"]) and "model_with_bn" in saved
    plain = model_from_checkpoint(saved)
    assert not plain.training and set(plain.state_dict()) == set(create_model("alexnet", 3, 0.0, 16).state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x), a.model.eval()(x), atol=1e-4)
    b = make_trainer(1, train_bn=True)  # resumes the model with its BatchNorms
    from_checkpoint(b, saved, "c.pt", train_bn=True, rank=0, world=1, say=print)
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_where_a_run_resumes_from(tmp_path):
    said = []
    assert find_resume(None, tmp_path / "checkpoints", 0, said.append) == (None, None)
    assert find_resume("auto", tmp_path / "checkpoints", 0, said.append) == (None, None)
    assert said == [f"no checkpoint in {tmp_path / 'checkpoints'}: starting afresh"]
    saved = save(make_trainer(0), tmp_path / "checkpoints" / "step-000000002.pt")
    source, found = find_resume("auto", tmp_path / "checkpoints", 0, said.append)
    assert source == tmp_path / "checkpoints" / "step-000000002.pt" and found["global_step"] == saved["global_step"]
    assert saved_config("auto", str(tmp_path)) == to_dict(CFG) == saved_config(str(source), None)
    assert saved_config("auto", str(tmp_path / "nothing-here")) == {}
