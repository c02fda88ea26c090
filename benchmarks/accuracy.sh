#!/usr/bin/env bash
# What the recipes reach: the `fast` recipe over two seeds, and `paper2012` and `torchvision` for the same
# number of epochs, all from scratch on the data packed at each recipe's resize; then each final model
# evaluated with the centre crop and with 10-crop. Runs one after another (each uses the whole machine) and every run
# resumes where it stopped (--resume auto), so the script can be stopped and started again.
# Validation during training is the centre crop (10-crop at every epoch costs ten forward passes an
# image); the 10-crop figures come from `alexnet eval --tta 10crop` on the last checkpoint.
#
#   benchmarks/accuracy.sh IMAGEFOLDER WORKDIR [extra alexnet train flags...]
#
# Example (the issue's measurement, Imagenette at 224 px, 30 epochs):
#   benchmarks/accuracy.sh /data/imagenette /tmp/accuracy --epochs 30
# Environment: RUNS="fast:0 fast:1 paper2012:0 torchvision:0" (recipe:seed, in order) to choose the runs;
# PARALLEL=1 to train them all at once (on a GPU with room for several; give each fewer --workers).
set -euo pipefail
data=${1:?usage: accuracy.sh IMAGEFOLDER WORKDIR [flags...]}
work=${2:?usage: accuracy.sh IMAGEFOLDER WORKDIR [flags...]}
[[ $work != -* ]] || { echo "accuracy.sh: the second argument is the work folder, not $work" >&2; exit 2; }
shift 2
mkdir -p "$work"
resize=
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in --resize) resize=${args[i + 1]:?--resize needs a value} ;; --resize=*) resize=${args[i]#--resize=} ;; esac
done
here=$(cd "$(dirname "$0")/.." && pwd)

packed_for() {  # recipe: the data packed at the recipe's resize (or --resize's), packed once per size
  local size=$resize
  [[ -n $size ]] || size=$(sed -n 's/^resize: *"\{0,1\}\([0-9x]*\)"\{0,1\}.*/\1/p' "$here/configs/$1.yaml")
  local out="$work/packed-${size:-256}"
  alexnet data pack "$data" "$out" --resize "${size:-256}" >&2
  echo "$out"
}

finished() {  # the run's last epoch is the last its config asks for
  python - "$1" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    epochs = next(int(l.split(":", 1)[1]) for l in (out / "config.yaml").read_text().splitlines()
                  if l.startswith("epochs:"))
    last = json.loads((out / "metrics.jsonl").read_text().strip().splitlines()[-1])["epoch"]
except (OSError, StopIteration, IndexError, ValueError, KeyError):
    sys.exit(1)
sys.exit(0 if last >= epochs else 1)
PY
}

runs=${RUNS:-fast:0 fast:1 paper2012:0 torchvision:0}

train() {  # recipe seed: train the run unless it is finished
  local recipe=$1 seed=$2 out="$work/$1-s$2" source
  finished "$out" && return 0
  # RandomResizedCrop (the torchvision recipe) is taken from the original images, not the packed ones
  if [[ $recipe == torchvision ]]; then source=$data; else source=$(packed_for "$recipe"); fi
  echo "training $recipe, seed $seed -> $out (log: $out.log)"
  rm -f "$out"/eval-*.json
  alexnet train --data "$source" --recipe "$recipe" --seed "$seed" --val-tta none --quiet \
    --resume auto --out "$out" "${args[@]}" >> "$out.log" 2>&1 ||
    { echo "$recipe seed $seed failed (see $out.log)" >&2; return 1; }
  finished "$out" || { echo "$recipe seed $seed stopped before its last epoch (see $out.log)" >&2; return 1; }
}

# PARALLEL=1: all runs at once (a large GPU has room for several); otherwise one after another
if [[ ${PARALLEL:-0} == 1 ]]; then
  pids=()
  for run in $runs; do train "${run%%:*}" "${run##*:}" & pids+=($!); done
  failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  ((failed == 0)) || exit 1
else
  for run in $runs; do train "${run%%:*}" "${run##*:}" || exit 1; done
fi
for run in $runs; do
  out="$work/${run%%:*}-s${run##*:}" source=
  for tta in none 10crop; do
    if [[ ! -s $out/eval-$tta.json ]]; then
      [[ -n $source ]] || source=$(packed_for "${run%%:*}")  # its check of the packed copy takes seconds
      alexnet eval --checkpoint "$out/checkpoints/last.pt" --data "$source" --tta "$tta" --json > "$out/eval.tmp"
      mv "$out/eval.tmp" "$out/eval-$tta.json"
    fi
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
