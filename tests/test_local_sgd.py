"""--local-sgd-period H: after --local-sgd-warmup synchronous steps, each process steps on its own
gradients and the weights are averaged every H steps (torch's model averaging); checkpoints hold each
process's weights and optimizer state, so a resume between averagings is exact. Under --parallel hybrid the
same holds for the convolutions (the fully connected slices stay synchronous); on several nodes of several
processes, the gradients are all-reduced within each node every step (hierarchical)."""

import os
import socket
import subprocess
import sys

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


@pytest.fixture(scope="module", params=["ddp", "hybrid"])
def straight(exact, request):
    """A 2-process local SGD run never stopped, a checkpoint at every step: with ddp (the whole model
    averaged) and hybrid (the convolutions averaged)."""
    out = exact["root"] / f"local-sgd-{request.param}"
    p = run_cli("train", "--data", exact["data"], "--weights", exact["root"] / "w0.pt", "--out", out, *EXACT, *FLAGS,
                "--parallel", request.param, "--checkpoint-every", "1", "--keep-last", "20")
    return out, p, request.param


def test_the_weights_are_equal_after_each_averaging_and_differ_between(straight):
    out, p, parallel = straight
    if parallel == "ddp":
        assert "parallel: local-sgd" in p.stdout and "weights averaged every 2 steps after 1 synchronous" in p.stdout
    else:
        assert "parallel: hybrid" in p.stdout
        assert "the convolutions' weights averaged every 2 steps after 1 synchronous" in p.stdout
    equal = []
    for step in range(1, 6):
        state = checkpoint.load_run(out / "checkpoints" / f"step-{step:09d}.pt")
        ranks = state["ranks"]
        assert len(ranks) == 2 and "model" in ranks[0] and "optimizer" in ranks[1]
        if parallel == "hybrid":  # each process's own: the convolutions (the fc slices are gathered whole)
            assert {k.split(".")[0] for k in ranks[0]["model"]} == {"features"}
        equal.append(same(ranks[0]["model"], ranks[1]["model"]))
        # the checkpoint's model: rank 0's
        assert same({k: state["model"][k] for k in ranks[0]["model"]}, ranks[0]["model"])
    # step 1 synchronous; steps 2 and 4 local (apart); steps 3 and 5 end with an averaging
    assert equal == [True, False, True, False, True]
    ranks = shas(p.stdout)  # the epoch ends with an averaging too: one model to validate and save
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    # the momentum buffers stay each process's own, even right after an averaging
    state = checkpoint.load_run(out / "checkpoints" / "step-000000003.pt")
    momentum = [r["optimizer"]["state"][0]["momentum_buffer"] for r in state["ranks"]]
    assert not torch.equal(*momentum)


def test_a_resume_between_averagings_is_exact(exact, straight):
    out, _, parallel = straight
    src = out / "checkpoints" / "step-000000004.pt"
    resumed = exact["root"] / f"local-sgd-resumed-{parallel}"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / src.name).write_bytes(src.read_bytes())
    run_cli("train", "--data", exact["data"], "--out", resumed, *EXACT, *FLAGS, "--parallel", parallel, "--resume", "auto")
    assert max_diff(final_weights(resumed), final_weights(out)) == 0.0
    # the control: resumed with rank 0's weights on both processes, the run ends elsewhere
    state = checkpoint.load_run(src)
    for r in state["ranks"]:
        r["model"] = state["ranks"][0]["model"]
    control = exact["root"] / f"local-sgd-control-{parallel}"
    (control / "checkpoints").mkdir(parents=True)
    torch.save(state, control / "checkpoints" / src.name)
    run_cli("train", "--data", exact["data"], "--out", control, *EXACT, *FLAGS, "--parallel", parallel, "--resume", "auto")
    assert max_diff(final_weights(control), final_weights(out)) > 1e-6


def test_on_two_nodes_of_two_processes_the_gradients_are_all_reduced_within_each_node(exact, tmp_path):
    """Two `alexnet train` launchers of 2 processes each on this machine, joined by a static rendezvous
    (node 0: ranks 0 and 1; node 1: ranks 2 and 3): 4 ranks,
    one image each a step (different images on every rank). After the synchronous first step, the two
    processes of a node stay equal at every step (their gradients all-reduced within the node), the two
    nodes differ between averagings (the control: their images differ) and are equal after each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["train", "--data", exact["data"], "--weights", exact["root"] / "w0.pt", *EXACT, "--batch-size", "1",
             "--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port,
             "--parallel", "ddp",
             "--local-sgd-period", "2", "--local-sgd-warmup", "1", "--checkpoint-every", "1", "--keep-last", "20",
             "--dist-timeout", "120"]
    outs = [tmp_path / "node-a", tmp_path / "node-b"]
    procs = [subprocess.Popen([sys.executable, "-m", "alexnet", *map(str, flags), "--node-rank", str(node),
                               "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) for node, out in enumerate(outs)]
    logs = [proc.communicate(timeout=400)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), logs
    assert any("local SGD, hierarchical: 2 nodes of 2 processes" in log for log in logs), logs
    ckpts = outs[0] / "checkpoints"  # rank 0's node writes them
    pattern = []
    for step in range(1, 7):  # 24 images, 4 a step: 6 steps; averaged after steps 3 and 5 (and the epoch's end)
        ranks = checkpoint.load_run(ckpts / f"step-{step:09d}.pt")["ranks"]
        models = [r["model"] for r in ranks]
        assert len(models) == 4
        assert same(models[0], models[1]) and same(models[2], models[3]), step  # within each node
        pattern.append(same(models[0], models[2]))  # across the nodes
    assert pattern == [True, False, True, False, True, True]


@pytest.mark.parametrize("parallel", ["ddp", "hybrid"])
def test_with_batchnorm_a_resume_between_averagings_is_exact(exact, parallel):
    """--train-bn: each process's BatchNorm statistics are its own between averagings too (DDP broadcasts rank
    0's only before a forward that follows a synchronised one), and a resumed run keeps them so."""
    flags = [*EXACT, *FLAGS, "--parallel", parallel, "--train-bn"]
    out = exact["root"] / f"local-sgd-bn-{parallel}"
    run_cli("train", "--data", exact["data"], "--weights", exact["root"] / "w0.pt", "--out", out, *flags,
            "--checkpoint-every", "1", "--keep-last", "20")
    src = out / "checkpoints" / "step-000000004.pt"  # after a local step: the next forward broadcasts nothing
    resumed = exact["root"] / f"local-sgd-bn-resumed-{parallel}"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / src.name).write_bytes(src.read_bytes())
    run_cli("train", "--data", exact["data"], "--out", resumed, *flags, "--resume", "auto")
    assert max_diff(final_weights(resumed), final_weights(out)) == 0.0


def test_averaging_takes_every_parameter_keeps_layouts_and_follows_the_schedule():
    """Also parameters without a gradient (a step skipped for a non-finite loss leaves none: torch's
    PeriodicModelAverager would then average nothing and fail); channels_last weights stay channels_last,
    each in its own storage."""
    import torch.distributed as dist
    from torch import nn
    from alexnet.parallel import Averaging

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        params = list(conv.parameters())
        assert all(p.grad is None for p in params)
        averaging = Averaging(period=3, warmup=2)
        assert [averaging.averages_after(s) for s in range(9)] == [False] * 4 + [True, False, False, True, False]
        assert not averaging.after(3, params)
        before = [p.detach().clone() for p in params]
        assert averaging.after(4, params)
        assert all(torch.equal(p, b) for p, b in zip(params, before))  # one process: its own mean
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert conv.weight.untyped_storage().data_ptr() != conv.bias.untyped_storage().data_ptr()
    finally:
        dist.destroy_process_group()
