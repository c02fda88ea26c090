"""The raw pack against the JPEG pack of one image folder: size, packing rate, decode rate, end to end.

    python benchmarks/packs.py SRC [--work DIR] [--resize 256] [--quality 90] [--rounds 5] [--workers N]
    python benchmarks/packs.py --make-imagenet-like DIR --from SRC [--images 2000]

For SRC (an ImageFolder with train/ and a validation folder) it
1. packs SRC as raw pixels and as JPEG (`alexnet data pack`, fresh, --workers N: the cores by default) and
   prints bytes per image and images packed per second, wall time of the whole command;
2. decodes 1,000 stored training images of each pack in this process on one thread (the loader worker's
   work per image: a slice of the memory map, and for the JPEG pack libjpeg-turbo's decode) and prints
   images per second per core, with the JPEG pack's mean absolute error against the raw pack's pixels
   (the raw pack holds the source images resized, exactly);
3. runs `alexnet bench --pipelines ours` on each pack, alternating raw and JPEG, --rounds times (one round
   per command), each at its defaults (the raw pack held in memory as training holds it, the JPEG pack on
   a CPU decoded by the main process where the loader workers would share the model's cores), and the
   JPEG pack again under `--jpeg-decode workers` (decoded by the loader workers); prints the median
   images/s of the data path, the model step and end to end, end to end as a ratio to the model step, and
   each JPEG run's end to end over the raw pack's.

--make-imagenet-like writes an ImageNet-like folder of JPEGs of 500x375 (ImageNet's most common size),
quality 90, from the photos of SRC (each enlarged and centre-cropped to 4:3), --images of them split
9:1 into train/ and val/ with SRC's classes.
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

import numpy as np
import torch
from PIL import Image

from alexnet.data import packed
from alexnet.data.images import is_image_name

sys.path.insert(0, str(Path(__file__).parent))
from default_train import cpu_name  # noqa: E402


def make_imagenet_like(out: Path, src: Path, images: int) -> None:
    files = sorted(p for p in (src / "train").rglob("*") if is_image_name(p.name))
    step = max(len(files) // images, 1)
    for k, path in enumerate(files[::step][:images]):
        split = "val" if k % 10 == 9 else "train"
        folder = out / split / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            crop = img.crop((0, (h - w * 3 // 4) // 2, w, (h - w * 3 // 4) // 2 + w * 3 // 4)) if h > w * 3 // 4 else img
            crop.resize((500, 375), Image.BICUBIC).save(folder / f"{path.stem}.jpg", quality=90)
    print(f"wrote {min(images, len(files[::step]))} JPEGs of 500x375 into {out}")


def pack(src: Path, out: Path, args, encoding: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "alexnet", "data", "pack", str(src), str(out), "--resize", args.resize,
           "--workers", str(args.workers), "--encoding", encoding, "--quality", str(args.quality)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    meta = packed.read_meta(out)
    images = sum(s["images"] for s in meta["splits"].values())
    size = sum(s["bytes"] for s in meta["splits"].values())
    return {"encoding": encoding, "images": images, "bytes": size, "bytes_per_image": size / images,
            "seconds": seconds, "pack_rate": images / seconds}


def decode_rate(pack_dir: Path, n: int) -> tuple[float, list[np.ndarray]]:
    torch.set_num_threads(1)
    ds = packed.PackedSplit(pack_dir, "train", None)
    picks = np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int)
    for i in picks[:20]:  # warm the page cache and the decoder
        np.array(ds.pixels(i))
    start = time.perf_counter()
    pixels = [np.array(ds.pixels(i)) for i in picks]
    return len(picks) / (time.perf_counter() - start), pixels


RUNS = {"raw": ("raw", "auto"), "jpeg": ("jpeg", "auto"), "jpeg, workers": ("jpeg", "workers")}


def bench(src: Path, pack_dir: Path, jpeg_decode: str) -> dict:
    cmd = [sys.executable, "-m", "alexnet", "bench", "--data", str(src), "--packed", str(pack_dir),
           "--pipelines", "ours", "--rounds", "1", "--jpeg-decode", jpeg_decode, "--json"]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["median"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="?")
    parser.add_argument("--work", default="/tmp/packs-bench")
    parser.add_argument("--resize", default="256")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode", type=int, default=1000, help="images decoded for the per-core rate")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--make-imagenet-like", metavar="DIR")
    parser.add_argument("--from", dest="from_", metavar="SRC")
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    if args.make_imagenet_like:
        return make_imagenet_like(Path(args.make_imagenet_like), Path(args.from_), args.images)
    src, work = Path(args.src), Path(args.work)
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; {src}, --resize {args.resize}, "
          f"JPEG quality {args.quality}, packing with {args.workers} workers")
    packs = {}
    for encoding in ("raw", "jpeg"):
        packs[encoding] = pack(src, work / encoding, args, encoding)
        p = packs[encoding]
        print(f"{encoding:5s} pack: {p['images']} images, {p['bytes'] / 2**20:.1f} MiB, "
              f"{p['bytes_per_image'] / 1024:.1f} KiB an image, packed at {p['pack_rate']:.0f} images/s")
    print(f"JPEG pack / raw pack size: 1/{packs['raw']['bytes'] / packs['jpeg']['bytes']:.1f}")
    rates, pixels = {}, {}
    for encoding in ("raw", "jpeg"):
        rates[encoding], pixels[encoding] = decode_rate(work / encoding, args.decode)
        print(f"{encoding:5s} pack: {rates[encoding]:.0f} images/s per core read (and decoded) from the pack")
    errors = [np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() for a, b in zip(pixels["raw"], pixels["jpeg"])]
    print(f"JPEG pack against the raw pack's pixels: mean absolute error {np.mean(errors):.2f} levels "
          f"(per image: median {np.median(errors):.2f}, 99th percentile {np.percentile(errors, 99):.2f}, "
          f"largest {max(errors):.2f})")
    runs = {name: [] for name in RUNS}
    for r in range(args.rounds):
        for name in (list(RUNS) if r % 2 == 0 else list(RUNS)[::-1]):
            encoding, decode = RUNS[name]
            runs[name].append(bench(src, work / encoding, decode))
            m = runs[name][-1]
            print(f"round {r + 1}/{args.rounds} {name:13s}: data {m['ours/data']:.1f}, model "
                  f"{m['ours/model']:.1f}, end to end {m['ours/end-to-end']:.1f} img/s", flush=True)
    med = {e: {k: statistics.median(m[k] for m in runs[e]) for k in runs[e][0]} for e in runs}
    print(f"{'median img/s':14s}{'data':>10s}{'model':>10s}{'end to end':>12s}{'e2e / model':>13s}")
    for e in RUNS:
        m = med[e]
        print(f"{e:14s}{m['ours/data']:10.1f}{m['ours/model']:10.1f}{m['ours/end-to-end']:12.1f}"
              f"{m['ours/end-to-end'] / m['ours/model']:13.2f}")
    for e in ("jpeg", "jpeg, workers"):
        print(f"end to end, {e} / raw: {med[e]['ours/end-to-end'] / med['raw']['ours/end-to-end']:.2f}")


if __name__ == "__main__":
    main()
