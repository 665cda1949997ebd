#!/usr/bin/env bash
# The forecaster comparison of docs/forecasting.md on the synthetic task (fresh datasets, one per seed):
#   bash benchmarks/repro_forecasters.sh OUTDIR [SEEDS] [EPOCHS] [WORKERS]
set -euo pipefail
OUT=${1:?usage: repro_forecasters.sh OUTDIR [SEEDS] [EPOCHS] [WORKERS]}
SEEDS=${2:-5}
EPOCHS=${3:-5000}
WORKERS=${4:-1}
COMMON=(train.epochs="$EPOCHS" train.eval_every=1000 train.log_every=50 train.checkpoint_every=5000
        meta.optimizer=adam meta.lr=0.01)
exp() { metakd experiment configs/forecasters.yaml "${COMMON[@]}" "$@" --seeds "$SEEDS" --workers "$WORKERS" --wandb disabled --quiet; }
exp --methods baseline,hypergrad --out "$OUT/hypergrad"
for f in linear spline ema last; do
  exp forecast.forecaster="$f" --methods forecast --out "$OUT/forecast-$f"
done
