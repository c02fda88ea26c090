"""Distributed training: sharding, exact evaluation, equivalence with one process, the launcher, torchrun,
dead peers. Real gloo processes on loopback; the two-host test is in test_netns.py."""

import inspect
import json
import os
import re
import socket
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch

from alexnet import checkpoint, distributed, launch
from alexnet.config import ConfigError
from alexnet.data import EpochSampler
from alexnet.models import add_batchnorm, create_model
from conftest import EXACT, cli, final_weights, max_diff, run_cli, run_here, shas, tolerance, train_run, write_folder

# --------------------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("size,world", [(24, 2), (25, 2), (101, 3), (7, 4)])
def test_training_shards_are_disjoint_equal_and_match_the_global_batch(size, world):
    full = EpochSampler(size, seed=3).indices()
    shards = [EpochSampler(size, seed=3, rank=r, world=world).indices() for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal length: every rank runs the same number of steps
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == size - size % world
    # Step s of B images on each rank covers exactly the images of step s of one process with W*B.
    b = 2
    for s in range(len(shards[0]) // b):
        together = sorted(i for shard in shards for i in shard[s * b:(s + 1) * b])
        assert together == sorted(full[s * b * world:(s + 1) * b * world])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_shards_count_every_sample_once(world):
    shards = [EpochSampler(101, seed=0, shuffle=False, rank=r, world=world) for r in range(world)]
    flat = [i for s in shards for _, i in s]
    assert sorted(flat) == list(range(101))
    assert sum(len(s) for s in shards) == 101


# -------------------------------------------------------------------------------------- network choice

def test_route_to_loopback_is_lo_and_this_host():
    net = distributed.route("127.0.0.1")
    assert net["interface"] == "lo" and net["address"].startswith("127.") and net["is_host"]
    assert distributed.interface_addresses()["lo"] == "127.0.0.1"


def test_an_unknown_host_is_a_clear_error():
    with pytest.raises(distributed.DistributedError, match="no-such-host.invalid"):
        distributed.route("no-such-host.invalid")


def _launch_args(**kw) -> Namespace:
    return Namespace(**{"launch_" + k: kw.get(k) for k in launch.FLAGS})


def test_launch_flags_are_stripped_for_the_workers():
    argv = ["--data", "D", "--nproc-per-node", "2", "--nnodes=2", "--rdzv-endpoint", "h:1", "--epochs", "3"]
    assert launch.strip(argv) == ["--data", "D", "--epochs", "3"]


def test_launcher_builds_a_c10d_rendezvous_hosted_here(monkeypatch):
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "ALEXNET_NETWORK_SET", "RANK", "WORLD_SIZE",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        monkeypatch.setenv(var, "")  # recorded, so that what the launcher sets is undone after the test
        monkeypatch.delenv(var)
    from torch.distributed.elastic.rendezvous import api
    monkeypatch.setattr(api.RendezvousStoreInfo, "build", api.RendezvousStoreInfo.build)  # _advertise, torch 2.4
    args = launch.torchrun_args(_launch_args(nproc_per_node=2, nnodes=(2, 2), rdzv_endpoint="127.0.0.1:29999"),
                                "train", ["--epochs", "1"], 30, None)
    joined = " ".join(args)
    assert "--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29999" in joined
    assert "is_host=true" in joined and "join_timeout=30" in joined and "read_timeout=30" in joined
    assert "--nnodes 2 " in joined and "--max-restarts 0" in joined  # restarts: the launcher starts the agent anew
    assert os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # each round's workers: a store of their own
    assert "--local-addr 127.0.0.1" in joined and args[-4:] == ["alexnet", "train", "--epochs", "1"]
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    said = []
    launch.torchrun_args(_launch_args(nproc_per_node=2), "train", [], 30, said.append)
    assert "rendezvous c10d at 127.0.0.1, on a free port, hosted by this node" in said[-1]
    static = launch.torchrun_args(_launch_args(nproc_per_node=1, nnodes=(2, 2), master_addr="127.0.0.1",
                                               master_port=29998, node_rank=1), "train", [], 30, None)
    assert "--rdzv-backend static --master-addr 127.0.0.1 --master-port 29998 --node-rank 1" in " ".join(static)


def test_rank_0_is_published_at_the_chosen_address_not_its_host_name(monkeypatch):
    # What the launcher gives torch versions whose rendezvous publishes socket.getfqdn() as MASTER_ADDR:
    # node rank 0 publishes the address chosen from the route, and every node reads the same back.
    from torch.distributed.elastic.rendezvous import api
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "a-name-that-resolves-to-loopback")
    port = free_port()
    server = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    client = torch.distributed.TCPStore("127.0.0.1", port, is_master=False)
    build = launch._store_info_builder("10.1.2.3")
    first, second = build(0, server), build(1, client)
    assert first.master_addr == second.master_addr == "10.1.2.3"
    assert first.master_port == second.master_port > 0
    # where torch publishes --local-addr itself, its own build is kept
    original = api.RendezvousStoreInfo.build
    monkeypatch.setattr(api.RendezvousStoreInfo, "build", original)  # so that it is put back after the test
    launch._advertise("10.1.2.3")
    if "local_addr" in inspect.signature(original).parameters:
        assert api.RendezvousStoreInfo.build is original
    else:
        assert api.RendezvousStoreInfo.build(0, torch.distributed.HashStore()).master_addr == "10.1.2.3"


@pytest.mark.parametrize("kw,message", [
    ({"nnodes": (2, 2), "nproc_per_node": 1}, "needs --rdzv-endpoint"),
    ({"rdzv_endpoint": "a:1", "master_addr": "a"}, "give one"),
    ({"node_rank": 1, "nnodes": (2, 2), "rdzv_endpoint": "127.0.0.1:1"}, "--node-rank goes with --master-addr"),
    ({"master_addr": "127.0.0.1", "node_rank": 2, "nnodes": (2, 2)}, "must be in \\[0, 1\\]"),
    ({"rdzv_endpoint": "host:port", "nnodes": (2, 2)}, "is not HOST or HOST:PORT"),
    ({"master_addr": "127.0.0.1", "node_rank": 0, "nnodes": (1, 2)}, "MIN:MAX \\(elastic\\) needs the c10d"),
])
def test_launcher_refuses_unclear_rendezvous_settings(kw, message, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=message):
        launch.torchrun_args(_launch_args(**kw), "train", [], 30, None)


@pytest.mark.parametrize("text,nodes", [("2", (2, 2)), ("1:2", (1, 2)), ("3:3", (3, 3))])
def test_nnodes_takes_a_number_or_an_elastic_range(text, nodes):
    assert launch.node_range(text) == nodes


@pytest.mark.parametrize("text", ["0", "2:1", "two", "1:", "1:2:3"])
def test_nnodes_refuses_what_is_not_a_number_or_a_range(text, capsys):
    from alexnet.cli import main
    with pytest.raises(SystemExit) as e:
        main(["train", "--nnodes", text])
    assert e.value.code == 2 and "--nnodes" in capsys.readouterr().err


@pytest.mark.parametrize("command,flag,text,said", [
    ("train", "--nproc-per-node", "0", "'0': must be at least 1"),
    ("eval", "--nproc-per-node", "-2", "'-2': must be at least 1"),
    ("train", "--nproc-per-node", "two", "'two' is not a whole number"),
    ("train", "--max-restarts", "-1", "'-1': must be at least 0"),
])
def test_process_and_restart_counts_are_checked_before_anything_runs(command, flag, text, said, capsys):
    from alexnet.cli import main
    with pytest.raises(SystemExit) as e:  # (--nproc-per-node 0 used to run one process)
        main([command, flag, text])
    assert e.value.code == 2 and f"argument {flag}: {said}" in capsys.readouterr().err


def test_the_continue_command_resumes_in_the_run_folder():
    argv = ["--data", "D", "--resume", "runs/x/checkpoints/step-1.pt", "--out=elsewhere", "--nnodes", "2"]
    assert launch.continue_command("train", argv, "/r/run") == ("alexnet train --data D --nnodes 2 --out /r/run "
                                                                "--resume auto")


# --------------------------------------------------------------------------------- equivalence (real)

@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(exact, one_process, two_processes):
    w2, p = two_processes
    assert max_diff(one_process, exact["w0"]) > 1e-3  # the weights moved
    assert max_diff(w2, one_process) <= tolerance(exact, one_process)
    ranks = shas(p.stdout)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]  # both ranks end with the same weights
    assert "batch: 4 per process x 2 processes x 1 accumulation step = 8 global" in p.stdout
    assert "interface lo" in p.stdout  # pinned to the interface that routes to the rendezvous


@pytest.mark.slow
def test_without_gradient_sync_the_processes_differ(exact, one_process):
    # The control: the same two-process run with each process keeping its own gradients.
    w, p = train_run(exact, "unsynced", "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "ddp",
                     env={"ALEXNET_UNSYNCED_GRADIENTS": "1"})
    assert max_diff(w, one_process) > 100 * tolerance(exact, one_process)
    ranks = shas(p.stdout)
    assert ranks[0] != ranks[1]


@pytest.mark.slow
def test_accumulation_equals_the_larger_batch(exact, one_process):
    w, p = train_run(exact, "accum", "--batch-size", "4", "--accum-steps", "2")
    assert max_diff(w, one_process) <= tolerance(exact, one_process)
    # and with two processes, each accumulating two micro-batches of 2 under no_sync
    w, p = train_run(exact, "accum2", "--global-batch-size", "8", "--accum-steps", "2", "--nproc-per-node", "2",
                     "--parallel", "ddp")
    assert "batch: 2 per process x 2 processes x 2 accumulation steps = 8 global" in p.stdout
    assert max_diff(w, one_process) <= tolerance(exact, one_process)


@pytest.mark.slow
def test_clipping_sees_the_global_gradient_on_every_process(exact, one_process):
    """--clip-grad-norm clips the all-reduced gradient: two processes equal one with the global batch."""
    w1, _ = train_run(exact, "clip1", "--batch-size", "8", "--clip-grad-norm", "0.05")
    assert max_diff(w1, one_process) > 100 * tolerance(exact, one_process)  # the clipping was active
    w2, p = train_run(exact, "clip2", "--batch-size", "4", "--nproc-per-node", "2", "--clip-grad-norm", "0.05",
                      "--parallel", "ddp")
    assert max_diff(w2, w1) <= tolerance(exact, w1)
    ranks = shas(p.stdout)
    assert ranks[0] == ranks[1]


@pytest.mark.slow
def test_batchnorm_statistics_end_the_same_on_every_process(exact):
    """--train-bn on two processes: each normalises its own half-batch and updates its own running statistics
    after DDP broadcast rank 0's; they are averaged at each epoch's end, so every rank ends with the same
    weights and statistics, and the saved model is the plain architecture."""
    w, p = train_run(exact, "bn2", "--batch-size", "4", "--nproc-per-node", "2", "--train-bn")
    ranks = shas(p.stdout)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    assert list(w) == list(exact["w0"])
    # what was saved is what the ranks ended with: averaged before the checkpoint, not after
    saved = add_batchnorm(create_model("alexnet", 3, dropout=0.0, fc_width=32))
    saved.load_state_dict(checkpoint.load_run(exact["root"] / "bn2" / "checkpoints" / "last.pt")["model_with_bn"])
    assert distributed.weights_sha256(saved) == ranks[0]


@pytest.mark.slow
def test_runs_unchanged_under_torchrun(exact, two_processes):
    out = exact["root"] / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(exact["root"] / "torchrun-logs"), "-m", "alexnet", "train", "--data", str(exact["data"]), "--weights", str(exact["root"] / "w0.pt"), "--out", str(out),
           *EXACT, "--batch-size", "4", "--parallel", "ddp"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 processes, backend gloo" in p.stdout
    ranks = shas(p.stdout)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    # The same weights as our own launcher gives.
    assert max_diff(final_weights(out), two_processes[0]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["bf16", "powersgd"])
def test_compression_hooks_train_on_gloo(exact, hook, one_process):
    # PowerSGD on gloo with several buckets aborts inside torch; --bucket-cap-mb 1 makes several buckets,
    # so this shows that the single-bucket fallback is applied.
    w, p = train_run(exact, f"hook-{hook}", "--batch-size", "4", "--nproc-per-node", "2", "--comm-hook", hook,
                     "--parallel", "ddp",
                     "--powersgd-start-step", "2", "--bucket-cap-mb", "1")
    ranks = shas(p.stdout)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    if hook == "powersgd":
        assert "single gradient bucket" in p.stdout
    # compressed: further from the exact result than the uncompressed run may be, but still close to it
    assert tolerance(exact, one_process) < max_diff(w, one_process) < 0.5 * max_diff(one_process, exact["w0"])


@pytest.mark.slow
def test_an_error_on_a_worker_names_its_rank(exact, tmp_path):
    # Weights of another width load in each worker and fail there.
    torch.save(create_model("alexnet", 3, fc_width=16).state_dict(), exact["root"] / "narrow.pt")
    temp = tmp_path / "temp"
    temp.mkdir()
    p = run_cli("train", "--data", exact["data"], "--out", exact["root"] / "err", *EXACT, "--batch-size", "4",
                "--weights", exact["root"] / "narrow.pt", "--nproc-per-node", "2", check=False,
                env={"TMPDIR": str(temp)})
    assert p.returncode == 2
    assert re.search(r"alexnet train \(rank 1\): error: --weights .*narrow.pt", p.stderr)
    assert re.search(r"rank [01] failed \(exit code 2\)", p.stderr) and "Traceback" not in p.stderr
    # torch's agent's own lines ("E1208 ... api.py:...] failed (exitcode: 2) local_rank: 0 ...") are not among ours
    assert "exitcode:" not in p.stderr and "closing signal" not in p.stderr, p.stderr
    # The launch leaves nothing in the temporary folder (torch's agent, by default, a folder of its own each
    # time) but torch's compiler cache, which is there to stay.
    assert [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")] == []


def test_a_restart_tries_the_rendezvous_within_the_time_left(monkeypatch):
    """torch tries a connection to the rendezvous's store again, after a pause, for the whole timeout each
    time: after a failure, where the node holding the store may be gone, the connection is given a third
    of the time left, and the join that time; what the agent reads from the store afterwards keeps the
    whole --dist-timeout."""
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "ALEXNET_NETWORK_SET", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    args = launch.torchrun_args(_launch_args(nproc_per_node=1, nnodes=(2, 2), rdzv_endpoint="127.0.0.1:29999"),
                                "train", [], 30, None)
    again = " ".join(launch._joining_within(args, 12))
    assert "join_timeout=12," in again and "read_timeout=30,connect_timeout=4," in again
    twice = " ".join(launch._joining_within(launch._joining_within(args, 12), 7))
    assert "join_timeout=7," in twice and twice.count("connect_timeout") == 1 and "connect_timeout=2," in twice


def test_a_failure_after_the_job_ran_again_counts_from_itself(tmp_path):
    """The launcher's time to reach the rendezvous counts from the latest failure: one after the workers
    joined again (their notes say when) is a failure of its own, not the end of the previous one's time."""
    assert not launch._joined_after(str(tmp_path), 0.0)
    (tmp_path / "joined-rank-1.json").write_text(json.dumps({"joined": 1000.0}))
    (tmp_path / "lost-rank-1.json").write_text(json.dumps({"lost": {}}))
    assert launch._joined_after(str(tmp_path), 0.0) and not launch._joined_after(str(tmp_path), 1000.0)
    (tmp_path / "joined-rank-0.json").write_text("{half written")
    assert launch._joined_after(str(tmp_path), 999.0) and not launch._joined_after(str(tmp_path), 1001.0)


def test_ctrl_c_stays_the_launchers_where_the_agent_takes_sigint_each_time_it_starts(monkeypatch):
    """Before torch 2.9 the agent cannot be told to leave SIGINT alone and installs its own handler each time
    it starts the workers (torch 2.4 to 2.8's PContext.start, imitated here): the launcher's is put back
    right after, so Ctrl-C means the same on every torch (tests/test_resume.py runs it for real), and both
    are given back when the launch ends."""
    import signal
    from torch.distributed.elastic.multiprocessing.api import PContext

    def agents(signum, frame):
        pass

    def start(context):  # what the agent does before torch 2.9
        signal.signal(signal.SIGINT, agents)
    monkeypatch.setattr(PContext, "start", start)
    before = signal.getsignal(signal.SIGINT)
    ctrl_c = launch.CtrlC("train", agent_takes_it=True)
    try:
        PContext.start(None)
        assert signal.getsignal(signal.SIGINT) == ctrl_c._handle
    finally:
        ctrl_c.restore()
    assert signal.getsignal(signal.SIGINT) == before and PContext.start is start
    ctrl_c = launch.CtrlC("train")  # torch 2.9 on: the agent is told to leave SIGINT alone
    try:
        PContext.start(None)
        assert signal.getsignal(signal.SIGINT) == agents
    finally:
        ctrl_c.restore()


def test_the_store_connects_within_its_connect_timeout_and_reads_with_the_whole_timeout():
    from datetime import timedelta
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as backend
    launch._connect_within_its_timeout()
    launch._connect_within_its_timeout()  # once is enough: not wrapped twice
    assert getattr(backend._create_tcp_store, "connects_within", False)
    with socket.socket() as s:  # a port nobody listens on: the rendezvous's node is gone
        s.bind(("127.0.0.1", 0))
        gone = s.getsockname()[1]
    params = RendezvousParameters("c10d", f"127.0.0.1:{gone}", "job", 2, 2, is_host="false", read_timeout="30",
                                  connect_timeout="2")
    t0 = time.monotonic()
    with pytest.raises(RendezvousConnectionError):
        backend._create_tcp_store(params)
    assert time.monotonic() - t0 < 15  # about 3 x 2 s, not 3 x 30 s
    assert params.config["read_timeout"] == "30"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    host = backend._create_tcp_store(RendezvousParameters("c10d", f"127.0.0.1:{free}", "job", 2, 2, is_host="true",
                                                          read_timeout="30", connect_timeout="2"))
    assert host.timeout == timedelta(seconds=30)


# --------------------------------------------------------------------------------- exact evaluation

@pytest.fixture(scope="module")
def odd_val(tmp_path_factory):
    """101 validation images in 6 classes (17 x 6 - 1), so no world size of 2 or 3 divides them, and a model."""
    root = tmp_path_factory.mktemp("odd")
    data = write_folder(root / "data", classes=6, train_per_class=8, val_per_class=17)
    extra = sorted((data / "val" / "square").glob("*.jpg"))[-1]
    extra.unlink()
    out = root / "run"
    run_here("train", "--data", data, "--out", out, "--resize", "72", "--crop", "64", "--fc-width", "32",
             "--workers", "0", "--epochs", "1", "--quiet", "--batch-size", "8", "--lr", "0.02")
    return data, out / "checkpoints" / "last.pt"


@pytest.mark.slow
def test_evaluation_is_exact_for_any_number_of_processes(odd_val):
    data, ckpt = odd_val
    (data / "val" / "square" / "notes.txt").write_text("not an image")  # said once, whatever the processes
    results = []
    for n in (1, 2, 3):
        flags = [] if n == 1 else ["--nproc-per-node", str(n)]
        run = run_here if n == 1 else run_cli
        p = run("eval", "--checkpoint", ckpt, "--data", data, "--json", "--workers", "0", "--batch-size", "8",
                *flags)
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        assert p.stderr.count("left out 1 file(s)") == 1, p.stderr
    for m in results:
        assert m["count"] == 101
        assert (m["correct1"], m["correct5"]) == (results[0]["correct1"], results[0]["correct5"])
        assert m["acc1"] == results[0]["acc1"] and m["acc5"] == results[0]["acc5"]
        assert m["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)
    assert results[0]["correct5"] < 101  # top-5 of 6 classes can miss, so it is compared for real


GROUP_THREADS_AFTER_SHUTDOWN = """
import os, sys, torch
from alexnet import distributed
distributed.setup(torch.device("cpu"), timeout_s=60)
import torchvision, torch._dynamo  # what the data path and --compile import once the group exists
distributed.sum_all([1.0])
distributed.shutdown()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w") as f:
    f.write(",".join(names))
"""


@pytest.mark.slow
def test_shutdown_ends_the_groups_threads(tmp_path):
    # A gloo group kept alive past shutdown leaves its threads running into interpreter exit, where one
    # of them can abort the process after its work is done (seen as a rank stopped by signal 6 in eval).
    script = tmp_path / "threads.py"
    script.write_text(GROUP_THREADS_AFTER_SHUTDOWN)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--log-dir", str(tmp_path / "logs"), str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        names = (tmp_path / f"rank{rank}").read_text()
        assert "gloo" not in names, names  # the main thread is "python" (torch 2.4 names it "pt_main_thread")


# --------------------------------------------------------------------------------------- dead peers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_missing_node_is_a_clear_error_within_the_timeout(exact):
    port = free_port()
    start = time.monotonic()
    p = run_cli("train", "--data", exact["data"], "--out", exact["root"] / "dead", *EXACT, "--batch-size", "4",
                "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--dist-timeout", "15", check=False, timeout=120)
    elapsed = time.monotonic() - start
    assert p.returncode == 1
    assert f"not all 2 nodes joined the rendezvous at 127.0.0.1:{port} within 15 s" in p.stderr
    assert "Traceback" not in p.stderr
    assert elapsed < 15 + 25, elapsed  # the timeout, plus start-up and shut-down


@pytest.mark.slow
def test_an_unreachable_endpoint_is_a_clear_error(exact):
    # A static rendezvous (--master-addr, --node-rank 1) whose node 0 never starts.
    port = free_port()
    p = run_cli("train", "--data", exact["data"], "--out", exact["root"] / "unreachable", *EXACT, "--batch-size", "4",
                "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                "--node-rank", "1", "--dist-timeout", "10", check=False, timeout=120)
    assert p.returncode == 1
    assert f"could not reach the rendezvous at 127.0.0.1:{port} within 10 s" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("flags,said", [
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--master-port", "29555"], "--master-port goes with --master-addr"),
    (["--rdzv-endpoint", "127.0.0.1:abc"], "--rdzv-endpoint: '127.0.0.1:abc' is not HOST or HOST:PORT"),
    (["--device", "cuda", "--max-restarts", "2"], "--device: 'cuda' asks for CUDA, which is not available"),
    (["--backend", "nccl"], "--backend nccl needs CUDA devices"),
])
def test_a_launch_mistake_is_said_before_the_folder_is_packed_and_once(flags, said, tmp_path, capsys, monkeypatch):
    """These were said after packing the whole folder on first use (hours, on ImageNet); --device cuda on a
    CPU machine was said by every worker of every restart."""
    if torch.cuda.is_available() and ("cuda" in flags or "nccl" in flags):
        pytest.skip("CUDA is here")
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    data = write_folder(tmp_path / "d")
    code, _, err = cli(capsys, "train", "--data", data, "--out", tmp_path / "r", "--cache-dir", tmp_path / "cache",
                       "--nproc-per-node", "2", *flags)
    assert code == 2 and err.startswith(f"alexnet train: error: {said}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags,flag", [(["--rdzv-endpoint", "127.0.0.1:{port}"], "--rdzv-endpoint HOST:PORT"),
                                        (["--master-addr", "127.0.0.1", "--master-port", "{port}"], "--master-port PORT"),
                                        (["--master-addr", "127.0.0.1", "--master-port", "{port}", "--node-rank", "0"],
                                         "--master-port PORT")])
def test_a_rendezvous_port_another_process_holds_is_said_so(flags, flag, tmp_path, capsys, monkeypatch):
    """It was said as "could not reach the rendezvous ... is port P open in its firewall?"."""
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli(capsys, "train", "--out", tmp_path / "r", "--nproc-per-node", "2",
                           *[f.format(port=port) for f in flags])
    assert code == 2 and err == (f"alexnet train: error: port {port} of this node (127.0.0.1), where the rendezvous "
                                 f"would be hosted, is in use by another process (another job's rendezvous?): give "
                                 f"another port with {flag}, the same on every node\n"), err


def test_a_rank_killed_by_a_signal_is_named_before_those_that_then_lost_contact(monkeypatch):
    """After SIGKILL of rank 1, the restart line said "rank 0 failed (exit code 1)", the rank that only lost
    contact with it."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failing(_):
        raise ChildFailedError("alexnet", {0: ProcessFailure(0, 11, 1, "/nonexistent"),
                                           1: ProcessFailure(1, 12, -9, "/nonexistent")})
    monkeypatch.setattr(torchrun, "run", failing)
    with pytest.raises(launch._Failed) as e:
        launch._run_once(_launch_args(), "train", None, 30, "127.0.0.1", 0)
    assert e.value.message == ("rank 1 was stopped (signal 9); rank 0 failed (exit code 1); the workers' messages "
                               "are above") and e.value.code == 1
