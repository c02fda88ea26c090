"""The whole process on an image folder, as a user first meets it: `alexnet train --data DIR` against the
PyTorch ImageNet example's main.py on the same folder.

    python benchmarks/first_use.py DIR --main-py PATH/TO/examples/imagenet/main.py [--rounds 2] [--epochs 2]

Each round runs, in alternating order:
- ours: `alexnet train --data DIR --epochs E --batch-size 64 --workers 2` with every other setting at its
  default, from an empty cache folder (ALEXNET_CACHE), so that packing the folder on first use is inside
  the timed run;
- ours, files: the same with `--pack no` (the folder's JPEGs decoded every epoch);
- reference: `python main.py -a alexnet -b 64 -j 2 --epochs E --lr 0.01 DIR` in a fresh folder.
Wall time from process start to exit; prints each, their medians and the ratios of the medians.
main.py is pytorch/examples' imagenet/main.py (not shipped here: pass your copy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from default_train import cpu_name  # noqa: E402


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--main-py", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", default="/tmp/first-use-bench")
    args = parser.parse_args()
    data, work = Path(args.data).resolve(), Path(args.work)
    images = sum(1 for p in (data / "train").rglob("*") if p.is_file())
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; {data}: {images} training images; "
          f"{args.epochs} epochs, batch 64, 2 loader workers, {args.rounds} rounds, alternating", flush=True)
    ours = ["alexnet", "train", "--data", str(data), "--epochs", str(args.epochs), "--batch-size", "64",
            "--workers", "2"]
    runs = {
        "ours": lambda w: timed([sys.executable, "-m", *ours, "--out", str(w / "run")], w,
                                {**os.environ, "ALEXNET_CACHE": str(w / "cache")}),
        "ours, files": lambda w: timed([sys.executable, "-m", *ours, "--pack", "no", "--out", str(w / "run")], w,
                                       {**os.environ, "ALEXNET_CACHE": str(w / "cache")}),
        "reference": lambda w: timed([sys.executable, str(Path(args.main_py).resolve()), "-a", "alexnet", "-b", "64",
                                      "-j", "2", "--epochs", str(args.epochs), "--lr", "0.01", str(data)], w,
                                     dict(os.environ)),
    }
    seconds = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            w = work / f"{name.replace(', ', '-')}-{r}"
            shutil.rmtree(w, ignore_errors=True)
            w.mkdir(parents=True)
            seconds[name].append(runs[name](w))
            shutil.rmtree(w, ignore_errors=True)
            print(f"round {r + 1}/{args.rounds}: {name:12s} {seconds[name][-1]:7.1f} s", flush=True)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    for name, m in med.items():
        print(f"median {name:12s} {m:7.1f} s")
    print(f"reference / ours: {med['reference'] / med['ours']:.2f}x; reference / ours from the files: "
          f"{med['reference'] / med['ours, files']:.2f}x; ours from the files / ours: "
          f"{med['ours, files'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
