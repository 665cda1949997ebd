#!/usr/bin/env bash
# The default run alone and beside a second CPU-bound one (docs/benchmarks.md, issue 21 item 3):
#   bash benchmarks/threads_beside.sh [STEPS] [EXTRA_TRAIN_ARGS...]   (default 1000 steps; e.g. --threads 2)
# Prints the training wall seconds of each run (summary.json); the teacher logits are cached first.
set -euo pipefail
STEPS="${1:-1000}"; shift || true
OUT="$(mktemp -d)"
export WANDB_MODE=disabled
unset OMP_NUM_THREADS MKL_NUM_THREADS
run() {
  metakd train -q --json --out "$OUT/$1" "train.epochs=$STEPS" "${@:2}" | tail -1 |
    python -c "import json, sys; print('$1', round(json.load(sys.stdin)['wall_seconds'], 2), 's')"
}
uptime
run alone "$@"
run beside-a "$@" & run beside-b "$@" & wait
uptime
rm -rf "$OUT"
