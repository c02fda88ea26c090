#!/usr/bin/env bash
# What local SGD costs in accuracy: the `fast` recipe for 10 epochs on 2 processes of this machine, the
# gradients all-reduced every step (synchronous) against local SGD (--local-sgd-period H after
# --local-sgd-warmup synchronous steps), seeds 0 and 1; prints each run's final top-1, the mean of each
# strategy over the seeds, the spread between the seeds and the difference of the means. Runs one after
# another (each uses the whole machine) and each resumes where it stopped (--resume auto).
#
#   benchmarks/local_sgd.sh PACKED_DIR WORKDIR [extra alexnet train flags...]
#
# Example (BENCHMARKS.md, "Local SGD: what it costs in accuracy"; 2-core CPU, so at 112 px):
#   alexnet data pack /data/imagenette /tmp/in128 --resize 128
#   benchmarks/local_sgd.sh /tmp/in128 /tmp/local-sgd --resize 128 --crop 112 --val-crop 112
# Environment: PERIOD (8), WARMUP (synchronous steps first; 294, the recipe's 2 warm-up epochs at a global
# batch of 64 on Imagenette), SEEDS ("0 1"), PARALLEL_FLAG (ddp: the whole model averaged; hybrid: the
# convolutions averaged, the fully connected layers model-parallel and synchronous).
set -euo pipefail
data=${1:?usage: local_sgd.sh PACKED_DIR WORKDIR [flags...]}
work=${2:?usage: local_sgd.sh PACKED_DIR WORKDIR [flags...]}
shift 2
period=${PERIOD:-8}
warmup=${WARMUP:-294}
mkdir -p "$work"
common=(--data "$data" --recipe fast --epochs 10 --progressive-crop 0 --nproc-per-node 2 --threads 1 --workers 1
  --parallel "${PARALLEL_FLAG:-ddp}" --resume auto --quiet)
for seed in ${SEEDS:-0 1}; do
  for mode in sync local; do
    extra=()
    [[ $mode == local ]] && extra=(--local-sgd-period "$period" --local-sgd-warmup "$warmup")
    out="$work/$mode-seed$seed"
    if [[ -f $out/done ]]; then continue; fi
    echo "$(date +%T) $mode seed $seed -> $out"
    alexnet train "${common[@]}" --seed "$seed" "${extra[@]}" "$@" --out "$out" > "$work/$mode-seed$seed.log" 2>&1
    touch "$out/done"
  done
done
python - "$work" "${SEEDS:-0 1}" <<'PY'
import json, statistics, sys
from pathlib import Path
work, seeds = Path(sys.argv[1]), sys.argv[2].split()
final = {}
for mode in ("sync", "local"):
    for seed in seeds:
        rows = [json.loads(l) for l in (work / f"{mode}-seed{seed}" / "metrics.jsonl").read_text().splitlines()
                if l.strip()]
        rows = [r for r in rows if r.get("val_acc1") is not None]
        final[mode, seed] = rows[-1]["val_acc1"] * 100
        print(f"{mode:5s} seed {seed}: final top-1 {final[mode, seed]:.2f}%  ({rows[-1]['epoch']} epochs)")
means = {}
for mode in ("sync", "local"):
    values = [final[mode, s] for s in seeds]
    means[mode] = statistics.mean(values)
    print(f"{mode:5s} mean {means[mode]:.2f}%  spread between seeds {max(values) - min(values):.2f} points")
print(f"local - sync: {means['local'] - means['sync']:+.2f} points")
PY
