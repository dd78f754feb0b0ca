#!/usr/bin/env bash
# Issue 4 on MNIST / SimpleCNN: the five defenses on clean, badnets, targeted, CUBA FRA and
# CUBA NRA-2 models (seed 0 of benchmarks/baselines_mnist.sh), then the defenses x models table.
#
#   bash benchmarks/defenses_mnist.sh [RUNS]        (default runs/baselines)
set -euo pipefail
RUNS=${1:-runs/baselines}
MODELS="clean-s0 badnets-s0 targeted-s0 cuba-fra-s0 cuba-nra2-s0"
for m in $MODELS; do
  [ -f "$RUNS/$m/defenses/nad/defense.json" ] || cuba defend all "$RUNS/$m"
done
cuba defense-table $(for m in $MODELS; do echo "$RUNS/$m"; done) --names clean,badnets,targeted,cuba-fra,cuba-nra2 \
  --out "$RUNS/defense-table.md"
