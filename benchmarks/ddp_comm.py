"""Two-process DDP step time split into compute and non-overlapped communication, for the gradient
compression hooks (none, bf16, PowerSGD), on loopback and, as root, between two network namespaces joined
by a veth pair limited to 1 Gbit/s with `tc ... tbf`.

    python benchmarks/ddp_comm.py                    # loopback, then the 1 Gbit/s link when run as root
    python benchmarks/ddp_comm.py --no-netns --steps 4

Each measurement alternates a step without gradient synchronisation (DDP's no_sync: forward, backward,
optimizer step; the compute) with a normal DDP step (compute plus whatever communication does not overlap
the backward pass); the medians of each and their difference are reported. The model is torchvision's
AlexNet with 1000 classes (61.1M parameters, 244 MB of fp32 gradients a step) on random 224x224 images.
The workers are started with torchrun (torch.distributed.run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from netns import result_of, torchrun_args, two_hosts

HOOKS = ("none", "bf16", "powersgd")


def worker(args) -> None:
    import torch
    from alexnet import distributed
    from alexnet.models import create_model

    distributed.setup(torch.device("cpu"), "gloo", 600)
    images = torch.randn(args.batch, 3, 224, 224)
    target = torch.randint(0, 1000, (args.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    results = {}
    for hook in HOOKS:
        torch.manual_seed(0)
        model = create_model("alexnet", 1000, dropout=0.0)  # a fresh model and DDP wrapper for each hook
        ddp = distributed.wrap(model, torch.device("cpu"), comm_hook=hook, powersgd_rank=args.powersgd_rank,
                               powersgd_start_step=2)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(sync: bool) -> float:
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if sync:
                loss_fn(ddp(images), target).backward()
            else:
                with ddp.no_sync():
                    loss_fn(ddp(images), target).backward()
            opt.step()
            return time.perf_counter() - t

        for _ in range(3):  # warm-up; PowerSGD compresses from its third step
            step(True)
        compute, total = [], []
        for _ in range(args.steps):
            compute.append(step(False))
            total.append(step(True))
        results[hook] = {"compute": statistics.median(compute), "total": statistics.median(total)}
        del ddp, opt, model
    if distributed.is_main():
        print("RESULT " + json.dumps(results), flush=True)
    distributed.shutdown()


def torchrun(extra: list[str], args, prefix: list[str] = (), env=None) -> subprocess.Popen:
    cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", *extra, __file__, "--worker",
           "--batch", str(args.batch), "--steps", str(args.steps), "--powersgd-rank", str(args.powersgd_rank)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def netns_run(args) -> dict:
    """Two namespaces, a veth pair shaped to --rate on both ends, one node in each."""
    with two_hosts("b", "10.232.0", args.rate) as hosts:
        procs = [torchrun(torchrun_args(hosts, i), args, prefix=["ip", "netns", "exec", n],
                          env={"GLOO_SOCKET_IFNAME": link}) for i, (n, link, _) in enumerate(hosts)]
        results = [result_of(p) for p in procs]
        return next(r for r in results if r)


def report(title: str, results: dict) -> None:
    print(f"\n{title}")
    print("| hook | step (s) | compute (s) | not overlapped: communication + compression (s) | step speed-up vs none |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = results["none"]["total"]
    for hook, r in results.items():
        print(f"| {hook} | {r['total']:.3f} | {r['compute']:.3f} | {r['total'] - r['compute']:.3f} | "
              f"{base / r['total']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help="images per process per step (default 16)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps of each kind (default 6)")
    parser.add_argument("--powersgd-rank", type=int, default=2)
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate of the namespace link (default 1gbit)")
    parser.add_argument("--no-netns", action="store_true", help="loopback only")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch
    print(f"torch {torch.__version__}; {os.cpu_count()} CPUs; 2 processes x 1 thread, gloo; batch {args.batch} "
          f"per process at 224x224; medians of {args.steps} steps")
    report("loopback (lo)", result_of(torchrun(["--standalone", "--nproc-per-node", "2"], args,
                                               env={"GLOO_SOCKET_IFNAME": "lo"})))
    if not args.no_netns:
        if os.geteuid() != 0 or not shutil.which("ip"):
            print("\n(two namespaces need root and iproute2: skipped)")
        else:
            report(f"two network namespaces, veth limited to {args.rate} by tc tbf", netns_run(args))


if __name__ == "__main__":
    main()
