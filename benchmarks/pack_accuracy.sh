#!/usr/bin/env bash
# Does the JPEG pack cost accuracy? The `fast` recipe for 10 epochs (its progressive resizing from epoch 5
# to 9) on IMAGEFOLDER packed at 384 as raw pixels and as JPEG (quality 90), seeds 0 and 1, one run after
# another; each run resumes where it stopped (--resume auto), so the script can be stopped and started
# again. At the end: each run's top-1 at epoch 10 (centre crop), the mean of each encoding and the gap.
#
#   benchmarks/pack_accuracy.sh IMAGEFOLDER WORKDIR [extra alexnet train flags...]
#
# Example (Imagenette, about 25 minutes a run on 2 cores):
#   benchmarks/pack_accuracy.sh /data/imagenette /tmp/pack-accuracy
set -euo pipefail
data=${1:?usage: pack_accuracy.sh IMAGEFOLDER WORKDIR [flags...]}
work=${2:?usage: pack_accuracy.sh IMAGEFOLDER WORKDIR [flags...]}
[[ $work != -* ]] || { echo "pack_accuracy.sh: the second argument is the work folder, not $work" >&2; exit 2; }
shift 2
mkdir -p "$work"
for enc in raw jpeg; do
  [[ -f $work/packed-384-$enc/packed.json ]] || alexnet data pack "$data" "$work/packed-384-$enc" --resize 384 --encoding "$enc"
done
for seed in 0 1; do
  for enc in jpeg raw; do
    out=$work/$enc-s$seed
    if [[ -f $out/metrics.jsonl ]] && grep -q '"epoch": 10,' "$out/metrics.jsonl"; then continue; fi
    alexnet train --data "$work/packed-384-$enc" --recipe fast --epochs 10 --progressive-start 5 --progressive-end 9 \
      --seed "$seed" --workers 1 --keep-last 1 --checkpoint-every 10m --resume auto --out "$out" "$@" >> "$out.log" 2>&1
  done
done
python - "$work" <<'PY'
import json, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
top1 = {}
for enc in ("raw", "jpeg"):
    for seed in (0, 1):
        rows = [json.loads(line) for line in (work / f"{enc}-s{seed}" / "metrics.jsonl").read_text().splitlines()]
        top1[enc, seed] = 100 * next(r["val_acc1"] for r in rows if r["epoch"] == 10)
        print(f"{enc:4} seed {seed}: top-1 {top1[enc, seed]:.2f}% at epoch 10")
mean = {enc: statistics.mean(top1[enc, s] for s in (0, 1)) for enc in ("raw", "jpeg")}
print(f"mean: raw {mean['raw']:.2f}%, jpeg {mean['jpeg']:.2f}%; jpeg - raw {mean['jpeg'] - mean['raw']:+.2f} points")
PY
