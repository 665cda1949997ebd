#!/usr/bin/env bash
# The CIFAR-10 reproduction on one GPU machine, in one command:
#   bash benchmarks/gpu_cifar.sh OUTDIR [CIFAR_TRAIN_DIR_OR_TAR] [EPOCHS] [SEEDS]
# 1. trains the tiny-CNN teacher (configs/teacher_tiny.yaml) on the seeded teacher split,
# 2. runs the paper's student grid (configs/cifar10.yaml): methods x seeds, in parallel processes,
# 3. writes the report (figures + table) under OUTDIR/report.
# The JPEG folder is ../shared/datasets/cifar10-jpg/train by default; a .tar.gz of its `train/` folder
# works too (for machines that only get the repository). Each stage is time-limited so that a
# partial result still comes back.
set -euo pipefail
OUT=${1:?usage: gpu_cifar.sh OUTDIR [CIFAR_TRAIN_DIR_OR_TAR] [EPOCHS] [SEEDS]}
SRC=${2:-../shared/datasets/cifar10-jpg/train}
EPOCHS=${3:-100}
SEEDS=${4:-3}
METHODS=${METHODS:-baseline,random,fixed,hypergrad,forecast,optimal}
WORKERS=${WORKERS:-12}
DEVICE=${DEVICE:-cuda}
# fixed: the best point of PAPER.md's small grid (β1=0.01, β2=0.99, T=6.5); extra overrides via META
FIXED="meta.values.beta1=0.01 meta.values.beta2=0.99 meta.values.temperature=6.5"
META=${META:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$OUT/work}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled MPLBACKEND=Agg
metakd() { python3 -m metakd_cli.main "$@"; }

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi -L || true
if [[ "$SRC" == *.tar.gz ]]; then
  mkdir -p /tmp/cifar && tar xzf "$SRC" -C /tmp/cifar && SRC=/tmp/cifar/train
fi
DATA="data.root=$SRC"
TEACHER=runs/teachers/cifar_tiny.pt

start=$(date +%s)
if [[ -n "${REUSE_TEACHER:-}" ]]; then mkdir -p runs/teachers && cp "$REUSE_TEACHER" "$TEACHER"; else
timeout "${TEACHER_TIMEOUT:-200}" python3 -m metakd_cli.main teacher configs/teacher_tiny.yaml "$DATA" teacher.epochs="${TEACHER_EPOCHS:-20}" \
  --out "$TEACHER" --device "$DEVICE" --quiet 2>&1 | tee "$WORK/teacher.log"
fi
echo "teacher: $(( $(date +%s) - start )) s"

# warm the teacher-logit cache once, so parallel workers only read it
rm -rf /tmp/warm
python3 -m metakd_cli.main train configs/cifar10.yaml "$DATA" teacher.checkpoint="$TEACHER" meta.method=fixed \
  meta.values.beta1=0.5 meta.values.beta2=0.5 meta.values.temperature=1.0 train.epochs=1 \
  --out /tmp/warm --device "$DEVICE" --quiet --wandb disabled > /dev/null

start=$(date +%s)
timeout "${GRID_TIMEOUT:-420}" python3 -m metakd_cli.main experiment configs/cifar10.yaml "$DATA" \
  teacher.checkpoint="$TEACHER" train.epochs="$EPOCHS" train.checkpoint_every=5 $FIXED $META \
  --seeds "$SEEDS" --methods "$METHODS" --workers "$WORKERS" --out "$WORK/cifar" --device "$DEVICE" \
  --wandb disabled --quiet 2>&1 | tail -40 || echo "grid stopped after $(( $(date +%s) - start )) s"
echo "grid: $(( $(date +%s) - start )) s"
python3 -m metakd_cli.main report "$WORK/cifar" --out "$WORK/report" 2>&1 | tail -5 || true
cat "$WORK/cifar/results.md" 2>/dev/null || true
# one archive (run directories without checkpoints, the report, logs): the device tool returns few files
tar czf "$OUT/cifar-results.tar.gz" -C "$WORK" --exclude=checkpoints --exclude=wandb cifar report teacher.log 2>/dev/null || true
[[ "$WORK" == "$OUT/work" ]] && rm -rf "$WORK"
ls -la "$OUT"
