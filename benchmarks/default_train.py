"""Time the out-of-the-box run: `alexnet train` with no argument, dataset generation included.

Each repeat uses a fresh cache folder (so the built-in dataset is generated every time) and a fresh run
folder; prints each run's wall time and best validation top-1, then the medians.

    python benchmarks/default_train.py [--repeats 3] [--workdir /tmp/alexnet-default-bench]
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/alexnet-default-bench")
    a = p.parse_args()
    work = Path(a.workdir)
    times, accs = [], []
    for i in range(a.repeats):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = {**os.environ, "ALEXNET_CACHE": str(work / "cache")}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "alexnet", "train", "--out", str(work / "run")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"run {i + 1}: alexnet train exited {proc.returncode}")
            return 1
        rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        best = max(r["val_acc1"] for r in rows)
        times.append(seconds)
        accs.append(best)
        print(f"run {i + 1}: {seconds:.1f} s, {len(rows)} epochs, best val top-1 {best:.2%}", flush=True)
    print(f"median: {statistics.median(times):.1f} s, best val top-1 {statistics.median(accs):.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
