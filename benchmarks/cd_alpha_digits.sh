#!/bin/bash
# Cognitive Distillation's BadNets positive control on the bundled digits, at three sparsity weights
# (alpha 0.01 = the paper's default, 0.05, 0.2), two seeds: why CD misses it (BENCHMARKS.md, "Why
# Cognitive Distillation misses the BadNets control on digits"). About 3 min on one CPU thread.
#   bash benchmarks/cd_alpha_digits.sh [OUT]     (default runs/cd-digits)
#   BETA=10 bash benchmarks/cd_alpha_digits.sh    the smoothness weight of the first table (the default then)
set -euo pipefail
OUT=${1:-runs/cd-digits}
BETA=${BETA:-1}
for s in 0 1; do
  cuba train --dataset digits --attack badnets --epochs 8 --batch-size 64 --lr 0.05 --precision fp32 --seed "$s" \
    --out "$OUT/badnets-s$s"
  for a in 0.01 0.05 0.2; do
    cuba defend cognitive-distillation "$OUT/badnets-s$s" --set alpha=$a --set beta=$BETA --out "$OUT/badnets-s$s/cd-alpha$a"
  done
done
