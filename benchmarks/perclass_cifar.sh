#!/usr/bin/env bash
# Issue 22 item 5: many metaparameters on the CIFAR-10 protocol — a per-class β1, β2 and T (3 × 10 = 30
# metaparameters: sample i uses the entries of its label y_i) tuned by the metakd pipeline, against the
# 3-parameter results of the search study (benchmarks/search_cifar.sh: same config, teacher, protocol).
# The finder is the one of the 3-parameter pipeline (benchmarks/search_cifar.sh STEP metakd: reverse
# hypergradient, η = 20, a meta step every 20 steps, meta Adam lr 0.15, from the common KD setting — here
# every class at β1 0.1, β2 0.9, T 4 — for FINDER epochs, default 20; its cost does not grow with H,
# docs/hypergradients.md), then a fixed-λ retrain at the per-class λ it found, on seeds 0-4. The control
# is that 3-parameter pipeline itself: STEP scalar re-reads its committed report
# (docs/reproduction/search-cifar/metakd) with the same settings, so nothing is retrained unless that
# report is missing; the two rows then differ only in "30 metaparameters instead of 3".
#   bash benchmarks/perclass_cifar.sh OUT TEACHER [FINDER_EPOCHS] [STEP]
# STEP: all | perclass | scalar | table | commit. Resumable like search_cifar.sh: rerun a step to continue
# it; `commit` copies the reports to $IMPORT (default docs/reproduction/perclass-cifar) and every step
# continues from the report there (`metakd search --import-results`).
set -euo pipefail
OUT=${1:?usage: perclass_cifar.sh OUT TEACHER [FINDER_EPOCHS] [STEP]}
TEACHER=${2:?the cifar_tiny teacher checkpoint, e.g. runs/cpu100/teacher.pt}
FINDER=${3:-20}
SCALAR=${SCALAR:-docs/reproduction/search-cifar/metakd}
STEP=${4:-all}
IMPORT=${IMPORT:-docs/reproduction/perclass-cifar}
export OMP_NUM_THREADS=1 WANDB_MODE=disabled MPLBACKEND=Agg
C=(configs/cifar10.yaml "teacher.checkpoint=$TEACHER" train.epochs=100 train.checkpoint_every=5
   train.normalize_weights=true device=cpu train.eval_every=790
   meta.hypergrad.method=reverse meta.unroll=20 meta.every=20 meta.lr=0.15
   meta.params.beta1.init=0.1 meta.params.beta2.init=0.9 meta.params.temperature.init=4 ${EXTRA:-})
K=(meta.params.beta1.shape=[10] meta.params.beta2.shape=[10] meta.params.temperature.shape=[10])
from() {  # NAME: continue from the committed report of NAME, if there is one
  if [[ -f $IMPORT/$1/results.json ]]; then echo "--import-results $IMPORT/$1"; fi
}
pipe() {  # NAME ARGS...: seeds 0-2 and 3-4 side by side, one report
  local name=$1; shift
  local P=(--sampler hypergrad --finder-epochs "$FINDER" --wandb disabled -q --out "$OUT/$name")
  # shellcheck disable=SC2046
  metakd search "${C[@]}" "$@" "${P[@]}" $(from "$name") --retrain-seeds 3,4 > "$OUT/$name.b.log" 2>&1 &
  # shellcheck disable=SC2046
  metakd search "${C[@]}" "$@" "${P[@]}" $(from "$name") --retrain-seeds 0,1,2 > "$OUT/$name.a.log" 2>&1
  wait
}
mkdir -p "$OUT"
if [[ $STEP == all || $STEP == perclass ]]; then pipe perclass "${K[@]}"; fi
if [[ $STEP == all || $STEP == scalar ]]; then  # the committed 3-parameter pipeline, re-read
  if [[ -f $SCALAR/results.json && ! -f $IMPORT/scalar/results.json ]]; then
    metakd search "${C[@]}" --sampler hypergrad --finder-epochs "$FINDER" --wandb disabled -q \
      --out "$OUT/scalar" --import-results "$SCALAR" --retrain-seeds 0,1,2,3,4 > "$OUT/scalar.log" 2>&1
  else
    pipe scalar
  fi
fi
if [[ $STEP == all || $STEP == table ]]; then
  python "$(dirname "${BASH_SOURCE[0]}")/search_table.py" "$OUT/perclass" "$OUT/scalar"
fi
if [[ $STEP == all || $STEP == commit ]]; then  # the reports, not the runs
  for name in perclass scalar; do
    [[ -f $OUT/$name/results.json ]] || continue
    mkdir -p "$IMPORT/$name"
    cp "$OUT/$name/results.json" "$OUT/$name/results.md" "$IMPORT/$name/"
  done
fi
