#!/usr/bin/env bash
# A short CIFAR-10 probe on a CPU: which meta-optimizer settings keep the hypergradient away from the
# T -> 0.1 collapse of the paper-protocol runs (docs/reproduction.md, "CPU probe")?
#   bash benchmarks/cifar_cpu_probe.sh OUTDIR [EPOCHS] [TEACHER_EPOCHS]
# 1. trains the tiny-CNN teacher (configs/teacher_tiny.yaml) for TEACHER_EPOCHS epochs (skipped when
#    OUTDIR/teacher.pt exists: copy one in to reuse it),
# 2. runs the student (configs/cifar10.yaml, seed 0) for EPOCHS epochs: baseline, fixed
#    (β1=0.01, β2=0.99, T=6.5) and hypergrad with the default meta settings and one change each,
#    JOBS runs at a time (default 2), one torch thread each; RUNS picks a subset of the names below,
#    SEED the student/λ seed (default 0),
# 3. writes OUTDIR/report (metakd report) and prints final accuracy and λ per run.
# About 25 minutes on 2 cores with the defaults (10 and 10 epochs); 30 epochs of four runs: ~25 minutes.
set -euo pipefail
OUT=${1:?usage: cifar_cpu_probe.sh OUTDIR [EPOCHS] [TEACHER_EPOCHS]}
EPOCHS=${2:-10}
TEACHER_EPOCHS=${3:-10}
JOBS=${JOBS:-2}
SEED=${SEED:-0}
RUNS=${RUNS:-reference hg-default hg-lr1e-3 hg-unroll10 hg-val1024}
export OMP_NUM_THREADS=1 WANDB_MODE=disabled MPLBACKEND=Agg
mkdir -p "$OUT"
TEACHER="$OUT/teacher.pt"
[[ -f "$TEACHER" ]] || metakd teacher configs/teacher_tiny.yaml teacher.epochs="$TEACHER_EPOCHS" \
  --out "$TEACHER" --device cpu --quiet
COMMON=(teacher.checkpoint="$TEACHER" train.epochs="$EPOCHS" --device cpu --wandb disabled --quiet)
declare -A ARGS=(
  [reference]="baseline,fixed meta.values.beta1=0.01 meta.values.beta2=0.99 meta.values.temperature=6.5"
  [hg-default]="hypergrad"                                   # η = 1, meta Adam lr 0.01, val batch 128
  [hg-lr1e-3]="hypergrad meta.lr=0.001"                      # 10x smaller meta learning rate
  [hg-unroll10]="hypergrad meta.unroll=10 meta.every=10"     # 10-step unroll, a meta step every 10 steps
  [hg-unroll10-lr0.05]="hypergrad meta.unroll=10 meta.every=10 meta.lr=0.05"
  [hg-val1024]="hypergrad meta.val_batch_size=1024"          # 8x larger validation batch
)
for name in $RUNS; do
  [[ -n "${ARGS[$name]:-}" ]] || { echo "unknown run $name; choose from ${!ARGS[*]}" >&2; exit 2; }
  read -r methods overrides <<< "${ARGS[$name]}"
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  # shellcheck disable=SC2086  # the overrides are separate words
  metakd experiment configs/cifar10.yaml $overrides "${COMMON[@]}" --methods "$methods" --seeds 1 --seed "$SEED" \
    --out "$OUT/$name" > /dev/null &
done
wait
metakd report "$OUT"/reference "$OUT"/hg-* --out "$OUT/report" > /dev/null
python - "$OUT" <<'PY'
import sys
from metakd.reporting.report import load_runs

def lam(row):
    m = row.get("meta") or {}
    return f"β1 {m['beta1']:.2f}, β2 {m['beta2']:.2f}, T {m['temperature']:.2f}" if m else "—"

print("| run | method | test acc (final) | test acc (best) | λ after epoch 1 | λ at the end |")
print("|---|---|---:|---:|---|---|")
for run in sorted(load_runs([sys.argv[1]]), key=lambda r: str(r.path)):
    evals = [r for r in run.rows if "test_accuracy" in r]
    s = run.summary
    print(f"| {run.path.parent.parent.name} | {run.method} | {s['test_accuracy']:.4f} | "
          f"{s['best_test_accuracy']:.4f} | {lam(evals[0])} | {lam(evals[-1])} |")
PY
