"""Two hosts on this machine for the benchmarks: two network namespaces joined by a veth pair, the link
limited on both ends with `tc ... tbf`. Needs root and iproute2; everything made is removed on exit, and
no traffic leaves the pair."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def two_hosts(tag: str, subnet: str, rate: str):
    """Yields [(namespace, link, address)] for hosts A and B, on `subnet`.1 and `subnet`.2, at `rate`."""
    hosts = [(f"alx{tag}A", f"vx{tag}A", f"{subnet}.1"), (f"alx{tag}B", f"vx{tag}B", f"{subnet}.2")]
    try:
        sh("ip", "link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for n, link, addr in hosts:
            sh("ip", "netns", "add", n)
            sh("ip", "link", "set", link, "netns", n)
            sh("ip", "-n", n, "addr", "add", f"{addr}/24", "dev", link)
            sh("ip", "-n", n, "link", "set", link, "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", n, "tc", "qdisc", "add", "dev", link, "root", "tbf", "rate", rate,
               "burst", "1mb", "latency", "400ms")
        yield hosts
    finally:
        for n, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        subprocess.run(["ip", "link", "del", hosts[0][1]], capture_output=True)


def torchrun_args(hosts, i: int, port: int = 29400) -> list[str]:
    """torchrun's rendezvous flags for host i of the pair (host A hosts the store)."""
    return ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"{hosts[0][2]}:{port}", "--rdzv-conf", f"is_host={'true' if i == 0 else 'false'}",
            "--local-addr", hosts[i][2]]


def result_of(proc: subprocess.Popen, timeout: float = 3600) -> dict | None:
    """The JSON a worker printed on its `RESULT ` line (rank 0's; None from the others); exits with the
    worker's output when it failed."""
    out, _ = proc.communicate(timeout=timeout)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if proc.returncode:
        sys.exit(f"a worker failed:\n{out[-3000:]}")
    return None
