#!/usr/bin/env bash
# The side-by-side study on the CIFAR-10 protocol (issue 20): configs/cifar10.yaml, 100 epochs, the CPU
# teacher. Searchers on seed 0, each one's validation-chosen λ retrained on seeds 0-4 (seed 0 is the
# chosen trial's own run): a 9-point grid (β1 share {0.01, 0.1, 0.5} × T {1, 4, 8}), random search with 8
# trials, TPE with 8 trials; then the metakd pipeline (a reverse-mode hypergradient finder, η = 20, a meta
# step every 20 steps, meta Adam lr $META_LR (default 0.15; 0.05 was tried first, on seed 0: NAME=metakd-lr05
# META_LR=0.05), from the common KD setting β1 0.1, β2 0.9, T 4, for FINDER epochs
# (default 20: a finder step costs 3–4.6 plain steps, so the pipeline stays under 2 plain runs), then a
# fixed-λ retrain at the λ it found) on seeds 0-4. STEP metakd-online runs the first pipeline tried
# (online forward-mode finder, γ = 0.999, every 10 steps, 12 epochs; an online step costs ~9 plain steps)
# on seed 0 only.
#   bash benchmarks/search_cifar.sh OUT TEACHER [FINDER_EPOCHS] [STEP]
# STEP: all (default) | grid | random | tpe | metakd | metakd-online | table | commit — one piece per sitting on a 2-core
# CPU (~8 min per plain run, two at a time: grid 9 + 4 plain runs, random/TPE 8 + 4 each, metakd ~5 × 1.8).
#
# Across sittings: a sitting keeps only what it commits. `commit` copies each study's report (results.json,
# search.json, results.md, trials.csv) to $IMPORT (default docs/reproduction/search-cifar); every step
# continues from the report there (`metakd search --import-results`): finished trials and retrains are not
# rerun, an unfinished study goes on with its sampler where it stopped. Within a sitting, rerunning a step
# resumes it (interrupted trials resume from their checkpoints).
# Two worker processes share each study (--worker 0/1, one SQLite file in the study directory); WORKERS=1:
# one (sequential TPE, as the 2026-12-02 sitting ran it beside the random search on the other core).
# TPE prunes with Optuna's median pruner on the validation accuracy at each evaluation (its saving is in
# the report's cost).
set -euo pipefail
OUT=${1:?usage: search_cifar.sh OUT TEACHER [FINDER_EPOCHS] [STEP]}
TEACHER=${2:?the cifar_tiny teacher checkpoint, e.g. runs/cpu100/teacher.pt}
FINDER=${3:-20}
STEP=${4:-all}
IMPORT=${IMPORT:-docs/reproduction/search-cifar}
META_LR=${META_LR:-0.15}
NAME=${NAME:-metakd}
UNROLL=${UNROLL:-20}  # the finder's horizon η (= steps between meta steps); UNROLL=40 NAME=metakd-h40 was tried
# (META_LR=0.5 NAME=metakd-lr50 SEEDS=0, as well; and T held at 4, only β1, β2 learned: NAME=metakd-t4 SEEDS=0,
# EXTRA="meta.params.temperature.lo=3.99 meta.params.temperature.hi=4.01")
SEEDS=${SEEDS:-}      # metakd step: one process on these seeds (e.g. SEEDS=0, for a variant), not 0-2 + 3-4
# the studies the table and commit steps take, where they exist
STUDIES=(grid random tpe metakd metakd-t4 metakd-h40 metakd-lr50 metakd-lr05 metakd-online12)
export OMP_NUM_THREADS=1 WANDB_MODE=disabled MPLBACKEND=Agg
# EXTRA: more overrides, e.g. a dry run on tiny data:
#   EXTRA="data.n_train=256 data.n_val=256 train.epochs=2" IMPORT=/tmp/none \
#     bash benchmarks/search_cifar.sh /tmp/dry T.pt 1
# Evaluation every 10 epochs (790 steps), not every epoch: the final accuracies are the same (evaluation
# does not touch training), and per-epoch evaluation of 20,000 images was about half of a run's wall time.
C=(configs/cifar10.yaml "teacher.checkpoint=$TEACHER" train.epochs=100 train.checkpoint_every=5
   train.normalize_weights=true device=cpu train.eval_every=790 ${EXTRA:-})
S=(--retrain-seeds 0,1,2,3,4 --wandb disabled -q)
from() {  # NAME: continue from the committed report of NAME, if there is one
  if [[ -f $IMPORT/$1/results.json ]]; then echo "--import-results $IMPORT/$1"; fi
}
two() {  # NAME ARGS...: two workers on one study, then the retrains (the study is finished by then)
  local name=$1; shift
  if [[ ${WORKERS:-2} != 1 ]]; then
    # shellcheck disable=SC2046
    metakd search "${C[@]}" "$@" $(from "$name") --wandb disabled -q --worker 1 > "$OUT/$name.w1.log" 2>&1 &
  fi
  # shellcheck disable=SC2046
  metakd search "${C[@]}" "$@" $(from "$name") --wandb disabled -q --worker 0 > "$OUT/$name.w0.log" 2>&1
  wait
  # shellcheck disable=SC2046
  metakd search "${C[@]}" "$@" $(from "$name") "${S[@]}" > "$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
if [[ $STEP == all || $STEP == grid ]]; then
  two grid --sampler grid --trials 9 --grid beta1_share=0.01,0.1,0.5 --grid temperature=1,4,8 --out "$OUT/grid"
fi
[[ $STEP == all || $STEP == random ]] && two random --sampler random --trials 8 --out "$OUT/random"
[[ $STEP == all || $STEP == tpe ]] && two tpe --sampler tpe --trials 8 --pruner median --out "$OUT/tpe"
if [[ $STEP == all || $STEP == metakd ]]; then  # seeds 0-2 and 3-4 side by side (one report)
  M=(meta.hypergrad.method=reverse "meta.unroll=$UNROLL" "meta.every=$UNROLL" "meta.lr=$META_LR"
     meta.params.beta1.init=0.1 meta.params.beta2.init=0.9 meta.params.temperature.init=4
     --sampler hypergrad --finder-epochs "$FINDER" --wandb disabled -q --out "$OUT/$NAME")
  if [[ -n $SEEDS ]]; then
    # shellcheck disable=SC2046
    metakd search "${C[@]}" "${M[@]}" $(from "$NAME") --retrain-seeds "$SEEDS" > "$OUT/$NAME.log" 2>&1
  else
    # shellcheck disable=SC2046
    metakd search "${C[@]}" "${M[@]}" $(from "$NAME") --retrain-seeds 3,4 > "$OUT/$NAME.b.log" 2>&1 &
    # shellcheck disable=SC2046
    metakd search "${C[@]}" "${M[@]}" $(from "$NAME") --retrain-seeds 0,1,2 > "$OUT/$NAME.a.log" 2>&1
    wait
  fi
fi
if [[ $STEP == metakd-online ]]; then
  O=(meta.hypergrad.method=online meta.hypergrad.online_decay=0.999 meta.every=10 meta.lr=0.05
     meta.params.beta1.init=0.1 meta.params.beta2.init=0.9 meta.params.temperature.init=4
     --sampler hypergrad --finder-epochs 12 --wandb disabled -q --out "$OUT/metakd-online12")
  # shellcheck disable=SC2046
  metakd search "${C[@]}" "${O[@]}" $(from metakd-online12) --retrain-seeds 0, > "$OUT/metakd-online12.log" 2>&1
fi
if [[ $STEP == all || $STEP == table ]]; then  # every study there is; PERCLASS: issue 22's per-class pipeline
  dirs=()
  for name in "${STUDIES[@]}"; do
    [[ -f $OUT/$name/results.json ]] && dirs+=("$OUT/$name")
  done
  [[ -n ${PERCLASS:-} && -f ${PERCLASS:-}/results.json ]] && dirs+=("$PERCLASS")
  python "$(dirname "${BASH_SOURCE[0]}")/search_table.py" "${dirs[@]}" --figure "$OUT/search.png"
fi
if [[ $STEP == all || $STEP == commit ]]; then  # the reports, not the runs
  for name in "${STUDIES[@]}"; do
    [[ -f $OUT/$name/results.json ]] || continue
    mkdir -p "$IMPORT/$name"
    for f in results.json search.json results.md trials.csv; do
      [[ -f $OUT/$name/$f ]] && cp "$OUT/$name/$f" "$IMPORT/$name/"
    done
  done
  [[ -f $OUT/search.png ]] && cp "$OUT/search.png" "$IMPORT/"
fi
