#!/bin/bash
# Start or continue the 30-epoch paper2012 run on Imagenette at 224 px (seed 0), at low priority.
# Needs Imagenette packed at 256 in /tmp/px/in256 (made here if missing: about a minute).
set -e
cd /work/main && . .venv/bin/activate
if [ ! -f /tmp/px/in256/packed.json ]; then
  mkdir -p /tmp/px
  [ -d /tmp/px/imagenette ] || tar xzf /work/shared/data/imagenette-224.tar.gz -C /tmp/px
  alexnet data pack /tmp/px/imagenette /tmp/px/in256 --resize 256
fi
exec nice -n 19 alexnet train --data /tmp/px/in256 --recipe paper2012 --seed 0 --epochs 30 --val-tta none \
  --checkpoint-every 10m --keep-last 2 --resume auto --out /work/runs/paper2012-224-seed0 \
  >> /work/runs/paper2012-224-seed0.log 2>&1
