#!/usr/bin/env bash
# What the recipes reach: the `fast` recipe over two seeds, and `paper2012` and `torchvision` for the same
# number of epochs, all from scratch on one packed dataset; then each final model evaluated with the
# centre crop and with 10-crop. Runs one after another (each uses the whole machine) and every run
# resumes where it stopped (--resume auto), so the script can be stopped and started again.
# Validation during training is the centre crop (10-crop at every epoch costs ten forward passes an
# image); the 10-crop figures come from `alexnet eval --tta 10crop` on the last checkpoint.
#
#   benchmarks/accuracy.sh IMAGEFOLDER [WORKDIR] [extra alexnet train flags...]
#
# Example (the issue's measurement, Imagenette at 224 px, 30 epochs):
#   benchmarks/accuracy.sh /data/imagenette /tmp/accuracy --epochs 30
# Environment: RUNS="fast:0 fast:1 paper2012:0 torchvision:0" (recipe:seed, in order) to choose the runs.
set -euo pipefail
data=${1:?usage: accuracy.sh IMAGEFOLDER [WORKDIR] [flags...]}
work=${2:-/tmp/alexnet-accuracy}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$work"
resize=256
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [[ ${args[i]} == --resize ]] && resize=${args[i + 1]}; done
packed="$work/packed-$resize"
alexnet data pack "$data" "$packed" --resize "$resize"
runs=${RUNS:-fast:0 fast:1 paper2012:0 torchvision:0}
for run in $runs; do
  recipe=${run%%:*} seed=${run##*:}
  out="$work/$recipe-s$seed"
  if [[ ! -f $out/checkpoints/last.pt ]] || ! grep -q '"done": true' "$out/status.json" 2>/dev/null; then
    echo "training $recipe, seed $seed -> $out (log: $out.log)"
    alexnet train --data "$packed" --recipe "$recipe" --seed "$seed" --val-tta none --quiet \
      --resume auto --out "$out" "$@" >> "$out.log" 2>&1
    echo '{"done": true}' > "$out/status.json"
  fi
  for tta in none 10crop; do
    [[ -f $out/eval-$tta.json ]] || alexnet eval --checkpoint "$out/checkpoints/last.pt" --data "$packed" \
      --tta "$tta" --json > "$out/eval-$tta.json"
  done
done
python - "$work" $runs <<'PY'
import json, sys
from pathlib import Path
work, runs = Path(sys.argv[1]), sys.argv[2:]
print(f"{'run':18s} {'epochs':>6s} {'centre top-1':>12s} {'10-crop top-1':>13s}")
fast = []
for run in runs:
    recipe, seed = run.split(":")
    out = work / f"{recipe}-s{seed}"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    centre, ten = (json.loads((out / f"eval-{t}.json").read_text().strip().splitlines()[-1])["acc1"]
                   for t in ("none", "10crop"))
    print(f"{recipe + ' seed ' + seed:18s} {rows[-1]['epoch']:6d} {centre:12.2%} {ten:13.2%}")
    if recipe == "fast":
        fast.append(centre)
if fast:
    print(f"fast recipe, mean centre-crop top-1 over {len(fast)} seed(s): {sum(fast) / len(fast):.2%}")
PY
