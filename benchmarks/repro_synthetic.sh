#!/usr/bin/env bash
# The synthetic reproduction of docs/reproduction.md, on a CPU:
#   bash benchmarks/repro_synthetic.sh OUTDIR [SEEDS] [EPOCHS] [WORKERS]
# 1. the published dataset (numpy seed 42) with the reference's protocol (tune on the test set);
# 2. fresh datasets (one per seed) with validation separate from test (the default protocol);
# 3. the same fresh datasets tuned on the test set (the reference's protocol).
# Then one report over all of them.
set -euo pipefail
OUT=${1:?usage: repro_synthetic.sh OUTDIR [SEEDS] [EPOCHS] [WORKERS]}
SEEDS=${2:-10}
EPOCHS=${3:-20000}
WORKERS=${4:-2}
METHODS=${METHODS:-baseline,random,hypergrad,forecast}
COMMON=(train.epochs="$EPOCHS" train.eval_every=1000 train.log_every=50 train.checkpoint_every=5000
        meta.optimizer=adam meta.lr=0.01 ${EXTRA:-})
run() { metakd experiment "$@" --methods "$METHODS" --seeds "$SEEDS" --workers "$WORKERS" --wandb disabled --quiet; }
run configs/synthetic_published.yaml "${COMMON[@]}" --out "$OUT/published"
run configs/synthetic.yaml "${COMMON[@]}" --out "$OUT/fresh"
run configs/synthetic.yaml data.val_is_test=true "${COMMON[@]}" --out "$OUT/fresh-valtest"
for d in published fresh fresh-valtest; do metakd report "$OUT/$d" --out "$OUT/report-$d" > /dev/null; done
