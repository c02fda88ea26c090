"""The GPU speed check: at least 20,000 images generated on the machine, packed, then `alexnet bench`
at 224x224, batch 512, bf16, channels_last, compiled, against the reference pipeline, with the model FLOP
utilisation and a profile.

    python benchmarks/gpu.py [--images 20480] [--workdir /tmp/alexnet-gpu-bench] [--workers 12]
                             [--device cuda] [--batch-size 512] [--no-compile] [--rounds 3] [--steps 20]
                             [--jpeg-epochs 1]

The images are the built-in dataset's shapes drawn at 256 px and written as JPEGs (an ImageFolder, which
the reference pipeline reads), by all cores in parallel. With --jpeg-epochs N it then trains N epochs
from the JPEG files twice, decoding them on the GPU (--jpeg-decode device) and in the loader workers
(--jpeg-decode workers), and prints both training throughputs (the last epoch's: use 2 or more, so
that worker start-up and compilation are out of it). The generated images are 256x256 and at the
default --image-size 224 are read at --resize 256, so neither JPEG run resizes: photos of other sizes
cost both paths more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

from alexnet.data.synthetic import CLASSES, make_image


def _write(job: tuple[Path, str, int]) -> None:
    root, split, i = job
    img, label = make_image(0, split, i, 256)
    img.save(root / split / CLASSES[label] / f"{i:06d}.jpg", quality=90)


def generate(root: Path, train: int, val: int, workers: int) -> None:
    if (root / "COMPLETE").exists():
        return
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    jobs = [(root, "train", i) for i in range(train)] + [(root, "val", i) for i in range(val)]
    with Pool(workers) as pool:
        for _ in pool.imap_unordered(_write, jobs, chunksize=64):
            pass
    (root / "COMPLETE").write_text("generated\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20480)
    p.add_argument("--workdir", default="/tmp/alexnet-gpu-bench")
    p.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 4, 2))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--jpeg-epochs", type=int, default=0)
    a = p.parse_args()
    work = Path(a.workdir)
    start = time.perf_counter()
    generate(work / "src", a.images, 500, os.cpu_count() or 2)
    print(f"generated {a.images} + 500 images in {time.perf_counter() - start:.0f} s", flush=True)
    alexnet = [sys.executable, "-m", "alexnet"]
    subprocess.run([*alexnet, "data", "pack", str(work / "src"), str(work / "packed"), "--resize",
                    str(round(a.image_size * 256 / 224)), "--workers", str(os.cpu_count() or 2)], check=True)
    cmd = [*alexnet, "bench", "--data", str(work / "src"), "--packed", str(work / "packed"), "--device", a.device,
           "--batch-size", str(a.batch_size), "--image-size", str(a.image_size), "--precision", a.precision,
           "--workers", str(a.workers), "--rounds", str(a.rounds), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--profile", str(work / "profile"), "--json"] + ([] if a.no_compile else ["--compile"])
    print(" ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out, end="")
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"end_to_end_img_s": result["median"].get("ours/end-to-end"),
                      "ratios": result["ratios"], "mfu": result.get("mfu")}, indent=1))
    print((work / "profile" / "top-ops.txt").read_text())
    if a.jpeg_epochs:
        print(json.dumps(jpeg_paths(a, work, alexnet), indent=1))
    return 0


def jpeg_paths(a, work: Path, alexnet: list[str]) -> dict:
    """Training images/s from the JPEG files, decoded on the GPU and in the workers (the last epoch's)."""
    speeds = {}
    for decode in ("device", "workers"):
        out = work / f"jpeg-{decode}"
        shutil.rmtree(out, ignore_errors=True)  # a new run each time (a run folder with checkpoints is refused)
        cmd = [*alexnet, "train", "--data", str(work / "src"), "--out", str(out), "--device", a.device,
               "--epochs", str(a.jpeg_epochs), "--batch-size", str(a.batch_size), "--precision", a.precision,
               "--resize", str(round(a.image_size * 256 / 224)), "--crop", str(a.image_size), "--workers",
               str(a.workers), "--jpeg-decode", decode, "--quiet"] + ([] if a.no_compile else ["--compile"])
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        last = json.loads((out / "metrics.jsonl").read_text().strip().splitlines()[-1])
        speeds[f"jpeg-{decode}/img_s"] = last["images_per_sec"]
    speeds["device/workers"] = speeds["jpeg-device/img_s"] / speeds["jpeg-workers/img_s"]
    return speeds


if __name__ == "__main__":
    raise SystemExit(main())
