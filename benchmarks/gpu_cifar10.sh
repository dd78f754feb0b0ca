#!/usr/bin/env bash
# The paper's CIFAR-10 / ResNet18 CUBA FRA row trained in full on one GPU (issue 5's GPU point),
# on the cifar10-jpeg copy, plus `cuba bench` on that GPU. For a session lent a GPU through the
# device tool, which copies the checkout (64 MiB at most) and caps one command at 10 minutes:
#
#   here:    mkdir -p data && cp ../shared/data/cifar10-jpeg.zip data/      # /data/ is git-ignored
#   device:  run(command="bash benchmarks/gpu_cifar10.sh", carry=["data"])  # again at once until it
#            prints "finished": every call resumes the run from its last checkpoint (runs/ is ignored,
#            so it stays on the warm machine between calls; a fresh machine starts over)
#
# Needs no install on the device image (torch, torchvision, safetensors, scikit-image, ... are
# there); the package runs from src/. Knobs: EPOCHS (default: the preset's 100), BUDGET_S (seconds
# this call may train, default 540), EXTRA (more train flags), BENCH=0 to skip the bench. Results: $OUT (or ./gpu-out):
# metrics.json, history.json, config.yaml, status.json, train.log, bench.json, the run's figures.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
RUN=runs/gpu-cifar10-resnet18-fra
DATA=${DATA:-data/cifar10-jpeg.zip}
[ -f "$DATA" ] || { echo "no $DATA: copy ../shared/data/cifar10-jpeg.zip into data/ and carry it"; exit 2; }
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [ "${BENCH:-1}" = 1 ] && [ ! -f "$OUT/bench.json" ] && [ ! -f "$RUN/bench.json" ]; then
  mkdir -p "$RUN" && python3 -m cuba bench --json > "$RUN/bench.json" && cat "$RUN/bench.json"
fi
mkdir -p "$RUN"
ARGS=(--config src/cuba/configs/cifar10.yaml --dataset "$DATA" --variant fra --out "$RUN" --checkpoint-every 1)
[ -n "${EPOCHS:-}" ] && ARGS+=(--epochs "$EPOCHS")
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && ARGS+=($EXTRA)   # e.g. EXTRA="--n-train 512 --n-test 256" to try the script on a CPU
# stop before the device's 10-minute cap; the checkpoint of the last whole epoch is kept
timeout --signal=INT "${BUDGET_S:-540}" python3 -m cuba train "${ARGS[@]}" 2>&1 | tee -a "$RUN/train.log" | tail -n 40
for f in metrics.json history.json config.yaml status.json train.log bench.json figures/triggers.png figures/confidences.png; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"
done
if grep -q '"finished"' "$RUN/status.json" 2>/dev/null; then echo "finished"; else echo "not finished yet: call again to resume"; fi
