"""Scaling across two hosts on a slow link: each parallelism strategy's step time on two hosts against one
host alone, and the bytes each host sends a step, measured beside the bytes predicted.

    sudo python benchmarks/scaling.py                       # 1 Gbit/s and 100 Mbit/s, batch 32 and 128
    sudo python benchmarks/scaling.py --rates 1gbit --batches 32 --precision fp32 --json out.json

Two network namespaces joined by a veth pair, the link limited on both ends with `tc ... tbf`; one training
process in each, pinned to its own core (taskset) with one thread, started by torchrun over the link. The
model is torchvision's AlexNet with 1000 classes at 224x224 on random images, stepped by the trainer's own
step (alexnet.train.step) with each strategy of alexnet.parallel: ddp, ddp with the bf16 hook, hybrid,
hybrid with bf16 on the wire, local SGD (ddp's gradients never exchanged, the weights averaged every
--period steps), and hybrid with local SGD for the convolutions (their weights averaged every --period
steps, the fully connected slices exchanging activations every step), with and without bf16. The single-process step time, same per-process batch, one core, one thread, is measured
in the same run, before each pair. Step times are medians after a warm-up; local SGD's (both kinds) the
mean over whole periods (its averaging step is one in H). Bytes are read from the veth's tx counter in each
namespace. Efficiency = single step time / two-host step time.
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

from netns import result_of, torchrun_args, two_hosts

STRATEGIES = ("ddp", "ddp+bf16", "hybrid", "hybrid+bf16", "local-sgd", "hybrid+local", "hybrid+bf16+local")


def tx_bytes(link: str | None) -> int:
    if not link:
        return 0
    with open(f"/sys/class/net/{link}/statistics/tx_bytes") as f:
        return int(f.read())


def worker(args) -> None:
    import torch
    from alexnet import distributed
    from alexnet.config import TrainConfig
    from alexnet.models import create_model
    from alexnet.parallel import bytes_per_step, make
    from alexnet.progress import Progress
    from alexnet.runtime import make_sgd, resolve_precision
    from alexnet.train.schedule import Schedule
    from alexnet.train.step import Trainer, train_one_epoch

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    if args.single:
        names = ["single"]
    else:
        distributed.setup(cpu, "gloo", 900)
        names = args.strategies.split(",")
    link = os.environ.get("GLOO_SOCKET_IFNAME")
    amp = resolve_precision(args.precision, cpu, False)
    g = torch.Generator().manual_seed(distributed.rank())
    images = torch.randn(args.batch, 3, 224, 224, generator=g).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), generator=g)
    results = {}
    for name in names:
        torch.manual_seed(0)
        model = create_model("alexnet", 1000).to(memory_format=torch.channels_last)
        kind, *rest = name.split("+")
        kind = "ddp" if kind == "single" else kind
        hook = "bf16" if "bf16" in rest else ""
        local = kind == "local-sgd" or "local" in rest  # averaging once a period: timed over whole periods
        period = args.period if local else 0
        parallel = make(kind, model, cpu, comm_hook=hook or "none", local_sgd_period=period)
        optimizer = make_sgd(parallel.parameters(), "auto", cpu, lr=1e-4, momentum=0.9, weight_decay=5e-4)
        schedule = Schedule(TrainConfig(epochs=1, warmup_epochs=0, schedule="constant"), 1, 1e-4)
        trainer = Trainer(model, optimizer, schedule, torch.nn.CrossEntropyLoss(), cpu, parallel=parallel,
                          channels_last=True, amp_dtype=amp)
        steps = args.period * max(1, args.steps // args.period) if local else args.steps
        times, sent = [], []
        for i in range(args.warmup + steps):
            before, start = tx_bytes(link), time.perf_counter()
            train_one_epoch(trainer, [(images, target, 0)], global_step=i, progress=Progress(0, "", enabled=False),
                            input_size=224)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                sent.append(tx_bytes(link) - before)
        world = distributed.world_size()
        results[name] = {"step_s": statistics.mean(times) if local else statistics.median(times),
                         "times": times, "bytes": statistics.mean(sent) if local else statistics.median(sent),
                         "predicted_bytes": bytes_per_step(kind, world, args.batch, model, value_bytes=2 if hook else 4,
                                                           local_sgd_period=period or 1,
                                                           activation_bytes=2 if hook or amp is not None else 4)}
        del trainer, optimizer, parallel, model
    if distributed.is_main():
        print("RESULT " + json.dumps(results), flush=True)
    distributed.shutdown()


def launch(args, batch: int, prefix=(), extra=(), env=None, single=False) -> subprocess.Popen:
    worker_args = ["--worker", "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--period", str(args.period), "--precision", args.precision, "--strategies", args.strategies]
    if single:
        cmd = [*prefix, sys.executable, __file__, *worker_args, "--single"]
    else:
        cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", *extra, __file__, *worker_args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def pair(args, batch: int, rate: str) -> dict:
    """One process in each of two namespaces, each pinned to its own core, the link limited to `rate`."""
    with two_hosts("s", "10.233.0", rate) as hosts:
        procs = [launch(args, batch, prefix=["ip", "netns", "exec", n, "taskset", "-c", str(i % os.cpu_count())],
                        extra=torchrun_args(hosts, i), env={"GLOO_SOCKET_IFNAME": link})
                 for i, (n, link, _) in enumerate(hosts)]
        results = [result_of(p) for p in procs]
        return next(r for r in results if r)


def predict(step_s: float, batch: int) -> None:
    """On paper: N nodes of 8 GPUs on E Gbit/s Ethernet, from the measured step time of one GPU at `batch`
    images (the GPUs inside a node joined by NVLink, taken as free). What each node's link carries a step:
    ddp (NCCL's ring or tree over nodes): 2 (N-1)/N x 61.1M gradients (bf16: 2 bytes); hybrid over all 8N
    GPUs: each GPU sends 2 (W-1) B (9216 + 4096 + 1000) activations (bf16), of which (W-8)/(W-1) leave the
    node, plus the convolutions' 2.5M gradients; hybrid within each node (fc slices model-parallel over the
    node's 8 GPUs, each slice and the convolutions all-reduced across nodes): 2 (N-1)/N x 61.1M, as ddp;
    local SGD (H=8): ddp's bytes once in 8 steps. Step = compute + communication (no overlap): a floor on
    the efficiency; with full overlap it would be compute / max(compute, communication)."""
    total, conv, per_image = 61.1e6, 2.47e6, 9216 + 4096 + 1000
    print(f"\nOn paper: one GPU's step {step_s * 1e3:.1f} ms at batch {batch}; bf16 on the wire; efficiency = "
          f"compute / (compute + communication)")
    print("| nodes x 8 GPUs | link | ddp | hybrid, all GPUs | hybrid within nodes | local SGD, H=8 | crossover: global batch |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for nodes in (2, 4, 8):
        w = 8 * nodes
        ddp = 2 * (nodes - 1) / nodes * total * 2
        hybrid = 8 * 2 * (w - 8) * batch * per_image * 2 + 2 * (nodes - 1) / nodes * conv * 2
        for gbit in (10, 25, 100):
            rate = gbit * 1e9 / 8
            eff = [step_s / (step_s + b / rate) for b in (ddp, hybrid, ddp, ddp / 8)]
            print(f"| {nodes} x 8 | {gbit} Gbit/s | " + " | ".join(f"{e:.2f}" for e in eff) +
                  f" | {int((total - conv) / per_image):,} (this: {w * batch:,}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--batches", default="32,128", help="images per process and step (default 32,128)")
    parser.add_argument("--rates", default="1gbit,100mbit", help="tc rates of the link (default 1gbit,100mbit)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"of {', '.join(STRATEGIES)}")
    parser.add_argument("--steps", type=int, default=4, help="measured steps (local SGD: whole periods) (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring (default 2)")
    parser.add_argument("--period", type=int, default=8, help="local SGD: steps between averagings (default 8)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CPUs with AMX or AVX512-BF16) or fp32")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of alone, then pairs, alternating; medians "
                                                                "(default 1)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--predict", nargs=2, type=float, metavar=("STEP_S", "BATCH"),
                        help="only print the prediction for 2-8 nodes of 8 GPUs from one GPU's step time at BATCH")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.predict:
        return predict(args.predict[0], int(args.predict[1]))
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        sys.exit("needs root, iproute2 (ip, tc) and taskset: two network namespaces are made and removed")
    import torch
    from alexnet.runtime import resolve_precision
    amp = resolve_precision(args.precision, torch.device("cpu"), False)
    print(f"torch {torch.__version__}; {os.cpu_count()} CPUs; precision {'fp32' if amp is None else 'bf16'}; "
          f"one process per host on its own core, 1 thread, gloo; medians after {args.warmup} warm-up steps, "
          f"{args.rounds} round(s)")
    rows = []
    for batch in map(int, args.batches.split(",")):
        alone, crowded, pairs = [], [], {}
        for r in range(args.rounds):  # alone, two alone at once, then the pairs: alternating, medians at the end
            alone.append(result_of(launch(args, batch, prefix=["taskset", "-c", "0"], single=True))["single"]["step_s"])
            # a second single process on the other core at the same time: what two processes on this
            # machine's shared cache and memory cost each other, without any communication
            both = [launch(args, batch, prefix=["taskset", "-c", str(i % os.cpu_count())], single=True) for i in (0, 1)]
            crowded.append(statistics.mean(result_of(p)["single"]["step_s"] for p in both))
            print(f"batch {batch}, round {r + 1}: one process alone {alone[-1]:.2f} s a step; two at once, one a "
                  f"core, {crowded[-1]:.2f} s", flush=True)
            for rate in args.rates.split(","):
                for name, res in pair(args, batch, rate).items():
                    pairs.setdefault((rate, name), []).append(res)
                    print(f"{rate:>8s} batch {batch:4d} {name:12s} step {res['step_s']:7.2f} s, sent "
                          f"{res['bytes'] / 1e6:8.1f} MB a step (predicted {res['predicted_bytes'] / 1e6:.1f})", flush=True)
        single, busy = statistics.median(alone), statistics.median(crowded)
        for (rate, name), results in pairs.items():
            step = statistics.median(res["step_s"] for res in results)
            rows.append({"rate": rate, "batch": batch, "strategy": name, "step_s": step, "single_step_s": single,
                         "efficiency": single / step, "crowded_step_s": busy, "efficiency_crowded": busy / step,
                         "bytes": statistics.median(res["bytes"] for res in results),
                         "predicted_bytes": results[0]["predicted_bytes"], "rounds": results,
                         "alone_rounds": alone, "crowded_rounds": crowded})
    print("\n| link | batch/process | strategy | step (s) | alone (s) | efficiency | two alone at once (s) | "
          "efficiency against them | MB sent/step (measured) | predicted |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['rate']} | {r['batch']} | {r['strategy']} | {r['step_s']:.2f} | {r['single_step_s']:.2f} | "
              f"{r['efficiency']:.2f} | {r['crowded_step_s']:.2f} | {r['efficiency_crowded']:.2f} | "
              f"{r['bytes'] / 1e6:.1f} | {r['predicted_bytes'] / 1e6:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"precision": "fp32" if amp is None else "bf16", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
