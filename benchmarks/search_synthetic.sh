#!/usr/bin/env bash
# The side-by-side study on the synthetic task (docs/reproduction.md, "Search baselines"): grid (9
# points), random (8 trials) and TPE (8 trials) on seed 0, each one's validation-chosen λ retrained on
# seeds 0-4, against the metakd pipeline (hypergradient finder, then a fixed-λ retrain) on seeds 0-4.
# Shortened runs (train.epochs=3000 instead of 20,000), one torch thread, two processes at a time.
# Resumable: rerun the same command to continue (finished runs and trials are kept).
#   bash benchmarks/search_synthetic.sh OUT [EPOCHS] [FINDER_EPOCHS]
set -euo pipefail
mkdir -p "$(dirname "${1:-runs/search-synthetic}")"
OUT=${1:-runs/search-synthetic}
EPOCHS=${2:-3000}
FINDER=${3:-500}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled
C=(configs/synthetic.yaml "train.epochs=$EPOCHS" device=cpu)
S=(--retrain-seeds 0,1,2,3,4 --wandb disabled -q)
metakd search "${C[@]}" --sampler grid --trials 9 --grid beta1_share=0.01,0.1,0.5 --grid temperature=1,4,8 \
  "${S[@]}" --out "$OUT/grid" > "$OUT.grid.log" 2>&1 &
metakd search "${C[@]}" --sampler random --trials 8 "${S[@]}" --out "$OUT/random" \
  > "$OUT.random.log" 2>&1
wait
metakd search "${C[@]}" --sampler tpe --trials 8 "${S[@]}" --out "$OUT/tpe" > "$OUT.tpe.log" 2>&1 &
metakd search "${C[@]}" --sampler hypergrad --finder-epochs "$FINDER" "${S[@]}" --out "$OUT/metakd" \
  > "$OUT.metakd.log" 2>&1
wait
# the pipeline with a scale-free meta-optimizer (the default meta SGD, lr 1, barely moves λ in 500 steps)
metakd search "${C[@]}" meta.optimizer=adam meta.lr=0.05 --sampler hypergrad --finder-epochs "$FINDER" \
  "${S[@]}" --out "$OUT/metakd-adam" > "$OUT.metakd-adam.log" 2>&1
python benchmarks/search_table.py "$OUT/grid" "$OUT/random" "$OUT/tpe" "$OUT/metakd" "$OUT/metakd-adam" \
  --figure "$OUT/search.png"
