#!/usr/bin/env bash
# The side-by-side study on the CIFAR-10 protocol (issue 20; NOT RUN YET — no compute for it so far):
# configs/cifar10.yaml, 100 epochs, the CPU teacher. Searchers on seed 0, each one's validation-chosen λ
# retrained on seeds 0-4: a 9-point grid (β1 share {0.01, 0.1, 0.5} × T {1, 4, 8}), random search with
# 8 trials, TPE with 8 trials; then the metakd pipeline (online hypergradient finder, γ = 0.999, for
# FINDER epochs, then a fixed-λ retrain at the λ it found) on seeds 0-4. Every step is resumable: rerun
# the same command (finished trials and runs are kept; an interrupted trial resumes from its checkpoint).
#   bash benchmarks/search_cifar.sh OUT TEACHER [FINDER_EPOCHS] [STEP]
# STEP: all (default) | grid | random | tpe | metakd | table — one piece per sitting on a 2-core CPU
# (~13 min per plain run with two at a time: grid ~9+5 plain runs, random/TPE ~8+5 each, metakd ~5×2).
# Two worker processes share each study (--worker 0/1, one SQLite file in the study directory).
set -euo pipefail
OUT=${1:?usage: search_cifar.sh OUT TEACHER [FINDER_EPOCHS] [STEP]}
TEACHER=${2:?the cifar_tiny teacher checkpoint, e.g. runs/cpu100/teacher.pt}
FINDER=${3:-25}
STEP=${4:-all}
export OMP_NUM_THREADS=1 WANDB_MODE=disabled MPLBACKEND=Agg
# EXTRA: more overrides, e.g. a dry run on tiny data:
#   EXTRA="data.n_train=256 data.n_val=256 train.epochs=2" bash benchmarks/search_cifar.sh /tmp/dry T.pt 1
C=(configs/cifar10.yaml "teacher.checkpoint=$TEACHER" train.epochs=100 train.checkpoint_every=5
   train.normalize_weights=true device=cpu ${EXTRA:-})
S=(--retrain-seeds 0,1,2,3,4 --wandb disabled -q)
two() {  # NAME ARGS...: two workers on one study, then the retrains (the study is finished by then)
  local name=$1; shift
  metakd search "${C[@]}" "$@" --wandb disabled -q --worker 1 > "$OUT/$name.w1.log" 2>&1 &
  metakd search "${C[@]}" "$@" --wandb disabled -q --worker 0 > "$OUT/$name.w0.log" 2>&1
  wait
  metakd search "${C[@]}" "$@" "${S[@]}" > "$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
if [[ $STEP == all || $STEP == grid ]]; then
  two grid --sampler grid --trials 9 --grid beta1_share=0.01,0.1,0.5 --grid temperature=1,4,8 --out "$OUT/grid"
fi
[[ $STEP == all || $STEP == random ]] && two random --sampler random --trials 8 --out "$OUT/random"
[[ $STEP == all || $STEP == tpe ]] && two tpe --sampler tpe --trials 8 --out "$OUT/tpe"
if [[ $STEP == all || $STEP == metakd ]]; then  # seeds 0-2 and 3-4 side by side, then the table
  M=(meta.hypergrad.method=online meta.hypergrad.online_decay=0.999 meta.every=10 meta.lr=0.05
     --sampler hypergrad --finder-epochs "$FINDER" --wandb disabled -q --out "$OUT/metakd")
  metakd search "${C[@]}" "${M[@]}" --retrain-seeds 3,4 > "$OUT/metakd.b.log" 2>&1 &
  metakd search "${C[@]}" "${M[@]}" --retrain-seeds 0,1,2 > "$OUT/metakd.a.log" 2>&1
  wait
  metakd search "${C[@]}" "${M[@]}" --retrain-seeds 0,1,2,3,4 > "$OUT/metakd.log" 2>&1
fi
if [[ $STEP == all || $STEP == table ]]; then
  python "$(dirname "${BASH_SOURCE[0]}")/search_table.py" "$OUT/grid" "$OUT/random" "$OUT/tpe" \
    "$OUT/metakd" --figure "$OUT/search.png"
fi
