#!/usr/bin/env bash
# Accuracy is not traded for speed: the same seed and recipe trained through the fast path (the packed
# form, batch augmentation, channels_last, fused SGD, --precision auto: bf16 on GPUs and on CPUs with AMX
# or AVX512-BF16) and through a reference-style path (JPEG files, per-image PIL transforms, NCHW, the
# for-loop SGD update, fp32); prints each run's final and best validation top-1 and their difference.
# FAST_PRECISION=fp32 runs the fast path in fp32 too.
#
#   benchmarks/parity.sh IMAGEFOLDER [WORKDIR] [extra alexnet train flags...]
#
# Examples (what BENCHMARKS.md reports: 10 epochs on a 2-core CPU, both runs side by side):
#   benchmarks/parity.sh /data/imagenette /tmp/parity                          # 224 px, bf16 on AMX
#   FAST_PRECISION=fp32 benchmarks/parity.sh /data/imagenette /tmp/parity --resize 128 --crop 112
set -euo pipefail
data=${1:?usage: parity.sh IMAGEFOLDER [WORKDIR] [flags...]}
work=${2:-/tmp/alexnet-parity}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$work"
rm -rf "$work/fast" "$work/reference"  # new runs (a run folder with checkpoints is refused without --resume)
resize=256
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [[ ${args[i]} == --resize ]] && resize=${args[i + 1]}; done
alexnet data pack "$data" "$work/packed-$resize" --resize "$resize"
# The `fast` recipe as BENCHMARKS.md's pairs ran it (before its BatchNorm, random-resized crops, progressive
# resizing to 288 px and 352-px validation): a plain crop is what both paths, and the held crops, take.
as_measured=(--no-train-bn --no-random-resized-crop --progressive-crop 0 --crop 224 --val-every 1 --resize 256
  --val-crop 0 --global-batch-size 128 --lr 0.01 --lr-reference-batch 128)
common=(--recipe fast "${as_measured[@]}" --epochs 10 --seed 0 --threads 1 --workers 1 --quiet)
alexnet train --data "$work/packed-$resize" "${common[@]}" --precision "${FAST_PRECISION:-auto}" "$@" \
  --out "$work/fast" > "$work/fast.log" 2>&1 &
fast=$!
alexnet train --data "$data" "${common[@]}" --precision fp32 "$@" --sgd for-loop --no-channels-last \
  --out "$work/reference" > "$work/reference.log" 2>&1 &
reference=$!
wait $fast
wait $reference
python - "$work" <<'PY'
import json, sys
from pathlib import Path
runs = {}
for name in ("fast", "reference"):
    rows = [json.loads(l) for l in (Path(sys.argv[1]) / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
    runs[name] = rows
    print(f"{name:10s} final top-1 {rows[-1]['val_acc1']:.2%}  best {max(r['val_acc1'] for r in rows):.2%}  "
          f"median {sorted(r['images_per_sec'] for r in rows)[len(rows) // 2]:.0f} img/s")
d = runs["fast"][-1]["val_acc1"] - runs["reference"][-1]["val_acc1"]
print(f"difference of the final top-1: {d * 100:+.2f} points")
PY
