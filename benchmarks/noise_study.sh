#!/usr/bin/env bash
# Issue 32's study on a CPU: the CIFAR-10 protocol of configs/cifar10.yaml (cifar_very_tiny student,
# Adam 1e-3, batch 128) with noisy training labels, a clean 1,000-image validation set (the meta set and
# the early-stopping set of every row) and a cifar_tiny teacher trained on the same noisy labels.
#
#   bash benchmarks/noise_study.sh OUT [RATE] [KIND] [SEEDS]
#   ROWS="ce kd grid tpe scalar free mwn" JOBS=2 EPOCHS=100 TEACHER_EPOCHS=20 bash benchmarks/noise_study.sh ...
#   TEACHER_ARGS="data.augment=false" TEACHER_EPOCHS=60 bash benchmarks/noise_study.sh runs/noise40m ...
#                 # more overrides for the teacher's training (here: one that memorises the noisy labels)
#   python benchmarks/noise_table.py OUT        # the table: early-stopped test accuracy, cost, AUROC
#
# Rows (every meta key set here, so meta.preset does not apply):
#   ce      no distillation (cross-entropy on the noisy labels)
#   kd      vanilla KD at the clean data's best grid point (β1 0.01, β2 0.99, T 6.5; docs/reproduction.md)
#   scalar  hypergrad on scalar (β1, β2, T): online forward mode γ 0.999, every 10, meta Adam 0.05,
#           normalized weights (the best scalar setting of docs/reproduction.md)
#   free    per-sample β1ᵢ, β2ᵢ (free entries, N = 10,112 each) and a scalar T: reverse η = 10 over the
#           batches about to be consumed, a meta step every 10 steps (so every example's entries move once
#           per epoch, just before it is trained on), meta Adam 0.05, weights normalized per example
#   freewarm  free, every entry starting at kd's λ (β1 0.01, β2 0.99, T 6.5) instead of a random draw
#           around 0.5: per-example corrections of vanilla KD
#   mwn     meta-weight network (objective=per_sample_kd): η = 1, a meta step every step, meta Adam 1e-3
#           (Meta-Weight-Net's setting)
#   mwn10   the network with a 10-step reverse horizon (exact: detach=false), a meta step every 10
#           steps, meta Adam 0.01: against the one-step horizon's collapse of T
#   mwn10n  mwn10 with weights normalized per example (β1ᵢ : β2ᵢ is all that counts, as in free and grid)
#   mwn10nt mwn10n with T starting at kd's 6.5 instead of a draw in 0.1 + 9.9σ(U(-2, 0)) = (1.3, 5.05)
#   mwn10w  mwn10nt with the network's output bias started at kd's mix too (b2 = logit(0.01, 0.99), so every
#           example starts at share 0.01, T 6.5, as vanilla KD): per-example corrections of KD's λ
#   mwn10wu mwn10w without normalized weights: β1ᵢ and β2ᵢ each in (0, 1), so the network can also turn an
#           example down as a whole (both terms), as the dropping oracle does, besides moving its share
#   mwn10wv mwn10w with an example weight (objective_kwargs.example_weight=true): a third output
#           vᵢ = σ(z₃), started at 0.5 where σ is steepest, and L = Σ vᵢ Lᵢ / Σ vᵢ per batch, so the network
#           can turn an example down as a whole (the dropping oracle's move) besides moving its mix
#   mwn10ov mwn10wv started at the dropping oracle's mix instead of KD's (share 0.1, T 1: b2 = logit(0.1, 0.9)),
#           so the labels of clean examples count and the example weight has flipped labels to turn down
#   mwn10wd mwn10w with the loss signal detached (objective_kwargs.detach=true): the student then trains on
#           the reweighted loss alone, not also on ∂vᵢ/∂ℓᵢ; the 10-step hypergradient is then approximate
#   mwn10wf mwn10w frozen (meta.lr=1e-12; the schema wants > 0): the network stays at its warm start, so it
#           differs from kd only by the per_sample_kd path (its small random spread, the undetached ℓᵢ signal)
#   mwn50w  mwn10w with a 50-step horizon (a meta step every 50 steps, meta Adam 0.05: the same lr per step
#           as mwn10w's 0.01 every 10): whether a longer look-ahead keeps the network near KD's λ
#   mwn100w mwn10w with a 100-step horizon (every 100, meta Adam 0.1): does the trend of mwn50w go on
#   u-s<S>-T<T>  one fixed λ for every example: β1 share S, T, normalized weights (u-s0.1-T1 is the uniform
#           counterpart of `noise_oracle.py --share 0.1 --temperature 1`: what detection adds at that λ)
#   grid    the searcher: `metakd search --sampler grid`, 9 fixed-λ trials (β1 share {0.01, 0.1, 0.5} ×
#           T {1, 4, 8}, normalized weights), two worker processes; noise_table.py picks the trial with the
#           best clean-validation accuracy at any epoch (early-stopped, as every row)
#   tpe     the other searcher: TPE, 8 trials in the share space (β1/(β1+β2) log-uniform on [0.01, 0.99],
#           T uniform on meta.params' (0.1, 10)), Optuna's median pruner, one worker (sequential)
# Resumable: a run with a completed summary is kept, an interrupted one continues (--resume). Each run is
# one process with one torch thread; JOBS run at a time (two on this 2-core machine).
set -euo pipefail
OUT=${1:?usage: noise_study.sh OUT [RATE] [KIND] [SEEDS]}
RATE=${2:-0.4}
KIND=${3:-symmetric}
SEEDS=${4:-0}
ROWS=${ROWS:-"ce kd grid tpe scalar free mwn"}
THREADS=${THREADS:-1}  # torch threads per run (2: one run alone on the 2 cores); TEACHER_THREADS (2) the teacher's
JOBS=${JOBS:-2}
EPOCHS=${EPOCHS:-100}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-20}
METAKD=${METAKD:-metakd}
DATA="data.n_val=1000 data.label_noise.rate=$RATE data.label_noise.kind=$KIND"
mkdir -p "$OUT"

if [ ! -f "$OUT/teacher.pt" ]; then
  echo "teacher: $TEACHER_EPOCHS epochs on the training labels ($KIND noise, rate $RATE) -> $OUT/teacher.pt" >&2
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=${TEACHER_THREADS:-2} $METAKD teacher configs/teacher_tiny.yaml $DATA teacher.epochs="$TEACHER_EPOCHS" \
    ${TEACHER_ARGS:-} --out "$OUT/teacher.pt" --device cpu
fi

row_args() {
  # the two bases their variants extend: free per-example entries; the network with an exact 10-step horizon
  local free="meta.method=hypergrad meta.params.beta1.per_sample=true meta.params.beta2.per_sample=true \
meta.unroll=10 meta.every=10 meta.lr=0.05 train.normalize_weights=true"
  local mwn10="meta.method=hypergrad objective=per_sample_kd objective_kwargs.detach=false meta.unroll=10 \
meta.every=10 meta.lr=0.01"
  case "$1" in
    ce) echo "meta.method=baseline" ;;
    kd) echo "meta.method=fixed meta.values.beta1=0.01 meta.values.beta2=0.99 meta.values.temperature=6.5" ;;
    scalar) echo "meta.method=hypergrad meta.hypergrad.method=online meta.hypergrad.online_decay=0.999 \
meta.every=10 meta.lr=0.05 train.normalize_weights=true" ;;
    free) echo "$free" ;;
    freewarm) echo "$free meta.params.beta1.init=0.01 meta.params.beta2.init=0.99 meta.params.temperature.init=6.5" ;;
    mwn10) echo "$mwn10" ;;
    mwn10n) echo "$mwn10 train.normalize_weights=true" ;;
    mwn10nt) echo "$mwn10 train.normalize_weights=true meta.params.temperature.init=6.5" ;;
    mwn10w) echo "$mwn10 train.normalize_weights=true meta.params.temperature.init=6.5 \
meta.params.mwn_b2.init=[-4.595,4.595]" ;;
    mwn10wu) echo "$mwn10 meta.params.temperature.init=6.5 meta.params.mwn_b2.init=[-4.595,4.595]" ;;
    mwn10wv) echo "$mwn10 train.normalize_weights=true meta.params.temperature.init=6.5 \
objective_kwargs.example_weight=true meta.params.mwn_b2.init=[-4.595,4.595,0]" ;;
    mwn10ov) echo "$mwn10 train.normalize_weights=true meta.params.temperature.init=1 \
objective_kwargs.example_weight=true meta.params.mwn_b2.init=[-2.197,2.197,0]" ;;
    mwn10wd) echo "$(row_args mwn10w) objective_kwargs.detach=true" ;;
    mwn10wf) echo "$(row_args mwn10w) meta.lr=1e-12" ;;
    mwn50w) echo "$(row_args mwn10w) meta.unroll=50 meta.every=50 meta.lr=0.05" ;;
    mwn100w) echo "$(row_args mwn10w) meta.unroll=100 meta.every=100 meta.lr=0.1" ;;
    mwn) echo "meta.method=hypergrad objective=per_sample_kd meta.unroll=1 meta.every=1 meta.lr=0.001" ;;
    u-s*-T*)  # one fixed λ for every example (normalized): the uniform counterpart of noise_oracle.py's rows
      local share=${1#u-s} t=${1##*-T}
      share=${share%%-T*}
      echo "meta.method=fixed meta.values.beta1=$share meta.values.beta2=$(awk "BEGIN{print 1-$share}") \
meta.values.temperature=$t train.normalize_weights=true" ;;
    *) echo "unknown row $1 (ce kd scalar free freewarm mwn mwn10 mwn10n mwn10nt mwn10w mwn10wu mwn10wv mwn10ov mwn10wd mwn10wf mwn50w mwn100w u-s<S>-T<T> grid tpe)" >&2; return 2 ;;
  esac
}

search() {  # SAMPLER SEED: the searcher's study of SEED (finished trials are kept)
  local sampler=$1 seed=$2 dir="$OUT/$1/seed-$2"
  local args=(configs/cifar10.yaml $DATA "teacher.checkpoint=$OUT/teacher.pt" "train.epochs=$EPOCHS"
              train.normalize_weights=true --seed "$seed" --device cpu --wandb disabled -q --out "$dir")
  echo "$sampler seed $seed: $dir" >&2
  if [ "$sampler" = grid ]; then  # 9 points, two workers on one study
    args+=(--sampler grid --trials 9 --grid beta1_share=0.01,0.1,0.5 --grid temperature=1,4,8)
    OMP_NUM_THREADS=1 $METAKD search "${args[@]}" --worker 1 > /dev/null &
    OMP_NUM_THREADS=1 $METAKD search "${args[@]}" --worker 0 > /dev/null
    wait
  else  # TPE: sequential (each trial sees the ones before), the median pruner, as docs/reproduction.md's
    OMP_NUM_THREADS=1 $METAKD search "${args[@]}" --sampler tpe --trials 8 --pruner median \
      --sampler-seed "$seed" > /dev/null
  fi
}

one() {  # one run: ROW SEED
  if [ "$1" = grid ] || [ "$1" = tpe ]; then search "$1" "$2"; return; fi
  local row=$1 seed=$2 dir="$OUT/$1/seed-$2"
  if [ -f "$dir/summary.json" ] && grep -q '"status": "completed"' "$dir/summary.json"; then
    echo "$row seed $seed: done" >&2; return 0
  fi
  local args
  args=$(row_args "$row")
  if [ -f "$dir/config.yaml" ]; then
    echo "$row seed $seed: resuming $dir" >&2
    OMP_NUM_THREADS=1 $METAKD train --resume "$dir" -q > /dev/null
  else
    echo "$row seed $seed: $dir" >&2
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=${THREADS:-1} $METAKD train configs/cifar10.yaml $DATA teacher.checkpoint="$OUT/teacher.pt" \
      seed="$seed" train.epochs="$EPOCHS" device=cpu wandb.mode=disabled $args --out "$dir" -q > /dev/null
  fi
}
export -f one row_args search
export OUT DATA EPOCHS METAKD THREADS

for seed in $SEEDS; do for row in $ROWS; do echo "$row $seed"; done; done \
  | xargs -P "$JOBS" -L 1 bash -c 'one "$0" "$1"'
