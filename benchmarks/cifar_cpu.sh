#!/usr/bin/env bash
# The CIFAR-10 protocol (configs/cifar10.yaml, 100 epochs) on a CPU, with the 10-step hypergradient the
# CPU probe found (docs/reproduction.md, "CPU probe"): η = 10, a meta step every 10 training steps, meta
# Adam lr 0.05; forecast windows of 100 steps (10 meta steps each), optimize one / predict one (n = 2).
#   bash benchmarks/cifar_cpu.sh OUTDIR [EPOCHS] [SEEDS] [WORKERS]
# 1. trains the tiny-CNN teacher (configs/teacher_tiny.yaml, TEACHER_EPOCHS=20 as on the GPU; skipped when
#    OUTDIR/teacher.pt exists),
# 2. runs METHODS (default hypergrad,forecast,baseline,fixed) x SEEDS seeds, seed-major, WORKERS processes
#    with one torch thread each, extra overrides in META (e.g. META=train.normalize_weights=true);
#    resumable: rerun the same command to finish an interrupted grid,
# 3. writes OUTDIR/report (metakd report) and prints the table of docs/reproduction.md (cifar_table.py).
# On a 2-core CPU (two runs at a time): teacher ~7.5 min; per 100-epoch run ~12.5 min (baseline, fixed), ~19 min
# (forecast), ~26 min (hypergrad).
set -euo pipefail
OUT=${1:?usage: cifar_cpu.sh OUTDIR [EPOCHS] [SEEDS] [WORKERS]}
EPOCHS=${2:-100}
SEEDS=${3:-2}
WORKERS=${4:-2}
METHODS=${METHODS:-hypergrad,forecast,baseline,fixed}
META=${META:-}
export WANDB_MODE=disabled MPLBACKEND=Agg
mkdir -p "$OUT"
TEACHER="$OUT/teacher.pt"
[[ -f "$TEACHER" ]] || OMP_NUM_THREADS=$WORKERS metakd teacher configs/teacher_tiny.yaml \
  teacher.epochs="${TEACHER_EPOCHS:-20}" --out "$TEACHER" --device cpu --quiet
export OMP_NUM_THREADS=1
metakd experiment configs/cifar10.yaml teacher.checkpoint="$TEACHER" train.epochs="$EPOCHS" \
  train.checkpoint_every=5 meta.unroll=10 meta.every=10 meta.lr=0.05 forecast.window=100 \
  meta.values.beta1=0.01 meta.values.beta2=0.99 meta.values.temperature=6.5 $META \
  --methods "$METHODS" --seeds "$SEEDS" --workers "$WORKERS" --device cpu --wandb disabled --quiet \
  --out "$OUT/grid" > /dev/null
metakd report "$OUT/grid" --out "$OUT/report" > /dev/null
python "$(dirname "${BASH_SOURCE[0]}")/cifar_table.py" "$OUT/grid"
