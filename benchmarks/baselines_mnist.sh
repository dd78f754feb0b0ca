#!/usr/bin/env bash
# Issue 3 on MNIST / SimpleCNN: CUBA vs its baselines and controls (3 seeds each), the tau and
# gamma sweeps, and the Fig. 8 contrast. Every cell is a `cuba train` run folder; finished
# folders are skipped, so the script can be stopped and restarted.
#
#   bash benchmarks/baselines_mnist.sh [MNIST_NPZ] [OUT]       (defaults: ../shared/data/mnist.npz, runs/baselines)
#
# Cost on the 2-core CPU: a generator run (cuba, untargeted-ce, push-away, targeted) takes
# 13-25 min, a clean or poisoning run 4-6 min, a sweep cell (20k images, 3 epochs) ~2 min.
set -euo pipefail
DATA=${1:-../shared/data/mnist.npz}
OUT=${2:-runs/baselines}
CFG=src/cuba/configs/mnist.yaml
SEEDS="0 1 2"

train() {  # train NAME ARGS...
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && return 0
  cuba train --config "$CFG" --dataset "$DATA" --no-progress --out "$OUT/$name" "$@"
}

for s in $SEEDS; do
  train "clean-s$s" --attack none --seed "$s"
  train "cuba-fra-s$s" --seed "$s"
  train "cuba-nra2-s$s" --variant nra-2 --seed "$s"
  train "untargeted-ce-s$s" --attack untargeted-ce --seed "$s"
  train "push-away-s$s" --attack push-away --seed "$s"
  train "ubw-p-s$s" --attack ubw-p --seed "$s"
  train "badnets-s$s" --attack badnets --seed "$s"
  train "targeted-s$s" --attack targeted --seed "$s"
done
# the sweeps run on a reduced budget (20k training images, 3 epochs): 24 cells instead of 24 full runs
for s in $SEEDS; do
  for t in 0.01 0.02 0.04 0.1 0.5 1.0; do train "sweep-tau$t-s$s" --tau "$t" --seed "$s" --n-train 20000 --epochs 3; done
  for g in 1 10; do train "sweep-gamma$g-s$s" --gamma "$g" --seed "$s" --n-train 20000 --epochs 3; done
done

cuba compare "$OUT"/clean-s* "$OUT"/cuba-* "$OUT"/untargeted-ce-* "$OUT"/push-away-* "$OUT"/ubw-p-* "$OUT"/badnets-* "$OUT"/targeted-* \
  --out "$OUT" --name table --source-class 1
cuba compare "$OUT"/sweep-tau* --out "$OUT" --name sweep-tau --by tau
cuba compare "$OUT"/sweep-tau0.1-* "$OUT"/sweep-gamma* --out "$OUT" --name sweep-gamma --by gamma
