#!/usr/bin/env bash
# A short CIFAR-10 probe on a CPU: which meta-optimizer settings keep the hypergradient away from the
# T -> 0.1 collapse of the paper-protocol runs (docs/reproduction.md, "CPU probe")?
#   bash benchmarks/cifar_cpu_probe.sh OUTDIR [EPOCHS] [TEACHER_EPOCHS]
# 1. trains the tiny-CNN teacher (configs/teacher_tiny.yaml) for TEACHER_EPOCHS epochs,
# 2. runs the student (configs/cifar10.yaml, seed 0) for EPOCHS epochs: baseline, fixed
#    (β1=0.01, β2=0.99, T=6.5) and hypergrad with the default meta settings and one change each,
# 3. writes OUTDIR/report (metakd report) and prints final accuracy and λ per run.
# One torch thread per process; about 40 minutes on 2 cores with the defaults (10 and 10 epochs).
set -euo pipefail
OUT=${1:?usage: cifar_cpu_probe.sh OUTDIR [EPOCHS] [TEACHER_EPOCHS]}
EPOCHS=${2:-10}
TEACHER_EPOCHS=${3:-10}
export OMP_NUM_THREADS=1 WANDB_MODE=disabled MPLBACKEND=Agg
mkdir -p "$OUT"
TEACHER="$OUT/teacher.pt"
[[ -f "$TEACHER" ]] || metakd teacher configs/teacher_tiny.yaml teacher.epochs="$TEACHER_EPOCHS" \
  --out "$TEACHER" --device cpu --quiet
COMMON=(teacher.checkpoint="$TEACHER" train.epochs="$EPOCHS" --device cpu --wandb disabled --quiet)
run() {  # run NAME METHODS [OVERRIDES...]
  local name=$1 methods=$2
  shift 2
  metakd experiment configs/cifar10.yaml "$@" "${COMMON[@]}" --methods "$methods" --seeds 0 \
    --out "$OUT/$name" > /dev/null
}
run reference baseline,fixed meta.values.beta1=0.01 meta.values.beta2=0.99 meta.values.temperature=6.5
run hg-default hypergrad                                   # η = 1, meta Adam lr 0.01, val batch 128
run hg-lr1e-3 hypergrad meta.lr=0.001                      # 10x smaller meta learning rate
run hg-unroll10 hypergrad meta.unroll=10 meta.every=10     # 10-step unroll, a meta step every 10 steps
run hg-val1024 hypergrad meta.val_batch_size=1024          # 8x larger validation batch
metakd report "$OUT"/reference "$OUT"/hg-* --out "$OUT/report" > /dev/null
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for s in sorted(Path(sys.argv[1]).glob("*/*/seed-0/summary.json")):
    d = json.loads(s.read_text())
    last = [json.loads(l) for l in (s.parent / "metrics.jsonl").read_text().splitlines() if l.strip()][-1]
    lam = ", ".join(f"{k} {v:.2f}" for k, v in (last.get("meta") or {}).items())
    print(f"{s.parent.parent.parent.name:12s} {s.parent.parent.name:10s} test {d['test_accuracy']:.4f}  {lam}")
PY
