"""Random-resized crops from packed data: the batch path (PIL resizes each drawn box to uint8 in the
loader, the batch is normalised at once) against the per-image transforms, data path alone, in one
process, alternating, medians.

    alexnet data pack DIR packed --resize 256
    python benchmarks/rrc_batch_path.py packed [--resize 256] [--crop 224] [--batches 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from alexnet.config import TrainConfig
from alexnet.data import make_loader, packed
from alexnet.data.transforms import eval_transform, train_transform
from alexnet.train.plan import augmentation


def images_per_second(root: str, cfg: TrainConfig, batch_on: bool, batches: int, batch_size: int) -> float:
    transforms = (train_transform(**augmentation(cfg)), eval_transform(cfg.resize, cfg.crop, cfg.mean, cfg.std))
    train = packed.open_splits(root, cfg.resize, *transforms, 0, batch_on=batch_on)[0]
    assert (train.batch is not None) == batch_on
    it = iter(make_loader(train, batch_size, 0, train=True, device_type="cpu"))
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)[1])
    return n / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a packed dataset (alexnet data pack)")
    p.add_argument("--resize", default="256")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--min-scale", type=float, default=0.35)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(resize=a.resize, crop=a.crop, random_resized_crop=True, rrc_min_scale=a.min_scale)
    rates = {"per-image": [], "batch": []}
    for _ in range(a.repeats):
        for name in rates:
            rates[name].append(images_per_second(a.data, cfg, name == "batch", a.batches, a.batch_size))
    for name, r in rates.items():
        print(f"{name}: {', '.join(f'{x:.0f}' for x in r)} img/s; median {statistics.median(r):.0f}")
    ratio = statistics.median(rates["batch"]) / statistics.median(rates["per-image"])
    print(f"batch path / per-image: {ratio:.2f}x (one process, one thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
