"""Time the out-of-the-box run: `alexnet train` with no data, for each precision and several seeds.

For each precision (fp32, and bf16 where this CPU has bf16 in hardware) and each seed, runs
`alexnet train --precision P --seed S` in a fresh run folder. The first run of each precision starts
from an empty cache folder, so the built-in dataset is generated inside its timed run, as a new user
meets it; the later runs reuse that cache. Prints each run's wall time (process start to exit) and its
final and best validation top-1, then the slowest run and the lowest final top-1 against the README's
promise (at least 90% within 300 s).

    python benchmarks/default_train.py [--seeds 0 1 2] [--precisions fp32 bf16] [--workdir DIR] [-- FLAGS]

Flags after `--` go to every `alexnet train` (to try a candidate recipe against the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from alexnet.runtime import cpu_has_bf16

PROMISE_ACC1, PROMISE_SECONDS = 0.90, 300.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_once(work: Path, precision: str, seed: int, fresh_cache: bool, extra: list[str]) -> dict:
    cache, out = work / f"cache-{precision}", work / f"run-{precision}-seed{seed}"
    if fresh_cache:
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "ALEXNET_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "alexnet", "train", "--precision", precision, "--seed", str(seed),
           "--out", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # keep the metrics, not 20 MB of weights a run
    return {"precision": precision, "seed": seed, "cold": fresh_cache, "seconds": seconds, "epochs": len(rows),
            "final": rows[-1]["val_acc1"], "best": max(r["val_acc1"] for r in rows),
            "epoch1_loss": rows[0]["train_loss"]}


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", default=None,
                   help="default: fp32, and bf16 where the CPU has it in hardware")
    p.add_argument("--workdir", default="/tmp/alexnet-default-bench")
    a = p.parse_args(argv)
    precisions = a.precisions or (["fp32", "bf16"] if cpu_has_bf16() else ["fp32"])
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}; "
          f"extra flags: {' '.join(extra) or 'none'}", flush=True)
    print("| precision | seed | cache | wall time | epochs | final top-1 | best top-1 | epoch-1 train loss |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for precision in precisions:
        for i, seed in enumerate(a.seeds):
            r = run_once(work, precision, seed, i == 0, extra)
            results.append(r)
            print(f"| {precision} | {seed} | {'cold' if r['cold'] else 'warm'} | {r['seconds']:.1f} s | {r['epochs']} "
                  f"| {r['final']:.2%} | {r['best']:.2%} | {r['epoch1_loss']:.3f} |", flush=True)
    slowest = max(r["seconds"] for r in results)
    lowest = min(r["final"] for r in results)
    ok = slowest <= PROMISE_SECONDS and lowest >= PROMISE_ACC1
    print(f"slowest run {slowest:.1f} s, lowest final top-1 {lowest:.2%}: "
          f"{'holds' if ok else 'does not hold'} the promise of {PROMISE_ACC1:.0%} within {PROMISE_SECONDS:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
