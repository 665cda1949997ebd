#!/usr/bin/env bash
# Two ranks against one process on this machine's CPU (issue 31): the same run of the synthetic task
# with an MLP student (a global batch of 256 rows, 4096 training points), fixed λ and the reverse
# look-ahead (η = 2), timed by its own summary (wall seconds of the training loop per step).
# Rows: 1 process with 1 torch thread, 1 process with 2 threads, 2 ranks (gloo) with 1 thread each.
# Usage: bash benchmarks/ddp_overhead.sh OUT [EPOCHS] [REPEATS]
set -euo pipefail
out=${1:?usage: ddp_overhead.sh OUT [EPOCHS] [REPEATS]}
epochs=${2:-6}
repeats=${3:-2}
mkdir -p "$out"
export WANDB_MODE=disabled
common=(data.n_train=4096 data.n_val=512 data.n_test=512 data.n_teacher=512 train.batch_size=256
  "student.name=mlp" "student.kwargs={hidden: [512, 512]}" train.optimizer=sgd train.lr=0.1
  train.momentum=0.9 "train.epochs=$epochs" train.eval_every=0 train.compile=off teacher.epochs=200
  "data.cache_dir=$out/cache" meta.val_batch_size=256)
fixed=(meta.method=fixed meta.values.beta1=0.5 meta.values.beta2=0.5 meta.values.temperature=4)
reverse=(meta.method=hypergrad meta.unroll=2 meta.every=2 meta.lr=0.5)
run() {  # name nproc threads method-args...
  local name=$1 nproc=$2 threads=$3
  shift 3
  for r in $(seq 1 "$repeats"); do
    local dir="$out/$name-$r"
    rm -rf "$dir"
    OMP_NUM_THREADS=$threads metakd train "${common[@]}" "$@" --threads "$threads" \
      --nproc "$nproc" --out "$dir" -q > /dev/null
    python - "$dir" "$name" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
print(f"{sys.argv[2]:28s} {1000 * s['wall_seconds'] / s['steps']:8.2f} ms/step  ({s['steps']} steps)")
PY
  done
}
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for method in fixed reverse; do
  declare -n args=$method
  run "$method-1proc-1thread" 1 1 "${args[@]}"
  run "$method-1proc-2threads" 1 2 "${args[@]}"
  run "$method-2ranks-1thread" 2 1 "${args[@]}"
done
