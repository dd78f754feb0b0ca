#!/usr/bin/env bash
# Table II's RGB rows on one GPU, in as many calls as it takes (issue 16, point 5): the `gpu` grid
# (src/cuba/configs/grids/gpu.yaml) -- GTSRB / PreActResNet18, CIFAR-10 / ResNet18 (on the lossy
# cifar10-jpeg copy when no CIFAR-10 is local) and CIFAR-100 / ResNet18, each CUBA FRA, NRA-5, NRA-2
# and the clean baseline, seed 0, at the paper's schedule (50 / 100 / 100 epochs), bf16, data
# resident on the GPU -- then table2.{md,csv,tex} and report.html of what is finished.
#
# TARGET: <= 10 minutes per cell on one H100-class GPU. NOT YET MEASURED (no session so far had a GPU).
#
# Usage:  bash benchmarks/gpu_table2.sh [BUDGET_S]
#   Trains for at most BUDGET_S seconds (default 540, under a 10-minute command cap), then stops
#   cleanly: `timeout` sends SIGTERM, `cuba reproduce` stops the running cell (it keeps its last
#   checkpoint, written every epoch), writes table2 / report.html of the finished cells and exits.
#   Call again with the same RUNS folder until it prints "finished"; every call resumes where the
#   last one stopped. Cells whose data set has no local copy (CIFAR-100 here) are reported
#   "blocked" in table2 / report.html and do not hold up "finished".
#
# With the device tool (at most 64 MiB carried per call, 10 minutes per command, 15 minutes of
# device time per session; data/ and runs/ are git-ignored, so they stay on the warm machine
# between calls, and a fresh machine starts with neither):
#   here:   mkdir -p data && split -n 2 -d ../shared/data/gtsrb.npz data/gtsrb.npz.part- \
#             && sha256sum ../shared/data/gtsrb.npz | cut -d' ' -f1 > data/gtsrb.npz.sha256
#   device: run(command="ls data", carry=["data/gtsrb.npz.part-00", "data/gtsrb.npz.sha256"])
#           run(command="ONLY='gtsrb-*-cuba-fra-*' bash benchmarks/gpu_table2.sh 500",
#               carry=["data/gtsrb.npz.part-01"], timeout_s=590)     # reassembles gtsrb.npz first
#   (cifar10-jpeg.zip, 61 MiB, goes alone in a later call: carry=["data/cifar10-jpeg.zip"].)
#   Results come back under $OUT: table2.*, report.html, cells.txt (each cell's state), reproduce.log.
#
# On a GPU machine of your own: cuba reproduce gpu --out runs/gpu-table2 --data-dir DATA is the
# same without the budget; add --download where there is a network (CIFAR-100).
#
# Knobs (environment): RUNS (grid folder, default runs/gpu-table2), DATA_DIR (default data),
# OUT (results, default gpu-out), GRID (default gpu), ONLY (space-separated cell globs),
# SET (space-separated FIELD=VALUE for every cell), DOWNLOAD=1 (torchvision downloads),
# e.g. to try the plumbing on a CPU:
#   SET="device=cpu precision=fp32 epochs=0.05 n_train=256 n_test=256" bash benchmarks/gpu_table2.sh 300
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # progress lines every 30 s: logs stay readable
BUDGET_S=${1:-${BUDGET_S:-540}}
case "$BUDGET_S" in ''|*[!0-9]*) echo "BUDGET_S must be a whole number of seconds, got '$BUDGET_S'"; exit 2;; esac
RUNS=${RUNS:-runs/gpu-table2}
DATA_DIR=${DATA_DIR:-data}
OUT=${OUT:-gpu-out}
GRID=${GRID:-gpu}
mkdir -p "$OUT" "$RUNS"

# gtsrb.npz (118 MiB) travels in parts: put it together once all parts and its checksum are here
if [ ! -f "$DATA_DIR/gtsrb.npz" ] && compgen -G "$DATA_DIR/gtsrb.npz.part-*" > /dev/null; then
  if [ -f "$DATA_DIR/gtsrb.npz.sha256" ]; then
    cat "$DATA_DIR"/gtsrb.npz.part-* > "$DATA_DIR/gtsrb.npz.tmp"
    if [ "$(sha256sum "$DATA_DIR/gtsrb.npz.tmp" | cut -d' ' -f1)" = "$(cat "$DATA_DIR/gtsrb.npz.sha256")" ]; then
      mv "$DATA_DIR/gtsrb.npz.tmp" "$DATA_DIR/gtsrb.npz" && rm -f "$DATA_DIR"/gtsrb.npz.part-* && echo "gtsrb.npz reassembled"
    else
      rm -f "$DATA_DIR/gtsrb.npz.tmp"; echo "gtsrb.npz parts incomplete or damaged (checksum differs): GTSRB stays blocked"
    fi
  else
    echo "gtsrb.npz parts found but no gtsrb.npz.sha256 to check them against: GTSRB stays blocked"
  fi
fi

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
ARGS=(reproduce "$GRID" --out "$RUNS" --data-dir "$DATA_DIR")
set -f  # cell globs and values are passed on as written, never expanded against file names here
for g in ${ONLY:-}; do ARGS+=(--only "$g"); done
for s in ${SET:-}; do ARGS+=(--set "$s"); done
set +f
[ "${DOWNLOAD:-0}" = 1 ] && ARGS+=(--download)

start=$(date +%s)
# SIGTERM at the budget; SIGKILL 60 s later only if the tables could not be written by then
timeout --kill-after=60 --signal=TERM "$BUDGET_S" python3 -m cuba "${ARGS[@]}" 2>&1 | tee -a "$RUNS/reproduce.log" | tail -n 60
rc=${PIPESTATUS[0]}
echo "cuba reproduce: exit $rc after $(( $(date +%s) - start )) s (budget $BUDGET_S s)"

python3 -m cuba "${ARGS[@]}" --dry-run > "$RUNS/cells.txt" 2>&1
for f in table2.md table2.csv table2.tex report.html reproduce.log cells.txt; do
  [ -f "$RUNS/$f" ] && cp "$RUNS/$f" "$OUT/"
done
cat "$RUNS/cells.txt"
if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 130 ]; then
  echo "failed (exit $rc): see $RUNS/reproduce.log"; exit "$rc"
fi
if grep -q -e '\[to run' -e '\[trained;' "$RUNS/cells.txt"; then
  echo "not finished yet: call again to resume"
else
  echo "finished${ONLY:+ (the cells matching ONLY=$ONLY)}"
fi
