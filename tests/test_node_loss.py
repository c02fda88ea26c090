"""Losing a machine or a link in a two-host job (two network namespaces, as tests/test_netns.py makes them):
a node that dies and comes back rejoins, a node that does not come back is named, an elastic job goes on
without it, a link that stays down is reported. "Killed" means every process of the host, SIGKILL."""

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from conftest import EXACT, kill_host, set_link, shas, start

pytestmark = [pytest.mark.netns, pytest.mark.slow]

EPOCHS = 24  # 3 steps an epoch: long enough to kill a host in the middle


def command(exact, out: Path, endpoint: str, *extra) -> list:
    return ["--data", exact["data"], "--weights", exact["root"] / "w0.pt", *EXACT, "--batch-size", "4",
            "--epochs", str(EPOCHS), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint,
            "--dist-timeout", "20", "--out", out, "--resume", "auto", *extra]


def newest_step(out: Path) -> int:
    steps = [int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt")]
    return max(steps, default=0)


def wait_for_step(out: Path, step: int, procs: dict, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := newest_step(out)) >= step:
            return found
        assert all(p.poll() is None for p in procs.values()), {h: p.communicate() for h, p in procs.items()}
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


def finish(procs: dict, timeout: float = 150) -> dict:
    """{host: (exit code, output, seconds from now to its exit)}."""
    t0, out = time.monotonic(), {}
    for h, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise
        out[h] = (p.returncode, stdout + stderr, time.monotonic() - t0)
    return out


def epochs_recorded(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_killed_host_started_again_rejoins_and_the_job_finishes(hosts, exact, tmp_path):
    out = tmp_path / "run"  # one folder both hosts see (a shared file system): rank 0 writes it, wherever it is
    args = command(exact, out, f"{hosts['addrs']['a']}:29510", "--max-restarts", "3")
    procs = {h: start(hosts, h, args, {}) for h in ("a", "b")}
    before = wait_for_step(out, 6, procs)
    kill_host(hosts, "b")
    procs["b"].communicate()
    newest = newest_step(out)
    time.sleep(5)
    procs["b"] = start(hosts, "b", args, {})
    logs = finish(procs)
    for h, (code, text, _) in logs.items():
        assert code == 0, f"host {h} exited {code}:\n{text[-4000:]}"
    ranks = {**shas(logs["a"][1]), **shas(logs["b"][1])}
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    both = logs["a"][1] + logs["b"][1]
    resumed = [int(s) for s in re.findall(r"global step (\d+)\)", both)]
    assert resumed and min(resumed) >= newest >= before, both[-3000:]
    assert epochs_recorded(out) == list(range(1, EPOCHS + 1))


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def survivor_of_a_kill(hosts, exact, out: Path, port: int, victim: str) -> tuple[int, str, float]:
    """Both hosts train (--max-restarts 3); `victim` is killed after the second epoch's checkpoint and not
    started again: the other's (exit code, output, seconds from the kill to its exit)."""
    args = command(exact, out, f"{hosts['addrs']['a']}:{port}", "--max-restarts", "3")
    procs = {h: start(hosts, h, args, {}) for h in ("a", "b")}
    wait_for_step(out, 6, procs)
    kill_host(hosts, victim)
    procs.pop(victim).communicate()
    return next(iter(finish(procs).values()))


def test_a_host_that_does_not_come_back_is_named_with_the_command_that_continues(hosts, exact, tmp_path):
    out = tmp_path / "run"
    code, text, seconds = survivor_of_a_kill(hosts, exact, out, 29520, "b")
    assert code != 0 and seconds < 20 + 30, (code, seconds, text[-3000:])
    line = last_line(text)
    assert f"lost node 1 (host {hosts['hostname']}, {hosts['addrs']['b']})" in line, text[-3000:]
    assert "Traceback" not in text
    again = line.split("once it is back): ")[1]
    assert again.startswith("alexnet train ") and again.endswith(f"--out {out} --resume auto")
    # That command, run on both hosts, finishes the job.
    procs = {h: start(hosts, h, shlex.split(again)[2:], {}) for h in ("a", "b")}
    logs = finish(procs)
    for h, (code, text, _) in logs.items():
        assert code == 0, f"host {h} exited {code}:\n{text[-4000:]}"
    assert epochs_recorded(out) == list(range(1, EPOCHS + 1))


def test_losing_the_endpoints_host_is_said(hosts, exact, tmp_path):
    code, text, seconds = survivor_of_a_kill(hosts, exact, tmp_path / "run", 29530, "a")
    assert code != 0 and seconds < 20 + 30, (code, seconds, text[-3000:])
    line = last_line(text)
    assert f"lost node 0 (host {hosts['hostname']}, {hosts['addrs']['a']})" in line, text[-3000:]
    assert f"it held the rendezvous endpoint {hosts['addrs']['a']}:29530" in line
    assert "Traceback" not in text


def link_down(hosts, seconds: float) -> None:
    """Host b's link down for `seconds`, then up again (with its default route)."""
    set_link(hosts, "b", up=False)
    time.sleep(seconds)
    set_link(hosts, "b", up=True)


def test_a_link_down_longer_than_the_timeout_names_the_peer(hosts, exact, tmp_path):
    out = tmp_path / "run"
    procs = {h: start(hosts, h, command(exact, out, f"{hosts['addrs']['a']}:29550"), {}) for h in ("a", "b")}
    wait_for_step(out, 6, procs)
    link_down(hosts, 30)
    logs = finish(procs)
    for h, other in (("a", "b"), ("b", "a")):
        code, text, _ = logs[h]
        line = last_line(text)
        assert code != 0 and f"lost node {'01'[other == 'b']} (host {hosts['hostname']}, {hosts['addrs'][other]})" in line, text[-3000:]
        assert "Traceback" not in text
    assert "Continue the job by running this on every node" in last_line(logs["a"][1])


def test_a_short_outage_is_waited_out_and_after_a_long_one_max_restarts_finishes_the_job(hosts, exact, tmp_path):
    out = tmp_path / "run"
    args = command(exact, out, f"{hosts['addrs']['a']}:29560", "--max-restarts", "3")
    procs = {h: start(hosts, h, args, {}) for h in ("a", "b")}
    wait_for_step(out, 6, procs)
    link_down(hosts, 5)  # shorter than --dist-timeout: the same workers go on (one process group in the log)
    wait_for_step(out, 12, procs)
    assert (out / "train.log").read_text().count("process group:") == 1
    link_down(hosts, 30)  # longer: the workers fail, both nodes restart and rejoin once the link is back
    logs = finish(procs)
    for h, (code, text, _) in logs.items():
        assert code == 0, f"host {h} exited {code}:\n{text[-4000:]}"
    assert "lost node 1" in logs["a"][1] and "lost node 0" in logs["b"][1]
    assert (out / "train.log").read_text().count("process group:") == 2
    assert epochs_recorded(out) == list(range(1, EPOCHS + 1))


def elastic_job_that_loses_b(hosts, exact, out: Path, port: int) -> tuple[list, dict]:
    """Both hosts train with --nnodes 1:2; host b is killed after the second epoch's checkpoint. (The
    command, {"a": host a's process}.)"""
    args = command(exact, out, f"{hosts['addrs']['a']}:{port}")
    args[args.index("--nnodes") + 1] = "1:2"
    procs = {h: start(hosts, h, args, {}) for h in ("a", "b")}
    wait_for_step(out, 6, procs)
    kill_host(hosts, "b")
    procs.pop("b").communicate()
    return args, procs


def test_an_elastic_job_goes_on_without_a_lost_host_and_takes_it_back(hosts, exact, tmp_path):
    out = tmp_path / "run"
    args, procs = elastic_job_that_loses_b(hosts, exact, out, 29580)
    # Host a goes on alone: its workers restart in a world of 1 from the newest checkpoint.
    deadline = time.monotonic() + 90
    while "process group: 1 processes" not in (out / "train.log").read_text():
        assert time.monotonic() < deadline and procs["a"].poll() is None, "host a did not go on alone"
        time.sleep(0.2)
    step_alone = newest_step(out)
    procs["b"] = start(hosts, "b", args, {})  # host b comes back: the world grows to 2 again
    logs = finish(procs)
    for h, (code, text, _) in logs.items():
        assert code == 0, f"host {h} exited {code}:\n{text[-4000:]}"
    log = (out / "train.log").read_text()
    alone, again = log.index("process group: 1 processes"), log.rindex("process group: 2 processes")
    assert alone < again, log[-3000:]
    assert "the world size changed from 2 to 1 processes" in log and "changed from 1 to 2 processes" in log
    assert epochs_recorded(out) == list(range(1, EPOCHS + 1))
    ranks = {**shas(logs["a"][1]), **shas(logs["b"][1])}
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1]
    assert step_alone >= 6


def test_an_elastic_job_finishes_alone_when_the_host_does_not_come_back(hosts, exact, tmp_path):
    out = tmp_path / "run"
    _, procs = elastic_job_that_loses_b(hosts, exact, out, 29590)
    code, text, _ = finish(procs)["a"]
    assert code == 0, text[-4000:]
    assert "final weights sha256" in text and "(rank 0 of 1)" in text
    assert epochs_recorded(out) == list(range(1, EPOCHS + 1))
