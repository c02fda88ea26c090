"""Two hosts on one machine: two network namespaces joined by a veth pair, each with its own address, and
in each the machine's host name resolving to loopback (the trap of pytorch/examples #812). One
`alexnet train` node runs in each, with the same plain command. Needs root; as root, a failure to set up
the namespaces is a failure, not a skip."""

import subprocess

import pytest

from conftest import EXACT, final_weights, max_diff, run_cli, shas, start, tolerance

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_the_host_name_is_loopback_inside_the_namespaces(hosts):
    p = subprocess.run(["ip", "netns", "exec", hosts["ns"]["a"], "getent", "hosts", hosts["hostname"]],
                       capture_output=True, text=True, timeout=30)
    assert p.stdout.split()[0].startswith("127."), p.stdout


def run_pair(hosts, exact, endpoint: str, tmp_path, out=None, extra=(), private_b=None) -> dict:
    """The same `alexnet train` command on host a and host b; returns each host's output."""
    common = ["--data", exact["data"], "--weights", exact["root"] / "w0.pt", *EXACT, "--batch-size", "4",
              "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--dist-timeout", "60", *extra]
    procs = {h: start(hosts, h, [*common, "--out", out or tmp_path / f"out-{h}"],
                      {"ALEXNET_TRACE_SAMPLES": str(tmp_path / f"trace-{h}")}, private_b if h == "b" else None)
             for h in ("a", "b")}
    logs = {}
    for h, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise
        logs[h] = stdout + stderr
        assert p.returncode == 0, f"host {h} exited {p.returncode}:\n{logs[h][-4000:]}"
    return logs


def test_two_hosts_train_like_one_host_with_two_processes(hosts, exact, two_processes, one_process, tmp_path):
    logs = run_pair(hosts, exact, f"{hosts['addrs']['a']}:29400", tmp_path)

    # Each host chose its veth interface and advertised its own address, not the loopback of its host name.
    for h in ("a", "b"):
        assert f"interface {hosts['links'][h]} from {hosts['addrs'][h]}" in logs[h], logs[h]
        assert f"this node advertises {hosts['addrs'][h]}" in logs[h]
    assert "hosted by this node" in logs["a"] and "hosted by another node" in logs["b"]

    # World size 2, one rank on each host, the same final weights on both.
    ranks = {**shas(logs["a"]), **shas(logs["b"])}
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    assert all(" of 2)" in line for line in (logs["a"] + logs["b"]).splitlines() if "final weights" in line)

    # Disjoint shards that together are the whole (even) training set.
    shards = [set(map(int, f.read_text().split())) for h in ("a", "b") for f in (tmp_path / f"trace-{h}").glob("*.txt")]
    assert len(shards) == 2 and not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 12
    assert shards[0] | shards[1] == set(range(24))

    # Rank 0's checkpoint equals the single-host two-process run and the one-process run.
    outs = [tmp_path / f"out-{h}" for h in ("a", "b") if (tmp_path / f"out-{h}" / "checkpoints" / "last.pt").exists()]
    assert len(outs) == 1  # one run folder (rank 0's)
    assert len((outs[0] / "metrics.jsonl").read_text().splitlines()) == 1  # written once: by rank 0 alone
    w = final_weights(outs[0])
    assert max_diff(w, two_processes[0]) <= tolerance(exact, one_process)
    assert max_diff(w, one_process) <= tolerance(exact, one_process)


def test_an_endpoint_named_by_a_host_name_that_is_loopback_on_its_own_node(hosts, exact, tmp_path):
    # The Slurm and Kubernetes case: the endpoint is node a's name; on a it resolves to 127.0.1.1.
    logs = run_pair(hosts, exact, "nodea:29401", tmp_path)
    assert "nodea resolves to 127.0.1.1 (loopback) on this node, so it is this node" in logs["a"], logs["a"]
    assert "hosted by this node" in logs["a"] and "hosted by another node" in logs["b"]
    for h in ("a", "b"):
        assert f"this node advertises {hosts['addrs'][h]}" in logs[h]
    ranks = {**shas(logs["a"]), **shas(logs["b"])}
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]


def test_without_shared_storage_the_newest_checkpoint_is_sent_to_the_other_node(hosts, exact, tmp_path):
    out = tmp_path / "run"
    run_cli("train", "--data", exact["data"], "--weights", exact["root"] / "w0.pt", "--out", out, *EXACT,
            "--batch-size", "4", "--nproc-per-node", "2")  # one epoch: step-3.pt, on "host a's disk"
    # Host b sees its own, empty checkpoints folder (a tmpfs mounted over it in a private mount namespace).
    logs = run_pair(hosts, exact, f"{hosts['addrs']['a']}:29402", tmp_path, out=out,
                    extra=["--epochs", "2", "--resume", "auto"], private_b=out / "checkpoints")
    both = logs["a"] + logs["b"]
    assert "the newest checkpoint (global step 3) is on rank" in both and "sending it to the others" in both
    assert "(global step 3)" in both and "starting afresh" not in both
    ranks = {**shas(logs["a"]), **shas(logs["b"])}
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]


def test_two_hosts_train_with_hybrid_parallelism(hosts, exact, one_process, tmp_path):
    """--parallel hybrid across the two hosts: activations cross the link; the whole model, gathered, is
    the same on both ranks and in the checkpoint, and within the equivalence tolerance of the same run on
    one host with two processes."""
    from alexnet import checkpoint
    from alexnet.distributed import weights_sha256
    from alexnet.models import create_model
    from conftest import train_run
    logs = run_pair(hosts, exact, f"{hosts['addrs']['a']}:29403", tmp_path, extra=["--parallel", "hybrid"])
    both = logs["a"] + logs["b"]
    assert "parallel: hybrid (--parallel hybrid;" in both
    ranks = {**shas(logs["a"]), **shas(logs["b"])}
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    outs = [tmp_path / f"out-{h}" for h in ("a", "b") if (tmp_path / f"out-{h}" / "checkpoints" / "last.pt").exists()]
    assert len(outs) == 1
    model = create_model("alexnet", 3, dropout=0.0, fc_width=32)
    model.load_state_dict(checkpoint.load_run(outs[0] / "checkpoints" / "last.pt")["model"])
    assert weights_sha256(model) == ranks[0]
    one_host, _ = train_run(exact, "hybrid-one-host", "--batch-size", "4", "--nproc-per-node", "2", "--parallel", "hybrid")
    assert max_diff(final_weights(outs[0]), one_host) <= tolerance(exact, one_process)
