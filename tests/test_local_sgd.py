"""--local-sgd-period H: after --local-sgd-warmup synchronous steps, each process steps on its own
gradients and the weights are averaged every H steps (torch's PeriodicModelAverager); checkpoints hold each
process's weights and optimizer state, so a resume between averagings is exact."""

import pytest
import torch

from alexnet import checkpoint

from conftest import EXACT, final_weights, max_diff, run_cli, shas

pytestmark = pytest.mark.slow

# 24 images, 2 processes of 2 images a step: 6 steps; the first synchronous, then averaging every 2 steps
FLAGS = ["--batch-size", "2", "--nproc-per-node", "2", "--local-sgd-period", "2", "--local-sgd-warmup", "1",
         "--dropout", "0.5"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(exact):
    """A 2-process local SGD run never stopped, a checkpoint at every step."""
    out = exact["root"] / "local-sgd"
    p = run_cli("train", "--data", exact["data"], "--weights", exact["root"] / "w0.pt", "--out", out, *EXACT, *FLAGS,
                "--checkpoint-every", "1", "--keep-last", "20")
    return out, p


def test_the_weights_are_equal_after_each_averaging_and_differ_between(straight):
    out, p = straight
    assert "parallel: local-sgd" in p.stdout and "averaged every 2 steps after 1 synchronous" in p.stdout
    equal = []
    for step in range(1, 6):
        state = checkpoint.load_run(out / "checkpoints" / f"step-{step:09d}.pt")
        ranks = state["ranks"]
        assert len(ranks) == 2 and "model" in ranks[0] and "optimizer" in ranks[1]
        equal.append(same(ranks[0]["model"], ranks[1]["model"]))
        assert same(state["model"], ranks[0]["model"])  # the checkpoint's model: rank 0's
    # step 1 synchronous; steps 2 and 4 local (apart); steps 3 and 5 end with an averaging
    assert equal == [True, False, True, False, True]
    ranks = shas(p.stdout)  # the epoch ends with an averaging too: one model to validate and save
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    # the momentum buffers stay each process's own, even right after an averaging
    state = checkpoint.load_run(out / "checkpoints" / "step-000000003.pt")
    momentum = [r["optimizer"]["state"][0]["momentum_buffer"] for r in state["ranks"]]
    assert not torch.equal(*momentum)


def test_a_resume_between_averagings_is_exact(exact, straight):
    out, _ = straight
    src = out / "checkpoints" / "step-000000004.pt"
    resumed = exact["root"] / "local-sgd-resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / src.name).write_bytes(src.read_bytes())
    run_cli("train", "--data", exact["data"], "--out", resumed, *EXACT, *FLAGS, "--resume", "auto")
    assert max_diff(final_weights(resumed), final_weights(out)) == 0.0
    # the control: resumed with rank 0's weights on both processes, the run ends elsewhere
    state = checkpoint.load_run(src)
    for r in state["ranks"]:
        r["model"] = state["ranks"][0]["model"]
    control = exact["root"] / "local-sgd-control"
    (control / "checkpoints").mkdir(parents=True)
    torch.save(state, control / "checkpoints" / src.name)
    run_cli("train", "--data", exact["data"], "--out", control, *EXACT, *FLAGS, "--resume", "auto")
    assert max_diff(final_weights(control), final_weights(out)) > 1e-6
