#!/usr/bin/env bash
# The published synthetic set at the paper's budget (20,000 student steps), tuned on the test set as the
# reference did (configs/synthetic_published.yaml), plus what the hypergradient optimizes:
#   bash benchmarks/repro_synthetic_published.sh OUTDIR [SEEDS] [WORKERS]
# About 35 minutes for 10 seeds on one CPU core (hypergrad ~2 min, forecast ~1.3 min per run).
set -euo pipefail
OUT=${1:?usage: repro_synthetic_published.sh OUTDIR [SEEDS] [WORKERS]}
SEEDS=${2:-10}
WORKERS=${3:-1}
export OMP_NUM_THREADS=1
metakd experiment configs/synthetic_published.yaml train.epochs=20000 train.eval_every=1000 \
  train.log_every=200 train.checkpoint_every=10000 meta.optimizer=adam meta.lr=0.01 \
  --methods baseline,random,hypergrad,forecast --seeds "$SEEDS" --workers "$WORKERS" \
  --device cpu --wandb disabled --quiet --out "$OUT" > /dev/null
metakd report "$OUT" --out "$OUT/report" > /dev/null
python "$(dirname "${BASH_SOURCE[0]}")/synthetic_objective.py" "$OUT"
